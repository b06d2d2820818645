#!/usr/bin/env python
"""Prepare COCO 2017 as 81-class semantic segmentation for HVLFormer.

Input (``--src``, a folder holding the downloads or what they extract to): ``train2017.zip`` /
``train2017/``, ``val2017.zip`` / ``val2017/`` and ``annotations_trainval2017.zip`` /
``annotations/instances_{train,val}2017.json``.

Output under ``--root`` (default ``$DETECTRON2_DATASETS``, else ``datasets``)::

    coco/images/{train2017,val2017}                      links to the image folders (--copy-images: copies)
    coco/annotations_semseg81/{train2017,val2017}/<12-digit id>.png   one index PNG per image

Label rule (from the instance annotations, with pycocotools):

* 0 = background (no instance); 1..80 = the 80 thing categories in increasing COCO category id
  (``hvlformer/data/classes/coco81.json``; the annotation file's category names are checked against it).
* **Overlapping instances: the smaller instance wins.** Instances are painted from the largest mask area
  to the smallest (ties: in annotation-id order, the later one on top), because a small object that
  overlaps a large one is usually in front of it (a cup on a table) and would otherwise vanish.
* **Crowd regions** (``iscrowd=1``) become 255 (ignore), except where a non-crowd instance covers them.
* Annotations without a valid polygon (fewer than 3 points) are skipped and counted in the summary.
* Every image of the annotation file gets a mask (images without instances are all background), so
  ``train2017`` has 118,287 images and ``val2017`` 5,000, as in UniMatch's COCO splits.

Idempotent: existing masks are kept (``--overwrite`` rewrites them).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from prepare_common import (check_label_matches_image, default_workers, link_dir, locate_source, missing_source_error,
                            prepare_parser, run_jobs, write_label_png)

SPLITS = ("train2017", "val2017")
ANNOTATION_ARCHIVE = "annotations_trainval2017.zip"

# Set in the parent before the worker processes fork (the COCO index is large; fork shares it).
_COCO = None
_CAT_TO_LABEL: Dict[int, int] = {}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = prepare_parser("Build 81-class COCO 2017 semantic masks for HVLFormer (see datasets/README.md).",
                       "folder with train2017/, val2017/, annotations/ (or train2017.zip, val2017.zip, "
                       f"{ANNOTATION_ARCHIVE})", "the image folders")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to prepare")
    return p.parse_args(argv)


def category_to_label(categories: Sequence[Dict[str, Any]], annotation_file: str) -> Dict[int, int]:
    """COCO category id -> contiguous label 1..80, checked against ``classes/coco81.json``."""
    from hvlformer.data.datasets.builtin import builtin_class_names

    expected = builtin_class_names("coco81")[1:]
    cats = sorted(categories, key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    if names != expected:
        diff = [f"{a!r} != {b!r}" for a, b in zip(names, expected) if a != b][:3]
        raise ValueError(
            f"{annotation_file}: its {len(names)} categories (by id) do not match the 80 COCO thing classes of "
            f"hvlformer/data/classes/coco81.json ({'; '.join(diff) or 'different count'}). Use the official "
            f"instances_*2017.json files."
        )
    return {c["id"]: i + 1 for i, c in enumerate(cats)}


def instance_mask(ann: Dict[str, Any], h: int, w: int) -> Optional[np.ndarray]:
    """The H x W bool mask of one annotation (polygons, RLE or uncompressed RLE); ``None`` when it has no
    valid polygon (fewer than 3 points), as a few official annotations do."""
    from pycocotools import mask as mask_utils

    seg = ann["segmentation"]
    if isinstance(seg, list):
        polygons = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(bool)


def semantic_mask(coco, image_id: int, cat_to_label: Dict[int, int], source: str = "") -> np.ndarray:
    """The 81-class label map of one image (rules in the module docstring)."""
    return _semantic_mask(coco, image_id, cat_to_label, source)[0]


def _semantic_mask(coco, image_id: int, cat_to_label: Dict[int, int], source: str) -> Tuple[np.ndarray, int]:
    """``(label map, number of annotations skipped for lack of a valid polygon)``."""
    info = coco.imgs[image_id]
    h, w = int(info["height"]), int(info["width"])
    label = np.zeros((h, w), dtype=np.uint8)
    crowd = np.zeros((h, w), dtype=bool)
    covered = np.zeros((h, w), dtype=bool)
    painted: List[Tuple[int, int, np.ndarray, int]] = []
    skipped = 0
    for ann in coco.imgToAnns.get(image_id, []):
        cat = ann["category_id"]
        if cat not in cat_to_label:
            raise ValueError(
                f"{source}: annotation {ann.get('id')} of image {image_id} has category_id {cat}, which is not "
                f"one of the file's categories."
            )
        m = instance_mask(ann, h, w)
        if m is None:
            skipped += 1
            continue
        if m.shape != (h, w):
            raise ValueError(f"{source}: annotation {ann.get('id')} decodes to {m.shape}, but image {image_id} is {(h, w)}.")
        if ann.get("iscrowd", 0):
            crowd |= m
        else:
            painted.append((int(m.sum()), int(ann.get("id", 0)), m, cat_to_label[cat]))
    # largest first, so that smaller instances end on top; equal areas: later annotation id on top
    for _, _, m, lab in sorted(painted, key=lambda t: (-t[0], t[1])):
        label[m] = lab
        covered |= m
    label[crowd & ~covered] = 255
    return label, skipped


def convert_one(job: Tuple[int, str, str, bool, str]) -> Tuple[str, int]:
    """Write one mask; returns ``("written" | "kept", skipped annotations)``."""
    image_id, image_path, out, overwrite, source = job
    if not overwrite and os.path.isfile(out):
        return "kept", 0
    info = _COCO.imgs[image_id]  # the annotation file's size must be the image's (checked before decoding)
    size = np.broadcast_to(np.uint8(0), (int(info["height"]), int(info["width"])))
    check_label_matches_image(size, image_path, f"{source} (image id {image_id})")
    label, skipped = _semantic_mask(_COCO, image_id, _CAT_TO_LABEL, source)
    write_label_png(out, label)
    return "written", skipped


def prepare_split(src: Path, split: str, out_root: Path, args: argparse.Namespace) -> Dict[str, int]:
    global _COCO, _CAT_TO_LABEL
    ann_dir = locate_source(src, [""], [f"annotations/instances_{split}.json"], [ANNOTATION_ARCHIVE],
                            f"COCO annotations (annotations/instances_{split}.json)")
    images = locate_source(src, [""], [split], [f"{split}.zip"], f"COCO images ({split}/)") / split
    ann_file = ann_dir / "annotations" / f"instances_{split}.json"
    from pycocotools.coco import COCO

    print(f"loading {ann_file}")
    coco = COCO(str(ann_file))
    cat_to_label = category_to_label(coco.dataset.get("categories", []), str(ann_file))
    jobs = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        image = images / info["file_name"]
        if not image.is_file():
            raise missing_source_error(f"Image {info['file_name']} of {ann_file.name}", [image])
        out = out_root / "annotations_semseg81" / split / (Path(info["file_name"]).stem + ".png")
        jobs.append((image_id, str(image), str(out), args.overwrite, str(ann_file)))
    print(f"{split}: images {link_dir(images, out_root / 'images' / split, copy=args.copy_images)}")
    _COCO, _CAT_TO_LABEL = coco, cat_to_label
    try:
        results = run_jobs(convert_one, jobs, args.workers or default_workers(), f"COCO {split}")
    finally:
        _COCO, _CAT_TO_LABEL = None, {}
    status = [r[0] for r in results]
    skipped = sum(r[1] for r in results)
    if skipped:
        print(f"{split}: {skipped} annotations without a valid polygon (fewer than 3 points) were skipped")
    return {"written": status.count("written"), "kept": status.count("kept"), "images": len(jobs)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out_root = Path(args.root) / "coco"
    for split in args.splits:
        n = prepare_split(Path(args.src), split, out_root, args)
        print(f"{split}: {n['images']:,} images, {n['written']:,} masks written, {n['kept']:,} already there")
    print(f"done: {out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
