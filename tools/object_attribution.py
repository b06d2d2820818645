#!/usr/bin/env python
"""Which queries name the objects of one class in a run's unlabeled `shapes` images?

HVLFormer's textual queries are class-bound: query ``e * K + k`` (level ``e``) is class ``k``'s. A pixel's
score for class ``c`` is ``sum_q softmax(c_q)[c] * sigmoid(m_q)`` (Mask2Former's semantic inference), so an
object of class ``a`` that is named ``b`` can be named by ``b``'s own queries (their masks cover the object)
or by ``a``'s queries (their class heads say ``b``). Every object of ``--class`` (an 8-connected region of the
hidden label map) gets the verdict of ``pseudo_label_quality.py`` (the class most of its confident pseudo-labels
name, or ``none``); per verdict, the mean over the objects of:

* ``queries``: for the object's class and for the verdict class, that class's queries (all levels): their
  probability of the class, of no-object (a class-bound query's "this class is not in the image") and their
  mask (sigmoid) over the object's pixels;
* ``verdict_score`` (for a verdict other than ``none``): the verdict class's score on the object, and the share
  of it that the verdict class's own queries give;
* ``relevance``: the SRE relevance (the ``B x K`` query weights) of both classes;
* ``verdict_in_image``: the share of the objects whose image holds an object of the verdict class (is the
  verdict class's query there for an object of its own, or for nothing else?).

    python tools/object_attribution.py output/a13/supervised_seed0 output/a13/semi_seed0 --class square --num-images 100
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from _common import emit_json  # tools/_common.py (this folder is on sys.path when the tool runs)
from pseudo_label_quality import (confident_names, label_objects, object_verdict, predict_image, probabilities_of,
                                  unlabeled_shapes)


def class_owners(num_queries: int, num_levels: int, num_classes: int) -> torch.Tensor:
    """``Q`` long: the class of each query (``e * K + k`` -> ``k``), -1 for the instance queries after the
    ``E * K`` textual ones."""
    owners = torch.full((num_queries,), -1, dtype=torch.long)
    owners[: num_levels * num_classes] = torch.arange(num_levels * num_classes) % num_classes
    return owners


def query_stats(class_probs: torch.Tensor, masks: torch.Tensor, owners: torch.Tensor, class_id: int,
                pixels: torch.Tensor) -> Dict[str, float]:
    """Mean over class ``class_id``'s queries of their probability of it, of no-object, and of their mask
    over ``pixels``. class_probs: ``Q x (K+1)``; masks: ``Q x H x W`` sigmoids; pixels: ``H x W`` bool."""
    own = owners == class_id
    return {"p_class": float(class_probs[own, class_id].mean()), "p_no_object": float(class_probs[own, -1].mean()),
            "mask_on_object": float(masks[own][:, pixels].mean())}


def image_objects(model: torch.nn.Module, image: torch.Tensor, label: np.ndarray, class_id: int,
                  threshold: float) -> List[Dict[str, Any]]:
    """One row per object of ``class_id`` in one image (``3 x H x W``, 0-255; ``label``: ``H x W``)."""
    outputs = predict_image(model, image)
    decoder = outputs.decoder_outputs()
    class_probs = decoder["pred_logits"][0].float().softmax(-1).cpu()  # Q x (K+1)
    num_classes = class_probs.shape[1] - 1
    masks = F.interpolate(decoder["pred_masks"].float(), size=image.shape[-2:], mode="bilinear",
                          align_corners=False)[0].sigmoid().cpu()  # Q x H x W
    owners = class_owners(class_probs.shape[0], model.num_query_levels, num_classes)
    named = confident_names(probabilities_of(decoder, image.shape[-2:]), threshold)
    relevance = outputs.relevance[0].float().cpu()
    count, objects = label_objects(label, class_id)
    rows = []
    for index in range(1, count + 1):
        inside = objects == index
        pixels = torch.from_numpy(inside)
        verdict = object_verdict(named[inside], num_classes)
        row: Dict[str, Any] = {"verdict": verdict, "own": query_stats(class_probs, masks, owners, class_id, pixels),
                               "relevance_own": float(relevance[class_id])}
        if verdict < num_classes and verdict != class_id:
            row["verdict_queries"] = query_stats(class_probs, masks, owners, verdict, pixels)
            row["relevance_verdict"] = float(relevance[verdict])
            row["verdict_in_image"] = float((label == verdict).any())
        if verdict < num_classes:
            contributions = class_probs[:, verdict, None] * masks[:, pixels]  # Q x pixels
            score = contributions.sum(0).mean()
            row["verdict_score"] = {"score": float(score), "from_own_queries": float(
                contributions[owners == verdict].sum(0).mean() / score.clamp_min(1e-12))}
        rows.append(row)
    return rows


def mean_rows(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The mean of every number (nested one level) over ``rows``, 4 decimals; the rows of one verdict group,
    which all hold the same keys."""
    out: Dict[str, Any] = {"objects": len(rows)}
    for key in rows[0]:
        if key == "verdict":
            continue
        if isinstance(rows[0][key], dict):
            out[key] = {k: round(float(np.mean([r[key][k] for r in rows])), 4) for k in rows[0][key]}
        else:
            out[key] = round(float(np.mean([r[key] for r in rows])), 4)
    return out


def attribute_run(run_dir: Path, class_name: str, num_images: Optional[int] = None) -> Dict[str, Any]:
    """Object verdicts of ``class_name`` in one run's unlabeled images, grouped, with the query statistics."""
    cfg, model, images = unlabeled_shapes(run_dir, num_images)
    if cfg.MODEL.HVLFORMER.QUERY_SOURCE != "text":
        raise ValueError(f"{run_dir}: MODEL.HVLFORMER.QUERY_SOURCE is {cfg.MODEL.HVLFORMER.QUERY_SOURCE!r}; only "
                         "textual queries are bound to a class")
    names = list(model.class_names)
    if class_name not in names:
        raise ValueError(f"--class {class_name!r} is not one of the run's classes {names}")
    rows = [row for image, label in images
            for row in image_objects(model, image, label, names.index(class_name), cfg.SEMI.CONFIDENCE_THRESHOLD)]
    by_verdict: Dict[str, Any] = {}
    for verdict in sorted({r["verdict"] for r in rows}):
        group = [r for r in rows if r["verdict"] == verdict]
        by_verdict[names[verdict] if verdict < len(names) else "none"] = mean_rows(group)
    return {"run": str(run_dir), "class": class_name, "objects": len(rows), "by_verdict": by_verdict}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="OUTPUT_DIR of finished train_net.py runs on shapes")
    parser.add_argument("--class", dest="class_name", required=True, help="the class whose objects are attributed")
    parser.add_argument("--num-images", type=int, default=None, help="only the first N unlabeled images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"command": "python tools/object_attribution.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": [attribute_run(run, args.class_name, args.num_images) for run in args.runs]}
    emit_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
