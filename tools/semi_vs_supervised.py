#!/usr/bin/env python
"""Side-by-side comparisons of the tiny HVLFormer on `shapes` with few labels (issue 13's evidence): the
same labeled images, the same steps, the same pretrained start, several seeds; prints (and with
--json-out writes) a JSON table of mIoU (every seed, mean and spread) and of the differences.

    python tools/semi_vs_supervised.py                       # (c) 25 labeled + 375 unlabeled vs the 25 alone, 3 seeds
    python tools/semi_vs_supervised.py --experiment anchors  # (a) textual queries vs learnable (Mask2Former) queries
    python tools/semi_vs_supervised.py --experiment semi_and_anchors --parallel 3  # (c) and (a) at once
    python tools/semi_vs_supervised.py --experiment pretraining   # (b) pretrained tiny CLIP vs random init
    python tools/semi_vs_supervised.py --experiment table4 --seeds 0   # (d) the toy Table 4, one row per step
    python tools/semi_vs_supervised.py --experiment tqdm     # the paper's baseline (TQDM: class-name textual
                                                             # queries) vs learnable queries, Table 4's first rows
    python tools/semi_vs_supervised.py --experiment ceiling  # (c) next to all 400 images labeled: the room (c) has
    python tools/semi_vs_supervised.py --seeds 0 --iters 300  # a quick look
    python tools/semi_vs_supervised.py --semi-name t08 --semi-opts ... --only semi  # one arm (then without --only)
    python tools/semi_vs_supervised.py --ablations            # (c) plus each CMCR term switched off
    python tools/semi_vs_supervised.py --semi-name t08 --semi-opts SEMI.CONFIDENCE_THRESHOLD 0.8  # another setting
    python tools/semi_vs_supervised.py --opts MODEL.HVLFORMER.NO_OBJECT_WEIGHT 1.0 --output-dir output/c_noobj  # every arm
    python tools/semi_vs_supervised.py --clip-weights other.pt   # (c) from another pretrained tiny CLIP
    python tools/semi_vs_supervised.py --clip-model HVL-Tiny-ViT-P8 --clip-weights v3.pt   # ... of another architecture
    python tools/semi_vs_supervised.py --experiment caa      # (f) the thesis's modules: supervised vs + CAA,
    python tools/semi_vs_supervised.py --experiment ecac     #     + ECAC, + LSMSeg class refinement, + LSMSeg
    python tools/semi_vs_supervised.py --experiment class_refinement  # visual fusion (with the tiny RANDOM
    python tools/semi_vs_supervised.py --experiment fusion   #     TinyConvEncoder: a control, not SAM)

Each run is a separate `train_net.py` process (as a user would run it). The seed fixes the `shapes` dataset
itself (``DATASETS.SHAPES.SEED`` draws its 400 training and 50 val images), the labeled subset, the
initialisation and the data order. All arms of a seed share them, so the per-seed differences are paired;
the spread across seeds also holds the dataset's. Runs go to --output-dir; a finished run of the same
command line from the same CLIP weights (path and sha256, see ``tools/_common.run_train_net``) is not
repeated (its mIoU is read back from its log), so an interrupted benchmark continues where it stopped, and
experiments sharing an arm (the supervised textual run of (a), (b) and (c)) share its runs.
"""
from __future__ import annotations

import argparse
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

