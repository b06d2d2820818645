#!/usr/bin/env python
"""Prepare ADE20K SceneParsing (ADEChallengeData2016, 150 classes) for HVLFormer.

Input (``--src``): ``ADEChallengeData2016.zip`` or its extracted ``ADEChallengeData2016/``
(``images/{training,validation}/*.jpg``, ``annotations/{training,validation}/*.png``).

Output under ``--root`` (default ``$DETECTRON2_DATASETS``, else ``datasets``)::

    ADEChallengeData2016/images                                        link (or the folder itself)
    ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png

Label rule: the official value 0 ("other objects" / unlabeled) becomes 255 (ignore) and every class
value v in 1..150 becomes v - 1, so label i is class i + 1 of ``objectInfo150`` (the names are in
``hvlformer/data/classes/ade20k.json``). Values above 150, a mask whose size differs from its image, and
an image without a mask are errors naming the file. 20,210 training and 2,000 validation images.

Idempotent: existing masks are kept (``--overwrite`` rewrites them).
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

ARCHIVE = "ADEChallengeData2016.zip"
SPLITS = ("training", "validation")
EXPECTED = {"training": 20210, "validation": 2000}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return prepare_parser("Convert ADE20K SceneParsing annotations for HVLFormer (see datasets/README.md).",
                          f"folder with {ARCHIVE} or its extracted ADEChallengeData2016/",
                          "the images folder").parse_args(argv)


def ade_to_train_labels(raw: np.ndarray) -> np.ndarray:
    """Official ADE20K values (0 = unlabeled, 1..150) -> 0..149 with 255 = ignore."""
    lut = (np.arange(256, dtype=np.int32) - 1).astype(np.uint8)  # 0 -> 255 (uint8 wrap), v -> v - 1
    return lut[raw]


def convert_one(job: Tuple[str, str, str, bool]) -> str:
    from hvlformer.data.validation import read_label_checked

    image, source, out, overwrite = job
    if not overwrite and os.path.isfile(out):
        return "kept"
    # 151 values: 0 (unlabeled) and the classes 1..150; anything else is an error naming the file.
    raw = read_label_checked(source, num_classes=151, ignore_label=None).astype(np.uint8)
    check_label_matches_image(raw, image, source)
    write_label_png(out, ade_to_train_labels(raw))
    return "written"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    src = locate_source(args.src, ["ADEChallengeData2016", ""], ["images", "annotations"], [ARCHIVE],
                        "ADE20K SceneParsing (ADEChallengeData2016/)")
    out_root = Path(args.root) / "ADEChallengeData2016"
    print(f"ADE20K: {src}\noutput: {out_root}")
    plans = {}
    for split in SPLITS:
        images = require_dir(src / "images" / split, f"ADE20K images/{split}")
        annotations = require_dir(src / "annotations" / split, f"ADE20K annotations/{split}")
        plans[split] = folder_split_jobs(images, annotations, ".jpg", ".png",
                                         out_root / "annotations_detectron2" / split, ".png", args.overwrite)
    print(f"images: {link_dir(src / 'images', out_root / 'images', copy=args.copy_images)}")
    convert_splits(convert_one, plans, args.workers or default_workers(), "ADE20K", EXPECTED)
    print(f"done: {out_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
