#!/usr/bin/env python
"""Which loss terms move the weights: each term's share of a training step's gradient.

The total loss of a step is a sum of terms (``loss_ce_0``, ``loss_mask_2``, ``loss_cmcr_mask``, ...), and with
Mask2Former's full-model gradient clipping (``SOLVER.CLIP_GRADIENTS``) and AdamW only the *direction* of their
summed gradient reaches the weights. So a term's weight in the config says little about its influence; this
tool measures it. For a few batches of the config's own training data it takes the gradient of every loss
family (a term summed over the decoder layers: ``loss_ce_0`` .. ``loss_ce`` -> ``loss_ce``) separately and
reports, averaged over the batches:

* ``norm``: the L2 norm of the family's gradient over all trainable parameters;
* ``share``: its projection on the total gradient, ``<g_family, g_total> / |g_total|^2``; the families' shares
  sum to 1 (a negative share pulls against the step);
* ``adam_share`` (when the checkpoint holds AdamW's state): the same after AdamW's per-parameter scaling
  ``g / (sqrt(v) + eps)`` with the checkpoint's second moments ``v``, i.e. for the step's direction as the
  optimizer applies it (momentum left out);
* for the two groups, ``supervised`` (every labeled-batch loss) and ``unlabeled``
  (``hvlformer.engine.train_loop.UNLABELED_LOSSES``, after the ramp-up / burn-in factor of that iteration),
  the same numbers, their cosine, and their norms per top-level module (backbone, text encoder, head, ...);
* ``clip_factor``: ``min(1, CLIP_VALUE / |g_total|)``, the factor the full-model clipping scales the step by.

    python tools/loss_gradients.py --config-file configs/tiny/hvlformer_tiny_shapes_semi.yaml --steps 4
    python tools/loss_gradients.py --run output/c23/semi_seed0            # every periodic checkpoint of a run
    python tools/loss_gradients.py --run output/c23/semi_seed0 --opts SEMI.ORACLE_LABELS True --json-out g.json

Without ``--run`` the model is the config's start (``MODEL.WEIGHTS``, empty = the pretrained CLIP start) at
iteration 0. With ``--run`` every ``model_NNNNNNN.pth`` of the run is measured at its own iteration (so the
burn-in and ramp-up factors of the run apply), on the run's own data; ``--opts`` changes the run's config
(e.g. to ask what the oracle's gradient would be at the self-trained model's weights). The model stays in
training mode, as in a step; nothing is written but the JSON.
"""
from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor

from _common import emit_json, finished_run_cfg, machine_environment, resolved_cfg, run_checkpoints  # tools/_common.py

def loss_family(name: str) -> str:
    """``loss_ce_0`` -> ``loss_ce``: a loss term without its decoder-layer suffix (names of other terms kept)."""
    return re.sub(r"_\d+$", "", name)


def gradient_shares(gradients: Dict[str, Tensor], unlabeled: Iterable[str],
                    preconditioner: Optional[Tensor] = None,
                    groups: Optional[Dict[str, Tensor]] = None) -> Dict[str, Any]:
    """Shares of flat gradients (``P``-vectors, one per loss family, over the same parameters) in their sum.

    Returns ``{"families": {name: {"norm", "share"}}, "supervised": {...}, "unlabeled": {...},
    "cosine_supervised_unlabeled", "total_norm"}``; ``share = <g, g_total> / |g_total|^2`` (the shares of the
    families, and of the two groups, sum to 1). ``preconditioner``: a ``P``-vector multiplied into every gradient
    first (AdamW's ``1 / (sqrt(v) + eps)``). A family named in ``unlabeled`` is in the unlabeled group, every other
    in the supervised group; a missing group is a zero vector (cosine 0). ``groups``: the unscaled group sums when
    the caller has them already (:func:`group_gradients` of the same ``gradients``), so they are not formed again."""
    scaled = {k: g * preconditioner if preconditioner is not None else g for k, g in gradients.items()}
    total = sum(scaled.values())
    total_sq = float(total.dot(total))

    def entry(grad: Tensor) -> Dict[str, float]:
        return {"norm": float(grad.norm()), "share": float(grad.dot(total)) / total_sq if total_sq > 0 else 0.0}

    groups = groups if groups is not None else group_gradients(gradients, unlabeled)
    # the preconditioner is elementwise, so the scaled groups are the scaled sums
    sup, unl = (g * preconditioner if preconditioner is not None else g for g in groups.values())
    denominator = float(sup.norm() * unl.norm())
    return {"families": {k: entry(g) for k, g in scaled.items()},
            "supervised": entry(sup), "unlabeled": entry(unl),
            "cosine_supervised_unlabeled": float(sup.dot(unl)) / denominator if denominator > 0 else 0.0,
            "total_norm": total_sq ** 0.5}


def group_gradients(gradients: Dict[str, Tensor], unlabeled: Iterable[str]) -> Dict[str, Tensor]:
    """``{"supervised", "unlabeled"}``: the sums of the flat gradients of the families outside and inside
    ``unlabeled`` (a zero vector for an empty group)."""
    unlabeled = set(unlabeled)
    zero = torch.zeros_like(next(iter(gradients.values())))
    groups = {"supervised": zero.clone(), "unlabeled": zero.clone()}
    for name, grad in gradients.items():
        groups["unlabeled" if name in unlabeled else "supervised"] += grad
    return groups