from _common import emit_json, machine_environment, mean_std, resolved_cfg, run_train_net  # tools/_common.py (this folder is on sys.path when the tool runs)
from plot_metrics import load_metrics  # tools/plot_metrics.py

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = ROOT / "projects" / "HVLFormer" / "train_net.py"
SUPERVISED = ROOT / "configs" / "tiny" / "hvlformer_tiny_shapes.yaml"
SEMI = ROOT / "configs" / "tiny" / "hvlformer_tiny_shapes_semi.yaml"
RANDOM = ROOT / "configs" / "tiny" / "hvlformer_tiny_shapes_random.yaml"
LABELED_ONLY = ["DATASETS.TRAIN", "('shapes_labeled',)"]
LEARNABLE = ["MODEL.HVLFORMER.QUERY_SOURCE", "learnable"]
# the first rows of the toy Table 4: no SRE, no PTRM, one query level
PLAIN = ["MODEL.HVLFORMER.SRE.MODE", "none", "MODEL.HVLFORMER.PTRM.MODE", "none", "MODEL.HVLFORMER.NUM_QUERY_LEVELS", "1"]
# the class-name prompt "a photo of a {name}." (TQDM's, the paper's Table 4 baseline) instead of the descriptions
NAMES = ["MODEL.HVLFORMER.TEXT.PROMPT_STYLE", "names"]
ONLY_MASK = ["SEMI.CLASS_CONSISTENCY", "False", "SEMI.ALIGN_CONSISTENCY", "False"]
VARIANTS = {
    "supervised": (SUPERVISED, LABELED_ONLY),
    # the ceiling of (c): the same config, steps and seed with every training image labeled
    "supervised_all_labeled": (SUPERVISED, ["DATASETS.TRAIN", "('shapes_train',)"]),
    "semi": (SEMI, []),
    "semi_no_mask": (SEMI, ["SEMI.MASK_CONSISTENCY", "False"]),
    "semi_no_class": (SEMI, ["SEMI.CLASS_CONSISTENCY", "False"]),
    "semi_no_align": (SEMI, ["SEMI.ALIGN_CONSISTENCY", "False"]),
    # (a) Mask2Former-style learnable queries, everything else the same (issue 13's baseline; the paper's Table 4
    # baseline is TQDM, textual queries from the class names: t4_tqdm)
    "supervised_learnable": (SUPERVISED, LEARNABLE + LABELED_ONLY),
    # (a) with anchors that hold: the HQG heads kept at their initial weights, so each class's query stays a fixed
    # function of its text embedding (which moves only through the context tokens, held to T^0 by L^L)
    "supervised_hqg_frozen": (SUPERVISED, LABELED_ONLY + ["SOLVER.LR_MULTIPLIERS", "[['htqg.hqg.', 0.0]]"]),
    # (b) the same config from random CLIP weights (HVL-Tiny-ViT, full learning rate on the encoder)
    "supervised_random": (RANDOM, LABELED_ONLY),
    # (d) toy Table 4: learnable-query baseline -> TQDM (textual queries from the class names, the paper's
    # baseline) -> +HTQG (descriptions) -> +HQG levels -> +SRE -> +PTRM (= supervised) -> +l_mask -> +l_class
    # -> +l_align (= semi)
    "t4_baseline": (SUPERVISED, LEARNABLE + PLAIN + LABELED_ONLY),
    "t4_tqdm": (SUPERVISED, NAMES + PLAIN + LABELED_ONLY),
    "t4_htqg": (SUPERVISED, PLAIN + LABELED_ONLY),
    "t4_hqg_levels": (SUPERVISED, PLAIN[:4] + LABELED_ONLY),
    "t4_sre": (SUPERVISED, PLAIN[2:4] + LABELED_ONLY),
    "semi_only_mask": (SEMI, ONLY_MASK),
    # (f) the thesis's modules (docs/THESIS_MODULES.md), each switched on in the supervised arm
    "supervised_caa": (SUPERVISED, LABELED_ONLY + ["MODEL.HVLFORMER.CAA.ENABLED", "True"]),
    "supervised_ecac": (SUPERVISED, LABELED_ONLY + ["MODEL.HVLFORMER.ECAC.ENABLED", "True"]),
    "supervised_class_refinement": (SUPERVISED, LABELED_ONLY + ["MODEL.HVLFORMER.LSMSEG.CLASS_REFINEMENT", "True"]),
    "supervised_fusion": (SUPERVISED, LABELED_ONLY + ["MODEL.HVLFORMER.LSMSEG.FUSION", "True",
                                                      "MODEL.HVLFORMER.LSMSEG.FUSION_ENCODER", "TinyConvEncoder"]),
}
# experiment -> (arms in table order, [(difference name, arm, minus arm)])
EXPERIMENTS = {
    "semi": (["supervised", "semi"], [("semi_minus_supervised", "semi", "supervised")]),
    "ceiling": (["supervised", "semi", "supervised_all_labeled"],
                [("semi_minus_supervised", "semi", "supervised"),
                 ("all_labeled_minus_supervised", "supervised_all_labeled", "supervised")]),
    "anchors": (["supervised", "supervised_learnable"],
                [("textual_minus_learnable", "supervised", "supervised_learnable")]),
    # (a) with the textual queries held at their text-derived start (HQG frozen), next to both query sources
    "anchors_frozen": (["supervised", "supervised_hqg_frozen", "supervised_learnable"],
                       [("hqg_frozen_minus_learnable", "supervised_hqg_frozen", "supervised_learnable"),
                        ("hqg_frozen_minus_textual", "supervised_hqg_frozen", "supervised"),
                        ("textual_minus_learnable", "supervised", "supervised_learnable")]),
    # (c) and (a) in one command (their runs at once, sharing the supervised arm)
    "semi_and_anchors": (["supervised", "semi", "supervised_learnable"],
                         [("semi_minus_supervised", "semi", "supervised"),
                          ("textual_minus_learnable", "supervised", "supervised_learnable")]),
    # (a) against the paper's own baseline: TQDM's textual queries from the class names vs learnable queries,
    # both as the toy Table 4's first rows (one level, no SRE, no PTRM)
    "tqdm": (["t4_baseline", "t4_tqdm"], [("tqdm_minus_learnable", "t4_tqdm", "t4_baseline")]),
    "pretraining": (["supervised", "supervised_random"],
                    [("pretrained_minus_random", "supervised", "supervised_random")]),
    "table4": (["t4_baseline", "t4_tqdm", "t4_htqg", "t4_hqg_levels", "t4_sre", "supervised", "semi_only_mask",
                "semi_no_align", "semi"], [("full_minus_baseline", "semi", "t4_baseline")]),
    **{module: (["supervised", f"supervised_{module}"],
                [(f"{module}_minus_supervised", f"supervised_{module}", "supervised")])
       for module in ("caa", "ecac", "class_refinement", "fusion")},
}
MIOU = re.compile(r"copypaste: mIoU,fwIoU,mACC,pACC\n.*copypaste: ([0-9.]+),")
# the per-class IoUs of detectron2's SemSegEvaluator, as its results dict is logged: 'IoU-square': np.float64(40.5)
CLASS_IOU = re.compile(r"'IoU-([^']+)': (?:np\.float64\()?([-0-9.eE+]+|nan)")


