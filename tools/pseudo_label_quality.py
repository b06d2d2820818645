#!/usr/bin/env python
"""How good are the pseudo-labels a trained `shapes` run would give its unlabeled images?

For each run folder (a `train_net.py` output with ``config.yaml`` and ``model_final.pth``, e.g. the
supervised and semi runs of ``tools/semi_vs_supervised.py``), the run's model predicts each of its unlabeled
images as CMCR's teacher does (the original view, the last decoder layer's per-pixel class distribution,
``class_probability_maps``; without distribution alignment), and the pseudo-labels are compared with the
labels the training never read (the `shapes` label files of those images):

* ``mean_confidence``: the mean top probability; ``confident_fraction``: pixels whose top probability reaches ``SEMI.CONFIDENCE_THRESHOLD`` (the ones
  ``l_mask`` trains on), and ``confident_accuracy`` on them; ``accuracy``: the argmax on every pixel;
* per class: ``precision`` of the confident pseudo-labels that name it and ``recall`` (the share of its
  pixels that get a confident, right pseudo-label);
* ``confident_confusion``: ground truth (rows) -> confident pseudo-label (columns), pixel counts;
  ``label_pixels``: each class's pixels in the hidden labels.

    python tools/pseudo_label_quality.py output/c_v3/supervised_seed0 output/c_v3/semi_seed0 --json-out q.json

With ``--over-training`` every checkpoint a run saved (``model_0000099.pth`` is the model after 100 steps;
train with ``SOLVER.CHECKPOINT_PERIOD 100``) is evaluated in order, so the JSON shows when the pseudo-labels of
a class start to go wrong (``over_training``: one entry per checkpoint, with its ``iteration``):

    python tools/pseudo_label_quality.py output/ckpt100/semi_seed1 --over-training --json-out q.json
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from _common import emit_json, finished_run_cfg  # tools/_common.py (this folder is on sys.path when the tool runs)


class PseudoLabelTally:
    """Accumulates pixel counts of pseudo-labels against hidden labels (``K`` classes, ``ignore_label``)."""

    def __init__(self, num_classes: int, threshold: float, ignore_label: int = 255) -> None:
        self.num_classes, self.threshold, self.ignore_label = num_classes, threshold, ignore_label
        self.confusion = np.zeros((num_classes, num_classes), np.int64)  # all pixels, argmax
        self.confident_confusion = np.zeros((num_classes, num_classes), np.int64)
        self.confidence_sum = 0.0  # of the top probability over the labeled pixels

    def add(self, probs: torch.Tensor, label: np.ndarray) -> None:
        """``probs``: ``K x H x W`` per-pixel distributions; ``label``: ``H x W`` class ids."""
        confidence, pseudo = probs.max(dim=0)
        valid = (label != self.ignore_label) & (label < self.num_classes)
        truth, pseudo = label[valid].astype(np.int64), pseudo.numpy()[valid]
        confidence = confidence.numpy()[valid]
        confident = confidence >= self.threshold
        self.confidence_sum += float(confidence.astype(np.float64).sum())
        k = self.num_classes
        self.confusion += np.bincount(truth * k + pseudo, minlength=k * k).reshape(k, k)
        self.confident_confusion += np.bincount(truth[confident] * k + pseudo[confident], minlength=k * k).reshape(k, k)

    def summary(self, names: Sequence[str]) -> Dict[str, Any]:
        total, confident = self.confusion.sum(), self.confident_confusion.sum()
        right = np.diag(self.confident_confusion)
        named = self.confident_confusion.sum(axis=0)
        pixels = self.confusion.sum(axis=1)
        return {
            "pixels": int(total),
            "mean_confidence": round(self.confidence_sum / max(total, 1), 6),
            "confident_fraction": round(float(confident / max(total, 1)), 4),
            "confident_accuracy": round(float(right.sum() / max(confident, 1)), 4),
            "accuracy": round(float(np.diag(self.confusion).sum() / max(total, 1)), 4),
            "label_pixels": {n: int(pixels[i]) for i, n in enumerate(names)},
            "precision": {n: (round(float(right[i] / named[i]), 4) if named[i] else None) for i, n in enumerate(names)},
            "recall": {n: (round(float(right[i] / pixels[i]), 4) if pixels[i] else None) for i, n in enumerate(names)},
            "confident_confusion": {n: {m: int(self.confident_confusion[i, j]) for j, m in enumerate(names)
                                        if self.confident_confusion[i, j]} for i, n in enumerate(names)},
        }


def teacher_probabilities(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """``3 x H x W`` image (0-255, the model's input format) -> ``K x H x W`` class distributions of the last
    decoder layer, as CMCR's teacher computes them (upsampled bilinearly to the image)."""
    from hvlformer.modeling.cmcr import class_probability_maps

    with torch.no_grad():
        images = model.normalize(image[None].to(model.device).float())
        decoder = model.predict(images, model.encode_text()).decoder_outputs()
        probs = class_probability_maps(decoder["pred_logits"], decoder["pred_masks"])
        return F.interpolate(probs, size=image.shape[-2:], mode="bilinear", align_corners=False)[0].cpu()


def run_checkpoints(run_dir: Path) -> List[Tuple[int, Path]]:
    """``(iteration, path)`` of every periodic checkpoint of a run, in training order: detectron2 names the
    model after ``n`` steps ``model_{n-1:07d}.pth``. ``model_final.pth`` is left out (it repeats the last
    periodic one when ``MAX_ITER`` is a multiple of the period)."""
    found = []
    for path in run_dir.glob("model_*.pth"):
        match = re.fullmatch(r"model_(\d+)\.pth", path.name)
        if match:
            found.append((int(match.group(1)) + 1, path))
    return sorted(found)


def evaluate_run(run_dir: Path, num_images: Optional[int] = None, weights: Optional[Path] = None) -> Dict[str, Any]:
    """Pseudo-label statistics of one run on its own unlabeled `shapes` images, from its ``model_final.pth``
    or from ``weights`` (another checkpoint of the run)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from hvlformer.data.datasets.register_shapes import register_shapes_semi_split
    from hvlformer.predictor import HVLFormerPredictor

    cfg = finished_run_cfg(run_dir, weights)
    if cfg.DATASETS.SHAPES.NUM_LABELED <= 0:
        raise ValueError(f"{run_dir}: DATASETS.SHAPES.NUM_LABELED is 0, so the run has no unlabeled `shapes` images")
    register_shapes_semi_split(cfg)
    hidden = {r["file_name"]: r["sem_seg_file_name"] for r in DatasetCatalog.get("shapes_train")}
    unlabeled = DatasetCatalog.get("shapes_unlabeled")[:num_images]
    model = HVLFormerPredictor(cfg).model
    names = list(model.class_names)
    tally = PseudoLabelTally(len(names), cfg.SEMI.CONFIDENCE_THRESHOLD)
    for record in unlabeled:
        image = torch.from_numpy(read_image(record["file_name"], format=cfg.INPUT.FORMAT).copy())
        label = read_image(hidden[record["file_name"]]).astype(np.int64)
        tally.add(teacher_probabilities(model, image.permute(2, 0, 1)), label)
    return {"run": str(run_dir), "weights": Path(cfg.MODEL.WEIGHTS).name, "images": len(unlabeled),
            "threshold": cfg.SEMI.CONFIDENCE_THRESHOLD, **tally.summary(names)}


def evaluate_over_training(run_dir: Path, num_images: Optional[int] = None) -> Dict[str, Any]:
    """:func:`evaluate_run` on every periodic checkpoint of the run (:func:`run_checkpoints`)."""
    checkpoints = run_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}: no model_NNNNNNN.pth checkpoints (train with a SOLVER.CHECKPOINT_PERIOD "
                                "below SOLVER.MAX_ITER)")
    return {"run": str(run_dir), "over_training": [
        {"iteration": iteration, **evaluate_run(run_dir, num_images, weights=path)} for iteration, path in checkpoints]}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="OUTPUT_DIR of finished train_net.py runs on shapes")
    parser.add_argument("--num-images", type=int, default=None, help="only the first N unlabeled images")
    parser.add_argument("--over-training", action="store_true",
                        help="evaluate every periodic checkpoint of each run (model_NNNNNNN.pth), not only model_final")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"command": "python tools/pseudo_label_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": [(evaluate_over_training if args.over_training else evaluate_run)(run, args.num_images)
                       for run in args.runs]}
    emit_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
