#!/usr/bin/env python
"""Time and peak memory of the demo on one large photo (docs/RESULTS.md, "Demo on a large
photo"; docs/GETTING_STARTED.md, "Troubleshooting": inference scale).

    python tools/benchmark_demo.py                                  # tiny config, 4000x3000, 2 threads
    python tools/benchmark_demo.py --size 2000x1500 --opts TEST.INFERENCE_SCALE.MIN_SIZE 0   # full resolution

A real photo that matplotlib ships (``grace_hopper.jpg``) is resized to ``--size`` and saved as a JPEG in a
temporary folder; ``projects/HVLFormer/demo/demo.py`` runs on it in a child process limited to ``--threads``
CPU threads. Printed: wall time, the child's CPU time (user + system; under contention from other jobs
the wall time grows but the CPU time does not), its peak resident memory, and the machine's load average.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=str(ROOT / "configs/tiny/hvlformer_tiny_shapes.yaml"))
    parser.add_argument("--size", default="4000x3000", help="W x H of the photo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for the demo")
    args = parser.parse_args()
    import matplotlib
    from PIL import Image

    width, height = (int(v) for v in args.size.lower().split("x"))
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / f"photo_{width}x{height}.jpg"
        Image.open(photo).convert("RGB").resize((width, height), Image.BICUBIC).save(image, quality=92)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        command = [sys.executable, str(ROOT / "projects/HVLFormer/demo/demo.py"), "--config-file", args.config_file,
                   "--input", str(image), "--output", str(Path(tmp) / "out"), "--no-progress"]
        if args.opts:
            command += ["--opts", *args.opts]
        load_before = os.getloadavg()
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return result.returncode
        written = sorted(p.name for p in (Path(tmp) / "out").iterdir())
    print(f"demo on a {width}x{height} photo ({args.config_file}, {args.threads} threads): wall {wall:.1f} s, "
          f"CPU {usage.ru_utime + usage.ru_stime:.1f} s, peak memory {usage.ru_maxrss / 1024 ** 2:.2f} GB; "
          f"load average before/after {load_before[0]:.1f}/{os.getloadavg()[0]:.1f}; wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