def run_dir(variant: str, seed: int, args: argparse.Namespace) -> Path:
    """The output folder of one run. Semi runs are named by --semi-name, so several semi settings can share
    one folder (and its supervised runs): semi_no_mask -> <semi-name>_no_mask."""
    name = args.semi_name + variant[len("semi"):] if variant.startswith("semi") else variant
    return args.output_dir / f"{name}_seed{seed}"


def class_ious(log_text: str) -> Dict[str, float]:
    """Per-class IoU (class name -> IoU, 2 decimals) of the last evaluation in a train_net log ({} if none)."""
    results = [line for line in log_text.splitlines() if "'IoU-" in line]
    return {name: round(float(value), 2) for name, value in CLASS_IOU.findall(results[-1])} if results else {}


def evaluations(run: Path, max_iter: int) -> Dict[str, List[float]]:
    """Every evaluation of a run of ``max_iter`` steps over training, from its ``metrics.json`` (read by
    ``tools/plot_metrics.load_metrics``: a resumed run's repeated steps keep their last value, a line cut by an
    interruption is skipped): ``iteration`` (the steps done, as ``TEST.EVAL_PERIOD`` counts them), ``mIoU`` (the
    model's) and, for a run with an EMA teacher evaluated at the same steps, ``teacher_mIoU`` (2 decimals); {}
    for a run without that file. detectron2 logs a periodic evaluation at the 0-based index of the step it
    follows (399 for 400 steps) and the final one at ``max_iter``."""
    if not (run / "metrics.json").exists():
        return {}
    series = load_metrics(str(run))
    steps, miou = series.get("sem_seg/mIoU", ((), ()))
    curve: Dict[str, List[float]] = {"iteration": [min(int(step) + 1, max_iter) for step in steps],
                                     "mIoU": [round(float(value), 2) for value in miou]}
    teacher_steps, teacher = series.get("teacher/sem_seg/mIoU", ((), ()))
    if len(teacher) and list(teacher_steps) == list(steps):
        curve["teacher_mIoU"] = [round(float(value), 2) for value in teacher]
    return curve


