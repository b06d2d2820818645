#!/usr/bin/env python
"""Does learning from unlabeled images help? Train the tiny HVLFormer on `shapes` with few labels twice —
supervised on the labeled part only, and semi-supervised (CMCR on the rest) — for several seeds, with the
same labeled images and the same number of steps, and print a JSON table of mIoU (mean and spread).

    python tools/semi_vs_supervised.py                       # 3 seeds, plus each CMCR term switched off
    python tools/semi_vs_supervised.py --seeds 0 --iters 300 --no-ablations   # a quick look
    python tools/semi_vs_supervised.py --semi-name t08 --semi-opts SEMI.CONFIDENCE_THRESHOLD 0.8  # another setting

Each run is a separate `train_net.py` process (as a user would run it); the seed fixes the labeled
subset, the initialisation and the data order. Runs go to --output-dir; a finished run is not repeated
(its mIoU is read back from its log), so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = ROOT / "projects" / "HVLFormer" / "train_net.py"
SUPERVISED = ROOT / "configs" / "tiny" / "hvlformer_tiny_shapes.yaml"
SEMI = ROOT / "configs" / "tiny" / "hvlformer_tiny_shapes_semi.yaml"
VARIANTS = {
    "supervised": (SUPERVISED, ["DATASETS.TRAIN", "('shapes_labeled',)"]),
    "semi": (SEMI, []),
    "semi_no_mask": (SEMI, ["SEMI.MASK_CONSISTENCY", "False"]),
    "semi_no_class": (SEMI, ["SEMI.CLASS_CONSISTENCY", "False"]),
    "semi_no_align": (SEMI, ["SEMI.ALIGN_CONSISTENCY", "False"]),
}
MIOU = re.compile(r"copypaste: mIoU,fwIoU,mACC,pACC\n.*copypaste: ([0-9.]+),")


def run(variant: str, seed: int, args: argparse.Namespace) -> float:
    config, extra = VARIANTS[variant]
    # semi runs are named by --semi-name, so several semi settings can share one folder (and its
    # supervised runs): semi_no_mask -> <semi-name>_no_mask
    is_semi = variant.startswith("semi")
    name = args.semi_name + variant[len("semi"):] if is_semi else variant
    out = args.output_dir / f"{name}_seed{seed}"
    semi_opts = list(args.semi_opts) if is_semi else []
    opts = ["DATASETS.SHAPES.NUM_LABELED", str(args.num_labeled), "DATASETS.SHAPES.SEED", str(seed),
            "DATASETS.SHAPES.IMAGE_SIZE", str(args.image_size), "INPUT.CROP.SIZE", f"({args.image_size}, {args.image_size})",
            "INPUT.RESIZE_BASE", str(args.image_size), "SEED", str(seed), "SOLVER.MAX_ITER", str(args.iters),
            "TEST.EVAL_PERIOD", str(args.iters), "SOLVER.CHECKPOINT_PERIOD", str(args.iters),
            "DATALOADER.NUM_WORKERS", str(args.workers), "OUTPUT_DIR", str(out),
            *semi_opts, *extra]  # the ablation switch comes last, so it wins
    # a finished run with the same command line is not repeated
    command = out / "benchmark_opts.json"
    log = out / "log.txt"
    if log.exists() and command.exists() and json.loads(command.read_text()) == opts:
        found = MIOU.findall(log.read_text())
        if found and (out / "model_final.pth").exists():
            return float(found[-1])
    out.mkdir(parents=True, exist_ok=True)
    command.write_text(json.dumps(opts))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    result = subprocess.run([sys.executable, str(TRAIN_NET), "--config-file", str(config), *opts], cwd=ROOT,
                            env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed:\n{result.stderr[-3000:]}")
    found = MIOU.findall(result.stdout + result.stderr)
    if not found:
        raise RuntimeError(f"{variant} seed {seed}: no mIoU in its output")
    print(f"{variant} seed {seed}: mIoU {found[-1]}", file=sys.stderr, flush=True)
    return float(found[-1])


def summarise(values: List[float]) -> Dict[str, float]:
    return {"mean": round(statistics.mean(values), 2),
            "std": round(statistics.pstdev(values), 2) if len(values) > 1 else 0.0,
            "min": round(min(values), 2), "max": round(max(values), 2), "runs": [round(v, 2) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=1200, help="training steps of every run")
    parser.add_argument("--num-labeled", type=int, default=25, help="labeled images of the 400 (1/16)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--no-ablations", action="store_true", help="skip the runs with one CMCR term off")
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=None,
                        help="seeds of the ablation runs (default: the same as --seeds)")
    parser.add_argument("--semi-opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides of the semi-supervised runs (e.g. SEMI.CONFIDENCE_THRESHOLD 0.8)")
    parser.add_argument("--semi-name", default="semi",
                        help="folder prefix of the semi-supervised runs: give each --semi-opts setting its own name "
                             "to compare settings in one --output-dir (the supervised runs are reused)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers per run")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "output" / "semi_vs_supervised")
    args = parser.parse_args()
    jobs = [(v, s) for v in ("supervised", "semi") for s in args.seeds]
    if not args.no_ablations:
        jobs += [(v, s) for v in ("semi_no_mask", "semi_no_class", "semi_no_align")
                 for s in (args.ablation_seeds or args.seeds)]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda job: (job, run(job[0], job[1], args)), jobs))
    table: Dict[str, List[float]] = {}
    for (variant, _), miou in results:
        table.setdefault(variant, []).append(miou)
    summary = {variant: summarise(values) for variant, values in table.items()}
    gain = [semi - sup for semi, sup in zip(table["semi"], table["supervised"])]
    print(json.dumps({
        "setup": {"semi_name": args.semi_name, "semi_opts": args.semi_opts, "labeled": args.num_labeled, "unlabeled": 400 - args.num_labeled, "image_size": args.image_size,
                  "iterations": args.iters, "seeds": args.seeds,
                  "batch": "8 labeled (+ 8 unlabeled for semi)"},
        "mIoU": summary,
        "semi_minus_supervised": summarise(gain),
    }, indent=2))


if __name__ == "__main__":
    main()
