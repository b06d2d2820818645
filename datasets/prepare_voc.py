#!/usr/bin/env python
"""Prepare Pascal VOC 2012 + SBD (``train_aug``) for HVLFormer.

Input (``--src``, a folder holding the downloads or what they extract to):

* ``VOCtrainval_11-May-2012.tar`` or its extracted ``VOCdevkit/VOC2012/`` (``JPEGImages/``,
  ``SegmentationClass/`` palette PNGs, ``ImageSets/Segmentation/{train,val}.txt``);
* ``benchmark.tgz`` (SBD) or its extracted ``benchmark_RELEASE/dataset/`` (``cls/*.mat``,
  ``train.txt``, ``val.txt``).

``--voc`` / ``--sbd`` point at these elsewhere. ``--no-sbd`` prepares VOC 2012 alone (no SBD download): then
``train_aug.txt`` is the 1,464 fine training images, so the unlabeled pool of a split is those 1,464 minus
its labeled images (the 1,464 split has no unlabeled image) instead of the paper's 10,582-image pool; the
paper's numbers need SBD. ``val`` (1,449) is the same either way. Output under ``--root`` (default ``$DETECTRON2_DATASETS``,
else ``datasets``)::

    VOC2012/JPEGImages                       link to the VOC folder (--copy-images: a copy)
    VOC2012/SegmentationClassAug/<id>.png    single-channel index PNGs, 0..20, 255 = ignore
    VOC2012/ImageSets/Segmentation/train_aug.txt   10,582 ids: (SBD train + SBD val + VOC train) - VOC val
    VOC2012/ImageSets/Segmentation/train.txt       1,464 fine ids (the labeled pool of the paper's splits)
    VOC2012/ImageSets/Segmentation/val.txt         1,449 ids

Conversion rules:

* VOC ``SegmentationClass`` PNGs are palette images: their **indices** are the labels (never the
  colours or the luminance); 255 (boundaries, difficult) stays 255.
* SBD ``cls/<id>.mat``: ``GTcls.Segmentation`` (0..20) is the label map (SBD has no ignore boundary).
* An image with both annotations keeps the VOC one (finer, with ignore boundaries), so the 1,464 labeled
  images of the paper's splits carry the official fine masks.
* Every mask is checked: same size as its image, values in 0..20 or 255 (an error names the file).

Idempotent: existing masks are kept (``--overwrite`` rewrites them); the lists are rewritten.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from prepare_common import (check_label_matches_image, default_workers, link_dir, locate_source, missing_source_error,
                            prepare_parser, require_dir, require_file, run_jobs, write_label_png)

VOC_ARCHIVE = "VOCtrainval_11-May-2012.tar"
SBD_ARCHIVE = "benchmark.tgz"
NUM_CLASSES = 21
EXPECTED = {"train_aug": 10582, "train": 1464, "val": 1449}
NO_SBD_NOTE = (
    "NOTE: prepared without SBD (--no-sbd). train_aug.txt = the 1,464 VOC training images (not 10,582): "
    "voc_train has 1,464 images, and the unlabeled pool of each split is these 1,464 minus its labeled images "
    "(the 1,464 split has none left). val is the official 1,449. The paper's splits and numbers need SBD: "
    "re-run with the SBD archive (benchmark.tgz) to get them.")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = prepare_parser(
        "Convert Pascal VOC 2012 + SBD into the train_aug tree of HVLFormer (see datasets/README.md).",
        f"folder with {VOC_ARCHIVE} and {SBD_ARCHIVE} (or their extracted VOCdevkit/ and benchmark_RELEASE/)",
        "JPEGImages", src_required=False)
    p.add_argument("--voc", default=None, help="VOC 2012 folder or archive, if not in --src")
    p.add_argument("--sbd", default=None, help="SBD folder (benchmark_RELEASE or its dataset/) or archive, if not in --src")
    p.add_argument("--no-sbd", action="store_true",
                   help="prepare VOC 2012 alone: train_aug = the 1,464 fine images (the paper's splits need SBD)")
    args = p.parse_args(argv)
    if args.no_sbd and args.sbd is not None:
        p.error("--no-sbd and --sbd exclude each other")
    if args.src is None and (args.voc is None or (args.sbd is None and not args.no_sbd)):
        p.error("give --src (the download folder), or --voc and --sbd (or --voc and --no-sbd)")
    return args


def _locate(path: Optional[str], src: Optional[str], candidates, required, archive, what):
    if path is not None and Path(path).is_file():  # an archive given directly
        folder = Path(path).parent
        return locate_source(folder, candidates, required, [Path(path).name], what)
    if path is not None:
        return locate_source(path, [""] + list(candidates), required, [archive], what)
    return locate_source(src, candidates, required, [archive], what)


def locate_voc(path: Optional[str], src: Optional[str]) -> Path:
    return _locate(path, src, ["VOCdevkit/VOC2012", "VOC2012", ""],
                   ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"], VOC_ARCHIVE,
                   "Pascal VOC 2012 (VOCdevkit/VOC2012)")


def locate_sbd(path: Optional[str], src: Optional[str]) -> Path:
    return _locate(path, src, ["benchmark_RELEASE/dataset", "dataset", ""],
                   ["cls", "train.txt", "val.txt"], SBD_ARCHIVE, "SBD (benchmark_RELEASE/dataset)")


def read_ids(path: Path, what: str) -> List[str]:
    require_file(path, what)
    with open(path, "r", encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def read_voc_png(path: str) -> np.ndarray:
    """A VOC ``SegmentationClass`` PNG as uint8 indices (palette indices, never colours)."""
    from hvlformer.data.validation import read_label_checked

    return read_label_checked(path, NUM_CLASSES, 255).astype(np.uint8)


def read_sbd_mat(path: str) -> np.ndarray:
    """SBD ``cls/<id>.mat``: ``GTcls.Segmentation`` as uint8 class indices."""
    import scipy.io
    from hvlformer.data.validation import check_label_values

    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as e:  # scipy raises several types for broken files
        raise ValueError(f"SBD annotation {path} is corrupt or not a MATLAB file: {type(e).__name__}: {e}") from e
    gt = mat.get("GTcls")
    seg = getattr(gt, "Segmentation", None)
    if seg is None:
        raise ValueError(f"SBD annotation {path} has no GTcls.Segmentation field (is it an SBD cls/*.mat file?).")
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.dtype.kind not in "iub":
        raise ValueError(f"SBD annotation {path}: GTcls.Segmentation is {seg.shape} {seg.dtype}, expected an H x W integer map.")
    check_label_values(seg, NUM_CLASSES, 255, path)
    return seg.astype(np.uint8)


def convert_one(job: Tuple[str, str, str, str, bool]) -> str:
    """Write one mask; returns "voc", "sbd" or "kept"."""
    image, source, kind, out, overwrite = job
    if not overwrite and os.path.isfile(out):
        return "kept"
    label = read_voc_png(source) if kind == "voc" else read_sbd_mat(source)
    check_label_matches_image(label, image, source)
    write_label_png(out, label)
    return kind


def plan(voc: Path, sbd: Optional[Path], out_root: Path, overwrite: bool) -> Tuple[Dict[str, List[str]], List[tuple]]:
    """Id lists and conversion jobs (``image, source annotation, kind, output, overwrite``); ``sbd=None``:
    VOC 2012 alone (``train_aug`` = the VOC train ids)."""
    seg_dir = voc / "ImageSets" / "Segmentation"
    voc_train = read_ids(seg_dir / "train.txt", "VOC ImageSets/Segmentation/train.txt")
    voc_val = read_ids(seg_dir / "val.txt", "VOC ImageSets/Segmentation/val.txt")
    sbd_ids = [] if sbd is None else (read_ids(sbd / "train.txt", "SBD train.txt")
                                      + read_ids(sbd / "val.txt", "SBD val.txt"))
    val_set = set(voc_val)
    train_aug = sorted((set(sbd_ids) | set(voc_train)) - val_set)
    images = require_dir(voc / "JPEGImages", "VOC JPEGImages")
    voc_masks = require_dir(voc / "SegmentationClass", "VOC SegmentationClass")
    sbd_cls = None if sbd is None else require_dir(sbd / "cls", "SBD cls")
    sbd_set = set(sbd_ids)
    jobs = []
    for i in sorted(set(train_aug) | val_set):
        image = images / f"{i}.jpg"
        if not image.is_file():
            raise missing_source_error(f"Image of {i}", [image])
        png = voc_masks / f"{i}.png"
        mat = sbd_cls / f"{i}.mat" if sbd_cls is not None else None
        if png.is_file():
            source, kind = png, "voc"
        elif mat is not None and i in sbd_set and mat.is_file():
            source, kind = mat, "sbd"
        else:
            looked = [png] + ([mat] if i in sbd_set else [])
            raise missing_source_error(f"Annotation of {i}", looked)
        out = out_root / "SegmentationClassAug" / f"{i}.png"
        jobs.append((str(image), str(source), kind, str(out), overwrite))
    return {"train_aug": train_aug, "train": sorted(voc_train), "val": sorted(voc_val)}, jobs


def write_list(path: Path, ids: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    voc = locate_voc(args.voc, args.src)
    if args.no_sbd:
        sbd = None
    else:
        try:
            sbd = locate_sbd(args.sbd, args.src)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e}\nTo prepare VOC 2012 without SBD (1,464 training images instead of "
                                    f"10,582; the paper's splits need SBD), add --no-sbd.") from e
    out_root = Path(args.root) / "VOC2012"
    print(f"VOC 2012: {voc}\nSBD:      {sbd or 'not used (--no-sbd)'}\noutput:   {out_root}")
    lists, jobs = plan(voc, sbd, out_root, args.overwrite)
    done = link_dir(voc / "JPEGImages", out_root / "JPEGImages", copy=args.copy_images)
    print(f"JPEGImages: {done}")
    results = run_jobs(convert_one, jobs, args.workers or default_workers(), "VOC masks")
    for name, ids in lists.items():
        write_list(out_root / "ImageSets" / "Segmentation" / f"{name}.txt", ids)
    counts = {k: results.count(k) for k in ("voc", "sbd", "kept")}
    print(f"masks: {counts['voc']} from VOC, {counts['sbd']} from SBD, {counts['kept']} already there")
    expected = dict(EXPECTED, train_aug=EXPECTED["train"]) if sbd is None else EXPECTED
    for name, ids in lists.items():
        note = "" if len(ids) == expected[name] else f"  (the official archives give {expected[name]:,})"
        print(f"{name}: {len(ids):,} images{note}")
    if sbd is None:
        print(NO_SBD_NOTE)
    print(f"done: {out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