def same_prompts_as(config: Path) -> List[str]:
    """``MODEL.HVLFORMER.TEXT`` prompt options (descriptions file, prompt style, fallback and reference
    templates) of ``config``, as command-line opts."""
    text = resolved_cfg(config, []).MODEL.HVLFORMER.TEXT
    return ["MODEL.HVLFORMER.TEXT.DESCRIPTIONS", text.DESCRIPTIONS, "MODEL.HVLFORMER.TEXT.PROMPT_STYLE",
            text.PROMPT_STYLE, "MODEL.HVLFORMER.TEXT.FALLBACK_TEMPLATE", text.FALLBACK_TEMPLATE,
            "MODEL.HVLFORMER.TEXT.REFERENCE_TEMPLATE", text.REFERENCE_TEMPLATE]


def run(variant: str, seed: int, args: argparse.Namespace) -> float:
    config, extra = VARIANTS[variant]
    is_semi = variant.startswith("semi")
    out = run_dir(variant, seed, args)
    semi_opts = list(args.semi_opts) if is_semi else []
    opts = ["DATASETS.SHAPES.NUM_LABELED", str(args.num_labeled), "DATASETS.SHAPES.SEED", str(seed),
            "DATASETS.SHAPES.IMAGE_SIZE", str(args.image_size), "INPUT.CROP.SIZE", f"({args.image_size}, {args.image_size})",
            "INPUT.RESIZE_BASE", str(args.image_size), "SEED", str(seed), "SOLVER.MAX_ITER", str(args.iters),
            "TEST.EVAL_PERIOD", str(args.iters), "SOLVER.CHECKPOINT_PERIOD", str(args.iters),
            "DATALOADER.NUM_WORKERS", str(args.workers), "OUTPUT_DIR", str(out),
            # the random-init arm differs from the pretrained one in the weights only
            *(same_prompts_as(SUPERVISED) if config == RANDOM else []),
            *args.opts, *semi_opts, *extra]  # the ablation switch comes last, so it wins
    if args.clip_model and config != RANDOM:  # the random-init arm stays random
        opts += ["MODEL.HVLFORMER.CLIP.MODEL_NAME", args.clip_model]
    if args.clip_weights and config != RANDOM:
        opts += ["MODEL.HVLFORMER.CLIP.PRETRAINED", str(args.clip_weights)]
    # a finished run (final weights and an mIoU in its log) of the same command line and CLIP weights is reused
    result = run_train_net(TRAIN_NET, config, opts, out, ROOT, args.threads, finished=_logged_miou)
    if result is None:
        return float(MIOU.findall((out / "log.txt").read_text())[-1])
    if result.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed} failed:\n{result.stderr[-3000:]}")
    found = MIOU.findall(result.stdout + result.stderr)
    if not found:
        raise RuntimeError(f"{variant} seed {seed}: no mIoU in its output")
    print(f"{variant} seed {seed}: mIoU {found[-1]}", file=sys.stderr, flush=True)
    return float(found[-1])


