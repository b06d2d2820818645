"""How far the class queries move from their initial values over training (issue 13 (a)'s diagnostic).

The paper calls the textual queries "language anchors": each class's query comes from its CLIP text embedding
through HQG. Nothing in the objective keeps the HQG heads near their start (L^L holds the text embeddings t to
the reference T^0, not the queries), so whether the queries stay the text's is a measurement. For each run
folder (a ``train_net.py`` OUTPUT_DIR with its ``config.yaml`` and checkpoints) this tool rebuilds the model's
initial weights from the run's config and ``SEED`` (detectron2's ``default_setup`` seeds torch, numpy and random
with ``SEED`` before the trainer builds the model; the rebuilt weights equal those of a run at LR 0, see
tests/tools/test_query_drift.py) and compares them with every checkpoint's:

- ``cos_to_start``: cosine between a class's unweighted query ``Q_hat[e, k]`` (``E x K x D``: HQG of the class
  text embeddings, or the learned parameter of ``QUERY_SOURCE learnable``) and its initial one, mean over the
  levels and classes, and per class (mean over the levels);
- ``relative_change``: ``|q - q0| / |q0|``, mean over levels and classes;
- ``class_cosine``: mean cosine between the queries of two different classes of one level (1: the classes share
  one query; learnable N(0, 1) queries start near 0);
- ``text_cos_to_start``: cosine between each class's text embedding t_k and its initial one (the learnable
  context tokens move it; 1.0 for learnable queries, which ignore the text), mean over the classes.

    python tools/query_drift.py output/c32/anchors_frozen/supervised_seed0 \
        output/c32/anchors_frozen/supervised_learnable_seed0
    python tools/query_drift.py output/c32/anchors_frozen/*_seed[012] --json-out docs/results/query_drift.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from _common import emit_json, resolved_cfg, run_checkpoints, settings_of_older_runs


def initial_model(run: Path) -> nn.Module:
    """The model of ``run`` as its training started: built from the run's ``config.yaml`` (with the settings of
    keys added after the run, :func:`_common.settings_of_older_runs`) after seeding every generator with its
    ``SEED``, as ``train_net.py`` does. A ValueError for a run without a fixed seed."""
    from detectron2.utils.env import seed_all_rng

    from hvlformer import build_trainer_class

    config = run / "config.yaml"
    cfg = resolved_cfg(config, settings_of_older_runs(config))
    if cfg.SEED < 0:
        raise ValueError(f"{run}: SEED is {cfg.SEED} (a random seed), so its initial weights cannot be rebuilt")
    seed_all_rng(cfg.SEED)
    return build_trainer_class(cfg).build_model(cfg).eval()


@torch.no_grad()
def queries_and_text(model: nn.Module) -> Dict[str, Tensor]:
    """``{"queries": E x K x D unweighted queries Q_hat, "text": K x C class text embeddings t}``."""
    text = model.encode_text().float()
    htqg = model.htqg
    queries = htqg.hqg(text) if htqg.hqg is not None else htqg.learned_queries
    return {"queries": queries.detach().float().clone(), "text": text.clone()}


def drift(start: Dict[str, Tensor], now: Dict[str, Tensor]) -> Dict[str, Any]:
    """The measures of the module docstring between two :func:`queries_and_text` results."""
    q0, q1 = start["queries"], now["queries"]
    per_query = F.cosine_similarity(q0, q1, dim=-1)  # E x K
    normed = F.normalize(q1, dim=-1)
    num_classes = q1.shape[1]
    pairs = torch.einsum("ekd,eld->ekl", normed, normed)[:, ~torch.eye(num_classes, dtype=torch.bool)]
    return {
        "cos_to_start": round(per_query.mean().item(), 4),
        "cos_to_start_per_class": [round(v, 4) for v in per_query.mean(dim=0).tolist()],
        "relative_change": round(((q1 - q0).norm(dim=-1) / q0.norm(dim=-1)).mean().item(), 4),
        "class_cosine": round(pairs.mean().item(), 4),
        "text_cos_to_start": round(F.cosine_similarity(start["text"], now["text"], dim=-1).mean().item(), 4),
    }


def run_drift(run: Path) -> Dict[str, Any]:
    """Every checkpoint of ``run`` against its initial model: ``{"query_source", "classes", "steps": [...]}``,
    one entry per distinct training step (the periodic checkpoints, :func:`_common.run_checkpoints`, then
    ``model_final.pth`` unless it repeats the last of them)."""
    from detectron2.checkpoint import DetectionCheckpointer

    model = initial_model(run)
    start = queries_and_text(model)
    steps: Dict[int, Dict[str, Any]] = {0: {"step": 0, **drift(start, start)}}
    for step, path in run_checkpoints(run):
        DetectionCheckpointer(model).load(str(path))
        steps[step] = {"step": step, **drift(start, queries_and_text(model))}
    if (run / "model_final.pth").exists():
        extra = DetectionCheckpointer(model).load(str(run / "model_final.pth"))
        step = int(extra.get("iteration", -1)) + 1  # detectron2 stores the 0-based index of the last step done
        if step not in steps:
            steps[step] = {"step": step, **drift(start, queries_and_text(model))}
    return {"query_source": "text" if model.htqg.hqg is not None else "learnable",
            "classes": list(model.training_class_names),
            "steps": [steps[step] for step in sorted(steps)]}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="train_net.py output folders")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = {"command": "python tools/query_drift.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "runs": {}}
    for run in args.runs:
        result["runs"][str(run)] = record = run_drift(run)
        last = record["steps"][-1]
        print(f"{run}: {record['query_source']} queries, step {last['step']}: cos_to_start {last['cos_to_start']}, "
              f"class_cosine {record['steps'][0]['class_cosine']} -> {last['class_cosine']}", file=sys.stderr)
    emit_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
