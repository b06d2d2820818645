#!/usr/bin/env python
"""Write the paper's seeded labeled / unlabeled splits as UniMatch-format files.

    python tools/make_splits.py --dataset voc --counts 92 183 --seeds 0 1 2

writes ``$DETECTRON2_DATASETS/splits/voc/<count>_seed<seed>/{labeled,unlabeled}.txt`` (``--out`` elsewhere),
the files that the registered ``voc_<count>_seed<seed>_{labeled,unlabeled}`` datasets read. The datasets
must be prepared (``datasets/README.md``). Without ``--counts`` all paper counts are written. Existing
files are kept unless ``--force`` (so published or shared split files are never overwritten by accident).
Labeled images are drawn with ``hvlformer.data.seeded_split`` (VOC: from the 1,464 fine images); the
unlabeled list is the rest of the training set.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

DATASETS = ("voc", "coco81", "ade20k", "cityscapes")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--counts", type=int, nargs="+", default=None, help="labeled counts (default: the paper's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--root", default=os.environ.get("DETECTRON2_DATASETS", "datasets"),
                   help="prepared datasets ($DETECTRON2_DATASETS)")
    p.add_argument("--out", default=None, help="split folder (default: <root>/splits)")
    p.add_argument("--force", action="store_true", help="overwrite existing split files")
    args = p.parse_args(argv)

    from hvlformer.data import PAPER_SPLIT_COUNTS, write_paper_splits

    counts = args.counts or list(PAPER_SPLIT_COUNTS[args.dataset])
    for directory, n_lab, n_unl, what in write_paper_splits(args.dataset, counts, args.seeds, root=args.root,
                                                            out=args.out, force=args.force):
        print(f"{what:7s} {directory}: {n_lab:,} labeled, {n_unl:,} unlabeled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
