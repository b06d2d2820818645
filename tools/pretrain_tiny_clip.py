#!/usr/bin/env python
"""Pretrain the project's tiny CLIP on synthetic ``shapes`` image-caption pairs, and measure its zero-shot use.

No pretrained CLIP can be downloaded for the CPU experiments, so the project makes its own: an open_clip
``HVL-Tiny-ViT-P8`` (8 px patches, a 16 x 16 token grid at 128 px) trained from scratch on images of all 10
shape kinds with generated captions (:mod:`hvlformer.data.captions`). The loss uses image-level text only,
never a pixel mask:

* ``clip``: the symmetric CLIP contrastive loss between the image embedding (f_CLS) and its caption;
* ``tag``: multi-label BCE between the image embedding and the plain prompts ``"a photo of a {name}."`` of
  the 10 names, against the caption's tags (which names it mentions);
* ``dense``: a multiple-instance term on the patch embeddings (the ``clip_dense`` path of the backbone):
  each patch gets a softmax over the prompts of background + 10 names; an image-level score per name is the
  global weighted rank pooling (GWRP, Kolesnikov & Lampert 2016) of its patch probabilities (weights
  ``d^rank``: a few top patches for shapes, a wide share of the image for background, which is tagged in
  every caption), with BCE against the tags;
* ``region`` (``--region-weight``): the ``dense`` term inside each ``--region-cell`` square of the image,
  against the kinds visible in that square (region tags, as region captions give; never a pixel mask);
* ``swap`` (``--swap-weight``, off in the shipped v1 / v2): image-to-text cross-entropy over the batch's
  captions plus one hard negative per image, its caption with one visible kind renamed to its colour twin
  (the kind of the nearest hue family, :func:`colour_twins`: square / cross, star / ellipse, ...), as
  NegCLIP's hard negatives (Yuksekgonul et al., ICLR 2023). Only the kind's shape and texture tell the
  two captions apart;
* ``names`` (``--name-weight``, off in v1 / v2, on in the v3 candidate): keeps the plain prompts of the 11
  names apart in the text space, the mean over pairs of ``relu(cos)^2``. A real CLIP's text tower tells names
  apart from language alone; here only the images can, and names whose images the image tower cannot yet
  tell apart stay tied (square / cross at cosine 0.96), which leaves the image tower no signal to separate
  them.

Images are drawn on the fly (split ``pretrain``; image ``i`` of step ``t`` is ``t * batch + i``), so the
run is deterministic for a given seed and thread count. Evaluation, with no segmentation training and the
plain prompt ``"a photo of a {name}."``:

* dense zero-shot segmentation of held-out 6-class ``shapes`` images (``val`` split, seed 0, the images
  ``shapes_val`` starts with; ``dev`` during probes, so nothing is tuned on them): per-patch argmax of the
  cosine to background + 5 class prompts, upsampled bilinearly; mIoU and per-class IoU;
* global presence AUROC per name (all 10) on held-out 10-kind images (split ``clipval``; ``clipdev`` in
  probes): the cosine between the image embedding and each prompt, against visibility.

    python tools/pretrain_tiny_clip.py --eval-every 250      # the shipped checkpoint (about 14 min, one thread)
    python tools/pretrain_tiny_clip.py --steps 150 --eval-split dev --out /tmp/probe.pt   # a probe
    python tools/pretrain_tiny_clip.py --eval-only PATH      # metrics of a checkpoint
    python tools/pretrain_tiny_clip.py --verify              # retrain, compare with the recorded metrics

The code lives in ``tools/tiny_clip_pretraining/`` (batches, the model wrapper and its losses, evaluation,
training); this file is the command line.

The checkpoint is the open_clip state dict in fp16, loadable with
``MODEL.HVLFORMER.CLIP.MODEL_NAME HVL-Tiny-ViT-P8 MODEL.HVLFORMER.CLIP.PRETRAINED <path>``; the metrics,
command, time and sha256 go to ``--metrics-out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from hvlformer.modeling.clip_loader import build_clip_model
from tiny_clip_pretraining import MODEL_NAME, evaluate, save_checkpoint, train  # tools/tiny_clip_pretraining/

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "projects" / "HVLFormer" / "hvlformer" / "modeling" / "backbone" / "pretrained" / "hvl_tiny_vit_p8_shapes_v2.pt"
DEFAULT_METRICS = ROOT / "docs" / "results" / "tiny_clip_pretraining.json"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint to write (fp16 state dict)")
    parser.add_argument("--metrics-out", type=Path, default=None,
                        help=f"metrics JSON (default: {DEFAULT_METRICS.relative_to(ROOT)} for the default --out, "
                             "else next to --out)")
    parser.add_argument("--model", default=MODEL_NAME,
                        help="open_clip architecture (hvlformer/modeling/backbone/model_configs/*.json); "
                             "HVL-Small-ViT-P8 is a wider, deeper image tower for probes")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: OpenMP threads spin badly on a shared, oversubscribed machine)")
    parser.add_argument("--fg-decay", type=float, default=0.9, help="GWRP decay of the shape kinds")
    parser.add_argument("--bg-decay", type=float, default=0.99, help="GWRP decay of background")
    parser.add_argument("--dense-mode", choices=("softmax", "sigmoid"), default="softmax",
                        help="sigmoid: per-kind MIL, background prompt trained towards 'no kind here'; softmax: one "
                             "softmax over background + kinds per patch, background pooled like a tag")
    parser.add_argument("--random-hue", type=float, default=0.0,
                        help="probability that a pretraining instance gets a random hue instead of its kind's colour "
                             "family (decouples colour from kind; the evaluation images keep the families)")
    parser.add_argument("--clip-weight", type=float, default=1.0)
    parser.add_argument("--tag-weight", type=float, default=1.0)
    parser.add_argument("--dense-weight", type=float, default=1.0)
    parser.add_argument("--region-weight", type=float, default=1.0,
                        help="weight of the region term (the dense term inside each --region-cell square, against "
                             "the kinds visible in it)")
    parser.add_argument("--region-cell", type=int, default=32, help="region side in pixels (a multiple of the patch)")
    parser.add_argument("--region-min-fraction", type=float, default=0.1,
                        help="a kind is tagged in a region when it covers at least this share of it")
    parser.add_argument("--region-decay", type=float, default=0.5, help="GWRP decay inside a region")
    parser.add_argument("--swap-weight", type=float, default=0.0,
                        help="weight of the hard negatives: each caption with one kind renamed to its colour twin")
    parser.add_argument("--name-weight", type=float, default=0.0,
                        help="weight of the term that keeps the 11 names' plain prompts apart in the text space")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="progress metrics on the dev images (never the evaluation ones) every N steps")
    parser.add_argument("--eval-split", choices=("val", "dev"), default="val",
                        help="'val': the held-out evaluation images; 'dev': other images, for probes")
    parser.add_argument("--num-seg-images", type=int, default=200)
    parser.add_argument("--num-presence-images", type=int, default=500)
    parser.add_argument("--eval-only", type=Path, default=None, help="evaluate this checkpoint and exit")
    parser.add_argument("--classes-file", default=None,
                        help="with --eval-only: draw the evaluation images from this class table of the generator "
                             "(DATASETS.SHAPES.CLASSES_FILE's values, e.g. shapes_square_cross_textures_swapped.json)")
    parser.add_argument("--verify", action="store_true",
                        help="retrain with the recorded command into a temporary file and compare the metrics")
    return parser.parse_args(argv)


def _metrics_path(args: argparse.Namespace) -> Path:
    if args.metrics_out is not None:
        return args.metrics_out
    return DEFAULT_METRICS if args.out.resolve() == DEFAULT_OUT.resolve() else args.out.with_suffix(".json")


# The options that decide the trained weights (recorded with the checkpoint, replayed by --verify).
TRAINING_OPTIONS = ("model", "steps", "batch_size", "lr", "weight_decay", "image_size", "seed", "threads", "fg_decay",
                    "bg_decay", "dense_mode", "clip_weight", "tag_weight", "dense_weight", "random_hue",
                    "region_weight", "region_cell", "region_min_fraction", "region_decay", "swap_weight",
                    "name_weight")
# Options added after a record was written had these values in it (off, or the only model there was); other
# absent options keep the defaults.
VALUE_WHEN_ABSENT = {"model": MODEL_NAME, "random_hue": 0.0, "region_weight": 0.0, "swap_weight": 0.0,
                     "name_weight": 0.0}


def _training_options(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: getattr(args, k) for k in TRAINING_OPTIONS}


def _replay_command(recorded: Dict[str, Any]) -> List[str]:
    """The command-line arguments that retrain a recorded checkpoint and evaluate it the same way."""
    opts = recorded["options"]
    command: List[Any] = []
    for key in TRAINING_OPTIONS:
        value = opts.get(key, VALUE_WHEN_ABSENT.get(key))
        if value is not None:
            command += ["--" + key.replace("_", "-"), value]
    command += ["--eval-split", recorded["eval_split"],
                "--num-seg-images", recorded["eval_options"]["num_seg_images"],
                "--num-presence-images", recorded["eval_options"]["num_presence_images"]]
    return [str(c) for c in command]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    eval_kwargs = dict(num_seg_images=args.num_seg_images, num_presence_images=args.num_presence_images,
                       image_size=args.image_size)
    if args.classes_file and args.eval_only is None:
        raise SystemExit("--classes-file is an evaluation option: use it with --eval-only")
    if args.eval_only is not None:
        clip_model, tokenizer = build_clip_model(args.model, str(args.eval_only))
        print(json.dumps(evaluate(clip_model, tokenizer, args.eval_split, classes_file=args.classes_file,
                                  **eval_kwargs), indent=2))
        return 0
    if args.verify:
        recorded = json.loads(_metrics_path(args).read_text())
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "verify.pt"
            main(_replay_command(recorded) + ["--out", str(out)])
            again = json.loads(out.with_suffix(".json").read_text())
        diffs = {"dense_miou": again["metrics"]["dense_miou"] - recorded["metrics"]["dense_miou"],
                 "global_auroc_min": again["metrics"]["global_auroc_min"] - recorded["metrics"]["global_auroc_min"],
                 "weights_equal": again["weights_sha256"] == recorded["weights_sha256"]}
        print(json.dumps({"verify": diffs}, indent=2))
        ok = abs(diffs["dense_miou"]) <= 1.0 and abs(diffs["global_auroc_min"]) <= 0.02
        return 0 if ok else 1

    clip_model, tokenizer, history = train(args)
    sha, digest = save_checkpoint(clip_model, args.out)
    start = time.perf_counter()
    reloaded, tokenizer = build_clip_model(args.model, str(args.out))  # evaluate what is shipped (fp16 weights)
    metrics = evaluate(reloaded, tokenizer, args.eval_split, **eval_kwargs)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    result = {
        "model": args.model,
        "checkpoint": str(args.out.resolve().relative_to(ROOT)) if args.out.resolve().is_relative_to(ROOT) else str(args.out),
        "sha256": sha,
        "weights_sha256": digest,
        "size_bytes": args.out.stat().st_size,
        "command": "python tools/pretrain_tiny_clip.py " + " ".join(shlex.quote(a) for a in argv_list),
        "options": _training_options(args),
        "eval_split": args.eval_split,
        "eval_options": {"num_seg_images": args.num_seg_images, "num_presence_images": args.num_presence_images},
        "train_time_s": history["train_time_s"],
        "eval_time_s": round(time.perf_counter() - start, 1),
        "metrics": metrics,
        "losses": history["losses"],
    }
    path = _metrics_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("checkpoint", "sha256", "size_bytes", "train_time_s")}))
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
