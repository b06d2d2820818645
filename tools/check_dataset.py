#!/usr/bin/env python
"""Check the datasets of a config before training: every listed image and mask is read once.

    python tools/check_dataset.py --config-file configs/voc/hvlformer_vitb16_voc_92.yaml
    python tools/check_dataset.py --config-file my.yaml --eval-only      # only DATASETS.TEST
    python tools/check_dataset.py --config-file my.yaml --opts DATASETS.CHECK.NUM_WORKERS 4

The same check runs automatically at the start of training (``DATASETS.CHECK.ENABLED``); see
``hvlformer.data.check``. It reports missing datasets, undecodable or truncated images and masks,
image/mask size mismatches and label values outside ``[0, K)`` other than the ignore label, for all files at
once. Files that passed are cached by path, size and modification time, so a second run is instant
(``--no-cache`` reads everything again).

Exit status: 0 = every file is usable, 1 = some files are not (listed), 2 = a dataset is missing or the
config is wrong.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from typing import Optional, Sequence


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the training config")
    parser.add_argument("--eval-only", action="store_true", help="check only DATASETS.TEST")
    parser.add_argument("--no-cache", action="store_true", help="read every file, even those that passed before")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides (must come last)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hvlformer").setLevel(logging.INFO)
    from hvlformer import setup_cfg
    from hvlformer.data.check import DatasetCheckError, check_datasets_from_cfg

    try:
        cfg = setup_cfg(argparse.Namespace(config_file=args.config_file, opts=args.opts), freeze=False)
        start = time.perf_counter()
        if args.no_cache:
            with tempfile.TemporaryDirectory() as tmp:  # an empty cache: every file is read
                cfg.DATASETS.CHECK.CACHE_DIR = tmp
                reports = check_datasets_from_cfg(cfg, training=not args.eval_only,
                                                  progress=not args.no_progress, contents=True)
        else:
            reports = check_datasets_from_cfg(cfg, training=not args.eval_only, progress=not args.no_progress,
                                              contents=True)
    except DatasetCheckError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    total = sum(r.total for r in reports.values())
    for name, report in reports.items():
        print(f"{name}: {report.total} entries OK ({report.checked} read, {report.cached} unchanged since they passed)")
    print(f"all {total} entries usable ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
