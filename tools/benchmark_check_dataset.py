#!/usr/bin/env python
"""Time the up-front dataset check on generated VOC-sized image/mask pairs (docs/RESULTS.md, "Dataset
check"; docs/GETTING_STARTED.md, "Troubleshooting").

    python tools/benchmark_check_dataset.py                       # 10,000 pairs of 500x375, 2 processes
    python tools/benchmark_check_dataset.py --count 2000 --workers 1

Writes ``--count`` JPEG images (500x375, photo-like: smooth colour fields with edges) and single-channel PNG
masks (21 classes + 255 boundaries) in a temporary folder, then runs
:func:`hvlformer.data.check.check_dataset_dicts` twice: with an empty cache (every file read) and again
(cached). Printed: wall time, CPU time of this process and its workers (under contention from other jobs
the wall time grows but the CPU time does not), and the load average.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_pairs(folder: Path, count: int, distinct: int = 64, size=(500, 375)):
    """``count`` image/mask pairs; ``distinct`` different contents, copied (each file is read separately)."""
    rng = np.random.default_rng(0)
    width, height = size
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    yy, xx = np.mgrid[0:height, 0:width]
    sources = []
    for i in range(distinct):
        label = np.zeros((height, width), np.uint8)
        image = np.empty((height, width, 3), np.float32)
        base = rng.uniform(40, 220, 3)
        image[:] = base + 30 * np.sin(xx[..., None] / rng.uniform(20, 80) + rng.uniform(0, 6, 3))
        for _ in range(4):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(30, 120)
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            label[inside] = rng.integers(1, 21)
            image[inside] = rng.uniform(0, 255, 3) + rng.normal(0, 8, (int(inside.sum()), 3))
        edge = np.zeros_like(label, bool)
        edge[:-1] |= label[:-1] != label[1:]
        edge[:, :-1] |= label[:, :-1] != label[:, 1:]
        label[edge] = 255
        img_path, mask_path = folder / f"src_{i}.jpg", folder / f"src_{i}.png"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(img_path, quality=90)
        Image.fromarray(label).save(mask_path)
        sources.append((img_path, mask_path))
    dicts = []
    for i in range(count):
        img_src, mask_src = sources[i % distinct]
        img, mask = folder / "images" / f"{i:06d}.jpg", folder / "masks" / f"{i:06d}.png"
        shutil.copyfile(img_src, img)
        shutil.copyfile(mask_src, mask)
        dicts.append({"file_name": str(img), "sem_seg_file_name": str(mask)})
    return dicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from hvlformer.data.check import check_dataset_dicts

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dicts = make_pairs(Path(tmp) / "data", args.count)
        print(f"generated {args.count} pairs of 500x375 in {time.perf_counter() - start:.1f} s")
        cache = str(Path(tmp) / "cache")
        for run in ("first run (nothing cached)", "second run (cached)"):
            load = os.getloadavg()[0]
            wall, cpu = time.perf_counter(), _cpu()
            report = check_dataset_dicts(dicts, 21, 255, workers=args.workers, cache_dir=cache, progress=False)
            wall, cpu = time.perf_counter() - wall, _cpu() - cpu
            print(f"{run}: {report.total} pairs, {report.checked} read, {len(report.problems)} problems; "
                  f"wall {wall:.1f} s, CPU {cpu:.1f} s ({args.workers} processes), load average {load:.1f}")
            if report.problems:
                print(report.problems[:3], file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