def _logged_miou(out: Path) -> bool:
    log = out / "log.txt"
    return (out / "model_final.pth").exists() and log.exists() and bool(MIOU.findall(log.read_text()))


def unpaired_semi_keys(semi_opts: List[str]) -> List[str]:
    """The keys of ``KEY VALUE`` pairs in --semi-opts outside ``SEMI.``: settings the supervised arms do not get."""
    return [key for key in semi_opts[::2] if not key.startswith("SEMI.")]


def summarise(values: List[float]) -> Dict[str, float]:
    """Mean, population std, min, max (2 decimals) and the runs."""
    return {**mean_std(values),
            "min": round(min(values), 2), "max": round(max(values), 2), "runs": [round(v, 2) for v in values]}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=sorted(EXPERIMENTS), default="semi",
                        help="semi: (c) semi vs supervised; anchors: (a) textual vs learnable queries; semi_and_anchors: "
                             "(c) and (a) together; anchors_frozen: (a) with the HQG heads frozen as well; pretraining: "
                             "(b) pretrained vs random CLIP; table4: (d) the toy Table 4; tqdm: the paper's baseline (class-name "
                             "textual queries) vs learnable queries; ceiling: (c) next to every "
                             "image labeled; caa, ecac, "
                             "class_refinement, fusion: (f) supervised vs supervised + that thesis module")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=1200, help="training steps of every run")
    parser.add_argument("--num-labeled", type=int, default=25, help="labeled images of the 400 (1/16)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--ablations", action="store_true",
                        help="semi experiment: also the runs with one CMCR term off")
    parser.add_argument("--no-ablations", dest="ablations", action="store_false",
                        help="without the ablation runs (the default)")
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=None,
                        help="seeds of the ablation runs (default: the same as --seeds)")
    parser.add_argument("--row-seeds", type=int, nargs="+", default=None,
                        help="table4: seeds of the middle rows (default: the same as --seeds; the first and last "
                             "rows always use --seeds)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides of every run (e.g. the paper's prompts: MODEL.HVLFORMER.TEXT.DESCRIPTIONS "
                             "datasets/descriptions/shapes.json); give the runs their own --output-dir")
    parser.add_argument("--semi-opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides of the semi-supervised runs (e.g. SEMI.CONFIDENCE_THRESHOLD 0.8); "
                             "keys outside SEMI. are not given to the supervised arms (a warning, and the JSON's "
                             "setup.semi_opts_not_in_supervised_arms, say so): use --opts to change every arm")
    parser.add_argument("--semi-name", default="semi",
                        help="folder prefix of the semi-supervised runs: give each --semi-opts setting its own name "
                             "to compare settings in one --output-dir (the supervised runs are reused)")
    parser.add_argument("--clip-weights", default="",
                        help="MODEL.HVLFORMER.CLIP.PRETRAINED of every pretrained arm (default: the configs' own, "
                             "the shipped tiny CLIP)")
    parser.add_argument("--clip-model", default="",
                        help="MODEL.HVLFORMER.CLIP.MODEL_NAME of every pretrained arm, for --clip-weights of another "
                             "architecture (e.g. HVL-Tiny-ViT-P8 for the v3 candidate; default: the configs' own)")
    parser.add_argument("--only", nargs="+", default=None, metavar="ARM",
                        help="run only these arms of the experiment (e.g. semi, while another command trains the "
                             "supervised runs): the table of those arms and the differences between two of them; "
                             "the same command without --only then reuses every finished run for the whole table")
    parser.add_argument("--parallel", type=int, default=2, help="runs at the same time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers per run")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "output" / "semi_vs_supervised")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON table to this file")
    args = parser.parse_args(argv)
    arms, differences = EXPERIMENTS[args.experiment]
    # --semi-opts reach the semi arms only: a key outside SEMI.* (a model or solver setting) makes the semi arm
    # differ from the supervised one in more than the unlabeled images, which the differences must say
    unpaired = unpaired_semi_keys(args.semi_opts)
    if unpaired:
        print(f"semi_vs_supervised: --semi-opts {' '.join(unpaired)} reach the semi arms only, so the differences "
              "pair them with supervised runs without them; put such keys in --opts (every arm, their own "
              "--output-dir) to compare like with like", file=sys.stderr, flush=True)
    jobs = []  # seed by seed, so that an interrupted benchmark leaves complete comparisons
    for seed in sorted(set(args.seeds) | set(args.row_seeds or [])):
        for arm in arms:
            middle = args.experiment == "table4" and arm not in (arms[0], arms[-1])
            if seed in (args.row_seeds if middle and args.row_seeds else args.seeds):
                jobs.append((arm, seed))
    if args.experiment == "semi" and args.ablations:
        arms = arms + ["semi_no_mask", "semi_no_class", "semi_no_align"]
        jobs += [(v, s) for v in arms[2:] for s in (args.ablation_seeds or args.seeds)]
    if args.only:
        unknown = sorted(set(args.only) - set(arms))
        if unknown:
            parser.error(f"--only {' '.join(unknown)}: not an arm of --experiment {args.experiment} ({', '.join(arms)})")
        jobs = [job for job in jobs if job[0] in args.only]
        # a part of the experiment: its arms, and the differences between two of them
        arms = [arm for arm in arms if arm in args.only]
        differences = [d for d in differences if d[1] in args.only and d[2] in args.only]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda job: (job, run(job[0], job[1], args)), jobs))
    table: Dict[str, Dict[int, float]] = {}
    for (variant, seed), miou in results:
        table.setdefault(variant, {})[seed] = miou
    output: Dict[str, Any] = {
        "setup": {"experiment": args.experiment, "opts": args.opts, "semi_name": args.semi_name,
                  "semi_opts": args.semi_opts,
                  **({"semi_opts_not_in_supervised_arms": unpaired} if unpaired else {}),
                  "labeled": args.num_labeled, "unlabeled": 400 - args.num_labeled, "image_size": args.image_size,
                  "iterations": args.iters, "seeds": args.seeds, "clip_weights": args.clip_weights or "config default",
                  "clip_model": args.clip_model or "config default",
                  "batch": "8 labeled (+ 8 unlabeled for semi)",
                  "arms": {arm: {"config": str(VARIANTS[arm][0].relative_to(ROOT)), "opts": VARIANTS[arm][1]}
                           for arm in arms},
                  **({"only": arms} if args.only else {}),
                  "command": "python tools/semi_vs_supervised.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "environment": machine_environment()},
        "mIoU": {arm: {**summarise(list(table[arm].values())), "seeds": sorted(table[arm])} for arm in arms},
    }
    for name, arm, minus in differences:
        common = sorted(set(table[arm]) & set(table[minus]))
        output[name] = {**summarise([table[arm][s] - table[minus][s] for s in common]), "seeds": common}
    # per-class IoU of every run (arm -> class -> IoU per seed, in the order of mIoU's "seeds"): where a
    # difference comes from
    output["class_IoU"] = {}
    for arm in arms:
        per_seed = [class_ious((run_dir(arm, seed, args) / "log.txt").read_text()) for seed in sorted(table[arm])]
        output["class_IoU"][arm] = {name: [ious.get(name, float("nan")) for ious in per_seed]
                                    for name in per_seed[0]}
    # every evaluation over training (TEST.EVAL_PERIOD in --opts): arm -> seed -> iteration, mIoU (and the EMA
    # teacher's); the summary above reads the last one
    output["evaluations"] = {arm: {str(seed): evaluations(run_dir(arm, seed, args), args.iters) for seed in sorted(table[arm])}
                             for arm in arms}
    emit_json(output, args.json_out)
    return output


if __name__ == "__main__":
    main()
