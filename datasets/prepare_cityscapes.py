#!/usr/bin/env python
"""Prepare Cityscapes (gtFine, 19 classes) for HVLFormer, without cityscapesScripts.

Input (``--src``): ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` (from
cityscapes-dataset.com, after logging in) or their extracted ``leftImg8bit/`` and ``gtFine/``.

Output under ``--root`` (default ``$DETECTRON2_DATASETS``, else ``datasets``)::

    cityscapes/leftImg8bit                                          link (or the folder itself)
    cityscapes/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png 0..18, 255 = ignore

Label rule: each ``*_gtFine_labelIds.png`` is mapped through the official label table (label id ->
train id, stored in ``hvlformer/data/classes/cityscapes.json``); the 15 ids without a train id (and 255,
the uint8 form of the license plate's id -1) become 255. Any other value, a mask whose size differs from
its image, and an image without its ``labelIds`` file are errors naming the file. 2,975 training and 500
validation images (the test split has no public labels and is skipped).

Idempotent: existing outputs are kept (``--overwrite`` rewrites them).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
from prepare_common import (check_label_matches_image, convert_splits, default_workers, folder_split_jobs, link_dir,
                            locate_source, prepare_parser, require_dir, write_label_png)

IMAGE_ARCHIVE = "leftImg8bit_trainvaltest.zip"
LABEL_ARCHIVE = "gtFine_trainvaltest.zip"
SPLITS = ("train", "val")
EXPECTED = {"train": 2975, "val": 500}
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return prepare_parser(
        "Convert Cityscapes gtFine label ids to the 19 train ids for HVLFormer (see datasets/README.md).",
        f"folder with leftImg8bit/ and gtFine/ (or {IMAGE_ARCHIVE} and {LABEL_ARCHIVE})", "leftImg8bit",
        overwrite_what="outputs").parse_args(argv)


def cityscapes_id_to_train_id_lut() -> np.ndarray:
    """A 256-entry int16 table: Cityscapes label id -> train id (255 ignore), -1 for ids that do not exist.

    Id -1 (license plate) is stored as 255 (its uint8 form). The table is ``label_ids`` of
    ``hvlformer/data/classes/cityscapes.json``."""
    from hvlformer.data.datasets.builtin import load_builtin_classes

    lut = np.full(256, -1, dtype=np.int16)
    for row in load_builtin_classes("cityscapes")["label_ids"]:
        lut[row["id"] % 256] = row["train_id"]
    return lut


def label_ids_to_train_ids(label_ids: np.ndarray, source: str = "") -> np.ndarray:
    """Map Cityscapes label ids to train ids (255 = ignore); unknown ids are an error naming ``source``."""
    lut = cityscapes_id_to_train_id_lut()
    if label_ids.dtype != np.uint8:
        if label_ids.size and (label_ids.min() < 0 or label_ids.max() > 255):
            raise ValueError(f"Label file {source}: values outside 0..255 are not Cityscapes label ids.")
        label_ids = label_ids.astype(np.uint8)
    present = np.nonzero(np.bincount(label_ids.ravel(), minlength=256))[0]
    unknown = [int(v) for v in present if lut[v] < 0]
    if unknown:
        raise ValueError(
            f"Label file {source} contains values {unknown} that are not Cityscapes label ids (0..33; see "
            f"hvlformer/data/classes/cityscapes.json). Is it a *_gtFine_labelIds.png file?"
        )
    return lut[label_ids].astype(np.uint8)


def convert_one(job: Tuple[str, str, str, bool]) -> str:
    from hvlformer.data.validation import read_label_checked

    image, source, out, overwrite = job
    if not overwrite and os.path.isfile(out):
        return "kept"
    ids = read_label_checked(source, num_classes=None)
    check_label_matches_image(ids, image, source)
    write_label_png(out, label_ids_to_train_ids(ids, source))
    return "written"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    src = Path(args.src)
    images_src = locate_source(src, ["", "cityscapes"], ["leftImg8bit/train", "leftImg8bit/val"],
                               [IMAGE_ARCHIVE], "Cityscapes images (leftImg8bit/)") / "leftImg8bit"
    labels_src = locate_source(src, ["", "cityscapes"], ["gtFine/train", "gtFine/val"],
                               [LABEL_ARCHIVE], "Cityscapes fine annotations (gtFine/)") / "gtFine"
    out_root = Path(args.root) / "cityscapes"
    print(f"Cityscapes images: {images_src}\nCityscapes labels: {labels_src}\noutput: {out_root}")
    plans = {}
    for split in SPLITS:
        images = require_dir(images_src / split, f"Cityscapes leftImg8bit/{split}")
        labels = require_dir(labels_src / split, f"Cityscapes gtFine/{split}")
        plans[split] = folder_split_jobs(images, labels, IMAGE_SUFFIX, LABEL_IDS_SUFFIX, out_root / "gtFine" / split,
                                         TRAIN_IDS_SUFFIX, args.overwrite)
    print(f"leftImg8bit: {link_dir(images_src, out_root / 'leftImg8bit', copy=args.copy_images)}")
    convert_splits(convert_one, plans, args.workers or default_workers(), "Cityscapes", EXPECTED)
    print(f"done: {out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
