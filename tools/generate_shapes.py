#!/usr/bin/env python
"""Generate the synthetic shapes dataset (``hvlformer.data.shapes``) ahead of time.

    python tools/generate_shapes.py --out DIR --num-classes 6 --image-size 128 --num-train 400 --num-val 50 --seed 0

writes ``DIR/images/<split>/*.jpg``, ``DIR/labels/<split>/*.png`` and ``DIR/manifest_<split>.json``. Training
does not need it (the registered ``shapes_*`` datasets generate their files on first use); it is for looking
at the data or generating it elsewhere. The same parameters give byte-identical files.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate the synthetic shapes dataset (images/<split>, labels/<split>, manifests).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="dataset root to write")
    parser.add_argument("--num-classes", type=int, default=6, help="classes including background")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from hvlformer.data.shapes import check_num_classes, generate_shapes_split, shapes_class_names

    try:
        check_num_classes(args.num_classes)
    except ValueError as e:
        parser.error(str(e))
    for split, count in (("train", args.num_train), ("val", args.num_val)):
        start = time.perf_counter()
        dicts = generate_shapes_split(Path(args.out), split, count, args.image_size, args.num_classes, args.seed)
        print(f"{split}: {len(dicts)} images in {Path(args.out) / 'images' / split} ({time.perf_counter() - start:.1f} s)")
    print("classes: " + ", ".join(shapes_class_names(args.num_classes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