def module_norms(gradient: Tensor, names: Sequence[str], sizes: Sequence[int]) -> Dict[str, float]:
    """The L2 norm of a flat gradient over each top-level module (the first part of each parameter's name)."""
    squares: Dict[str, float] = {}
    for name, piece in zip(names, gradient.split(list(sizes))):
        module = name.split(".", 1)[0]
        squares[module] = squares.get(module, 0.0) + float(piece.dot(piece))
    return {k: v ** 0.5 for k, v in squares.items()}


def _average(reports: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The mean of nested dicts of numbers with the same keys (a key missing from a report counts as 0)."""
    first = reports[0]
    if isinstance(first, dict):
        keys = dict.fromkeys(k for r in reports for k in r)
        return {k: _average([r.get(k, 0.0) for r in reports]) for k in keys}
    return round(sum(reports) / len(reports), 6)


def measure(cfg, steps: int, weights: str, iteration: int) -> Dict[str, Any]:
    """Build the config's trainer (its model, optimizer, data and training step), load ``weights`` (the model, and
    AdamW's state when the file has it), and measure :func:`gradient_shares` on ``steps`` batches at
    ``iteration`` (the burn-in and ramp-up factors of that iteration apply)."""
    from detectron2.utils.env import seed_all_rng
    from hvlformer import build_trainer_class
    from hvlformer.engine.ema import unwrap
    from hvlformer.engine.train_loop import UNLABELED_LOSSES

    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else 0)  # the same batches and augmentations for the same command
    trainer = build_trainer_class(cfg)(cfg)
    step = trainer._trainer
    model = unwrap(step.model)
    loaded = {}
    if weights:  # the model, and the EMA teacher when the run has one; AdamW's state below
        loaded = trainer.checkpointer.load(weights, checkpointables=["teacher"] if trainer.teacher is not None else [])
        if trainer.teacher is not None and not trainer.teacher.loaded_from_checkpoint:
            trainer.teacher.copy_from(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    sizes = [p.numel() for p in params]
    # AdamW's state: detectron2 keeps it with the trainer's (``trainer/_trainer/optimizer``); older files at the top
    optimizer_state = loaded.get("optimizer") or loaded.get("trainer", {}).get("_trainer", {}).get("optimizer")
    preconditioner, without_state = None, 0
    if optimizer_state is not None:
        step.optimizer.load_state_dict(optimizer_state)
        group = step.optimizer.param_groups[0]
        pieces = []
        for param in params:
            state = step.optimizer.state.get(param, {})
            if "exp_avg_sq" not in state:  # never updated so far: left out of the scaled shares
                without_state += 1
                pieces.append(torch.zeros(param.numel()))
                continue
            bias = 1 - group["betas"][1] ** float(state["step"])
            pieces.append(1.0 / ((state["exp_avg_sq"].flatten() / bias).sqrt() + group["eps"]))
        preconditioner = torch.cat(pieces).to(params[0].device)
    step.iter = iteration
    clip = cfg.SOLVER.CLIP_GRADIENTS
    unlabeled = UNLABELED_LOSSES
    reports = []
    for _ in range(steps):
        losses, _stats = step.loss_terms(step.forward(step.next_batch()))
        by_family: Dict[str, Tensor] = {}
        for name, value in losses.items():
            by_family[loss_family(name)] = by_family.get(loss_family(name), 0.0) + value
        gradients = {}
        for family, value in by_family.items():
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True) if value.requires_grad \
                else [None] * len(params)
            gradients[family] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                           for g, p in zip(grads, params)]).detach()
        groups = group_gradients(gradients, unlabeled)
        report = gradient_shares(gradients, unlabeled, groups=groups)
        report["module_norms"] = {k: module_norms(g, names, sizes) for k, g in groups.items()}
        report["clip_factor"] = (min(1.0, clip.CLIP_VALUE / max(report["total_norm"], 1e-12))
                                 if clip.ENABLED and clip.CLIP_TYPE == "full_model" else 1.0)
        report["loss"] = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in by_family.items()}
        if preconditioner is not None:
            adam = gradient_shares(gradients, unlabeled, preconditioner, groups=groups)
            report["adam"] = {"families": {k: v["share"] for k, v in adam["families"].items()},
                              "supervised": adam["supervised"]["share"], "unlabeled": adam["unlabeled"]["share"],
                              "cosine_supervised_unlabeled": adam["cosine_supervised_unlabeled"],
                              "parameters_without_state": without_state}
        reports.append(report)
    return {"weights": Path(weights).name if weights else "(config start)", "iteration": iteration,
            "steps": steps, **_average(reports)}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config-file", type=Path, help="measure this config at its start (iteration 0)")
    source.add_argument("--run", type=Path, help="a train_net.py OUTPUT_DIR: measure each of its checkpoints")
    parser.add_argument("--steps", type=int, default=4, help="batches averaged per measurement")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE", help="config overrides")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:  # the trainer's OUTPUT_DIR: nothing of it is kept
        opts = [*args.opts, "DATALOADER.NUM_WORKERS", str(args.workers), "OUTPUT_DIR", scratch]
        if args.config_file is not None:
            cfg = resolved_cfg(args.config_file, opts)
            measurements = [measure(cfg, args.steps, cfg.MODEL.WEIGHTS, 0)]
        else:
            checkpoints = run_checkpoints(args.run)
            if not checkpoints:
                raise FileNotFoundError(f"{args.run}: no model_NNNNNNN.pth checkpoints")
            measurements = []
            for iteration, path in checkpoints:
                cfg = finished_run_cfg(args.run, path, opts)
                measurements.append(measure(cfg, args.steps, str(path), iteration))
    report = {"source": str(args.config_file or args.run), "opts": args.opts, "environment": machine_environment(),
              "measurements": measurements}
    emit_json(report, args.json_out)
    return report


if __name__ == "__main__":
    main()
