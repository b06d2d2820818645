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
  ``unconfident_confusion``: the same for the argmax of the pixels below the threshold (the teacher's leaning
  where ``l_mask`` does not train yet);
  ``label_pixels``: each class's pixels in the hidden labels;
* ``objects``: per class, its objects (8-connected regions of the hidden label map) by verdict, the class
  most of an object's confident pixels name, or ``none`` when none of its pixels is confident; whether a
  class is lost object by object (whole objects named another class) or pixel by pixel;
  ``objects_by_area``: the same verdicts split by the object's area as a share of the image
  (``OBJECT_AREA_BINS``): whether the objects lost are the small ones, whose texture has the fewest pixels;
* ``recall_edge`` / ``recall_inside``: recall on the class's pixels within ``EDGE_WIDTH`` pixels of its
  border and on the others; where in an object the confident, right pseudo-labels are.

    python tools/pseudo_label_quality.py output/c_v3/supervised_seed0 output/c_v3/semi_seed0 --json-out q.json

With ``--over-training`` every checkpoint a run saved (``model_0000099.pth`` is the model after 100 steps;
train with ``SOLVER.CHECKPOINT_PERIOD 100``) is evaluated in order, so the JSON shows when the pseudo-labels of
a class start to go wrong (``over_training``: one entry per checkpoint, with its ``iteration``):

    python tools/pseudo_label_quality.py output/ckpt100/semi_seed1 --over-training --json-out q.json

With ``--layer N`` the pseudo-labels are those of decoder layer N (1..N, CMCR's numbering) instead of the last:
CMCR trains each layer of the weak and strong views against the same layer of the original view (paper eq. 2),
so every layer's pseudo-labels are training targets.

With ``--teacher clip`` the labels scored are those of the dense CLIP guidance (``SEMI.CLIP_GUIDANCE_*``): the
run's frozen pretrained CLIP, zero-shot, with its confidence threshold; what that term would train towards.
``--edge-margin M`` scores them with ``SEMI.CLIP_GUIDANCE_EDGE_MARGIN M`` (object interiors only):

    python tools/pseudo_label_quality.py output/c23/supervised_seed0 --teacher clip --edge-margin 1 --json-out q.json

With ``--opts KEY VALUE ...`` the scored models take config overrides, e.g. ``SEMI.LABEL_REFINEMENT_ITERATIONS 10``:
the pseudo-labels as the image-guided refinement (``hvlformer.modeling.label_refinement``) would make them. A run
trained with the refinement is scored with it (its own config).

With ``--classes-file`` the runs are scored on the same unlabeled images drawn from another class table
(``DATASETS.SHAPES.CLASSES_FILE``: the same layouts and labels), e.g. with the textures of square and cross
swapped: whether a model names the pair by outline or by texture.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from _common import emit_json, finished_run_cfg, run_checkpoints  # tools/_common.py (this folder is on sys.path when the tool runs)


EDGE_WIDTH = 2  # pixels of an object's border that count as its edge (recall_edge / recall_inside)
# Upper bounds of the object-area bins of ``objects_by_area``, as shares of the image's pixels (the last bin is
# open). At 96 px a whole `shapes` object covers about 1.5-13 % of the image; the bins were fixed before any run
# was scored with them.
OBJECT_AREA_BINS = (0.02, 0.05)


def area_bin_names(bins: Sequence[float] = OBJECT_AREA_BINS) -> List[str]:
    """``(0.02, 0.05)`` -> ``["<2%", "2-5%", ">=5%"]``."""
    pct = [f"{100 * b:g}" for b in bins]
    return [f"<{pct[0]}%"] + [f"{a}-{b}%" for a, b in zip(pct, pct[1:])] + [f">={pct[-1]}%"]


def area_bin(area: int, image_pixels: int, bins: Sequence[float] = OBJECT_AREA_BINS) -> int:
    """The index of the bin of an object of ``area`` pixels in an image of ``image_pixels`` pixels."""
    return int(np.searchsorted(np.asarray(bins) * image_pixels, area, side="right"))


def label_objects(label: np.ndarray, class_id: int) -> Tuple[int, np.ndarray]:
    """The objects of one class in an ``H x W`` label map: ``(count, H x W int32 map)`` of its 8-connected
    regions (0 = not this class, 1..count = one object each)."""
    import cv2

    count, objects = cv2.connectedComponents((label == class_id).astype(np.uint8), connectivity=8)
    return count - 1, objects


def object_edges(label: np.ndarray, width: int = EDGE_WIDTH) -> np.ndarray:
    """``H x W`` bool: the pixels within ``width`` pixels (chessboard distance) of a pixel of another label,
    i.e. the edge band of every region; the image border is not an edge."""
    import cv2

    padded = np.pad(label, width, mode="edge").astype(np.int32)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    # a pixel is inside when the window around it holds one label only (its min equals its max)
    low = cv2.erode(padded.astype(np.float32), kernel)
    high = cv2.dilate(padded.astype(np.float32), kernel)
    return (low != high)[width:-width, width:-width]


def confident_names(probs: torch.Tensor, threshold: float) -> np.ndarray:
    """``K x H x W`` distributions -> ``H x W`` int: the confident pseudo-label of each pixel, or ``K`` where
    the top probability is below ``threshold``."""
    confidence, pseudo = probs.max(dim=0)
    return np.where(confidence.numpy() >= threshold, pseudo.numpy(), probs.shape[0])


def object_verdict(named: np.ndarray, num_classes: int) -> int:
    """The class most of an object's confident pixels name (``named``: :func:`confident_names` inside the
    object), or ``num_classes`` when none of them is confident."""
    votes = np.bincount(named, minlength=num_classes + 1)[:num_classes]
    return int(votes.argmax()) if votes.any() else num_classes


def sparse_rows(matrix: np.ndarray, names: Sequence[str], columns: Optional[Sequence[str]] = None
                ) -> Dict[str, Dict[str, int]]:
    """``R x C`` counts -> ``{row name: {column name: count}}`` without the zero counts; the columns are named
    ``columns``, or ``names`` like the rows."""
    columns = names if columns is None else columns
    return {n: {m: int(matrix[i, j]) for j, m in enumerate(columns) if matrix[i, j]} for i, n in enumerate(names)}


class PseudoLabelTally:
    """Accumulates pixel counts of pseudo-labels against hidden labels (``K`` classes, ``ignore_label``),
    and object verdicts (see the module docstring)."""

    def __init__(self, num_classes: int, threshold: float, ignore_label: int = 255) -> None:
        self.num_classes, self.threshold, self.ignore_label = num_classes, threshold, ignore_label
        self.confusion = np.zeros((num_classes, num_classes), np.int64)  # all pixels, argmax
        self.confident_confusion = np.zeros((num_classes, num_classes), np.int64)
        self.confidence_sum = 0.0  # of the top probability over the labeled pixels
        # area bin -> class -> verdict (a class id, or num_classes for "no confident pixel") -> objects; summed
        # over the bins, the objects of each class by verdict
        self.object_verdicts_by_area = np.zeros((len(OBJECT_AREA_BINS) + 1, num_classes, num_classes + 1), np.int64)
        # class -> [edge pixels, right edge pixels, inside pixels, right inside pixels]
        self.edge_counts = np.zeros((num_classes, 4), np.int64)

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
        self._add_objects(probs, label, valid)

    def _add_objects(self, probs: torch.Tensor, label: np.ndarray, valid: np.ndarray) -> None:
        named = confident_names(probs, self.threshold)
        right = (named == label) & valid
        edge = object_edges(label) & valid
        inside = ~edge & valid
        for class_id in range(self.num_classes):
            of_class = label == class_id
            self.edge_counts[class_id] += [(edge & of_class).sum(), (edge & of_class & right).sum(),
                                           (inside & of_class).sum(), (inside & of_class & right).sum()]
            count, objects = label_objects(label, class_id)
            for index in range(1, count + 1):
                inside_object = objects == index
                verdict = object_verdict(named[inside_object], self.num_classes)
                self.object_verdicts_by_area[area_bin(int(inside_object.sum()), label.size), class_id, verdict] += 1

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
            "confident_confusion": sparse_rows(self.confident_confusion, names),
            "unconfident_confusion": sparse_rows(self.confusion - self.confident_confusion, names),
            "objects": sparse_rows(self.object_verdicts_by_area.sum(axis=0), names, [*names, "none"]),
            "objects_by_area": {bin_name: sparse_rows(verdicts, names, [*names, "none"])
                                for bin_name, verdicts in zip(area_bin_names(), self.object_verdicts_by_area)},
            "recall_edge": {n: (round(float(e[1] / e[0]), 4) if e[0] else None) for n, e in zip(names, self.edge_counts)},
            "recall_inside": {n: (round(float(e[3] / e[2]), 4) if e[2] else None) for n, e in zip(names, self.edge_counts)},
        }


def teacher_probabilities(model: torch.nn.Module, image: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
    """``3 x H x W`` image (0-255, the model's input format) -> ``K x H x W`` class distributions of decoder layer
    ``layer`` (1..N, :func:`decoder_layer`; ``None`` = the last), as CMCR's teacher computes them for that layer
    (upsampled bilinearly to the image), refined with the image's colours when the run's config switches
    ``SEMI.LABEL_REFINEMENT_*`` on (the model's ``label_refinement``), as l_mask's targets are."""
    probs = probabilities_of(decoder_layer(predict_image(model, image).decoder_outputs(), layer), image.shape[-2:])
    refinement = getattr(model, "label_refinement", None)
    if refinement is not None:
        probs = refinement(probs[None], image[None].float())[0]
    return probs


def decoder_layer(decoder: Dict[str, Any], layer: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Decoder layer ``layer`` (1..N, CMCR's numbering: ``layer_outputs``, which leaves out the prediction of
    the queries before the first layer) of a model's decoder outputs; ``None`` = the last layer, N."""
    from hvlformer.modeling.cmcr import layer_outputs

    layers = layer_outputs(decoder)
    if layer is None:
        return layers[-1]
    if not 1 <= layer <= len(layers):
        raise ValueError(f"decoder layer {layer} does not exist: the model has layers 1..{len(layers)}")
    return layers[layer - 1]


def predict_image(model: torch.nn.Module, image: torch.Tensor) -> Any:
    """The model's outputs (``HVLFormerOutput``, without gradient) for one ``3 x H x W`` image (0-255, the
    model's input format) and the model's own class embeddings."""
    with torch.no_grad():
        return model.predict(model.normalize(image[None].to(model.device).float()), model.encode_text())


def probabilities_of(decoder: Dict[str, torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """The last decoder layer's outputs of one image (``pred_logits`` ``1 x Q x (K+1)``, ``pred_masks``
    ``1 x Q x h x w``) -> ``K x H x W`` class distributions at ``size`` (``H, W``), on the CPU."""
    from hvlformer.modeling.cmcr import class_probability_maps

    probs = class_probability_maps(decoder["pred_logits"], decoder["pred_masks"])
    return F.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)[0].cpu()


def unlabeled_shapes(run_dir: Path, num_images: Optional[int] = None, weights: Optional[Path] = None,
                     classes_file: Optional[str] = None, opts: Sequence[str] = ()
                     ) -> Tuple[Any, torch.nn.Module, Iterator[Tuple[torch.Tensor, np.ndarray]]]:
    """A finished `shapes` run's config, its model (``model_final.pth`` or ``weights``) and its unlabeled
    images: ``(cfg, model, iterator of (3 x H x W image 0-255 as the model reads it, H x W hidden label))``;
    the labels are the `shapes` label files the training never read. ``classes_file``: the same images drawn
    from another class table (``DATASETS.SHAPES.CLASSES_FILE``: the same layouts and labels, e.g. other
    textures), to ask which cue the trained model reads. ``opts``: more config overrides of the model."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from hvlformer.data.datasets.register_shapes import register_shapes_semi_split
    from hvlformer.predictor import HVLFormerPredictor

    cfg = finished_run_cfg(run_dir, weights, opts=[*(["DATASETS.SHAPES.CLASSES_FILE", classes_file] if classes_file else []),
                                                   *opts])
    if cfg.DATASETS.SHAPES.NUM_LABELED <= 0:
        raise ValueError(f"{run_dir}: DATASETS.SHAPES.NUM_LABELED is 0, so the run has no unlabeled `shapes` images")
    register_shapes_semi_split(cfg)
    hidden = {r["file_name"]: r["sem_seg_file_name"] for r in DatasetCatalog.get("shapes_train")}
    unlabeled = DatasetCatalog.get("shapes_unlabeled")[:num_images]

    def images() -> Iterator[Tuple[torch.Tensor, np.ndarray]]:
        for record in unlabeled:
            image = torch.from_numpy(read_image(record["file_name"], format=cfg.INPUT.FORMAT).copy())
            yield image.permute(2, 0, 1), read_image(hidden[record["file_name"]]).astype(np.int64)

    return cfg, HVLFormerPredictor(cfg).model, images()


def clip_guidance_probabilities(model: torch.nn.Module, guidance: Any, image: torch.Tensor,
                                mask_stride: int = 4) -> torch.Tensor:
    """``3 x H x W`` image (0-255) -> ``K x H x W``: the frozen CLIP's zero-shot class distributions of the dense
    CLIP guidance (``SEMI.CLIP_GUIDANCE_*``, :class:`~hvlformer.modeling.clip_guidance.CLIPGuidance`), at the
    image's resolution. With the guidance's edge margin (``SEMI.CLIP_GUIDANCE_EDGE_MARGIN``), the pixels it
    drops at the mask resolution (``H / mask_stride``, where training applies it) get the uniform distribution,
    so they count as below any threshold."""
    from hvlformer.modeling.clip_guidance import interior
    from hvlformer.modeling.unlabeled_objective import clip_zero_shot_inputs

    # one pass of E_I^0 for both sizes (the scores at the image's, the margin at the mask's resolution)
    inputs = clip_zero_shot_inputs(model, guidance, image[None])
    probs = guidance.targets(*inputs, image.shape[-2:]).probs[0].cpu()
    if guidance.edge_margin > 0:
        size = [math.ceil(side / mask_stride) for side in image.shape[-2:]]
        labels = guidance.targets(*inputs, size).labels
        kept = interior(labels, probs.shape[0], guidance.edge_margin)[:, None].float()
        kept = F.interpolate(kept, size=tuple(image.shape[-2:]), mode="nearest")[0, 0].bool().cpu()
        probs = torch.where(kept, probs, torch.full_like(probs, 1.0 / probs.shape[0]))
    return probs


def evaluate_run(run_dir: Path, num_images: Optional[int] = None, weights: Optional[Path] = None,
                 classes_file: Optional[str] = None, layer: Optional[int] = None,
                 teacher: str = "model", edge_margin: Optional[int] = None, opts: Sequence[str] = ()) -> Dict[str, Any]:
    """Pseudo-label statistics of one run on its own unlabeled `shapes` images (drawn from ``classes_file``
    when given), from its ``model_final.pth`` or from ``weights`` (another checkpoint of the run), of decoder
    layer ``layer`` (1..N; ``None`` = the last, the one the inference reads). ``teacher="clip"``: the labels
    of the dense CLIP guidance instead (the run's frozen pretrained CLIP, its prompts and
    ``SEMI.CLIP_GUIDANCE_THRESHOLD``; the same for every run of one CLIP, whatever the run learned), with
    ``edge_margin`` in place of the run's ``SEMI.CLIP_GUIDANCE_EDGE_MARGIN`` when given. ``opts``: config overrides
    (``KEY VALUE ...``) of the scored model, e.g. ``SEMI.LABEL_REFINEMENT_ITERATIONS 10`` to score the run's
    pseudo-labels as that refinement would make them."""
    if teacher not in ("model", "clip"):
        raise ValueError(f"teacher must be 'model' or 'clip', got {teacher!r}")
    # the frozen reference tower E_I^0 is built at inference only when an inference switch needs it
    opts = [*opts, *(["TEST.CLIP_ENSEMBLE.ENABLED", "True"] if teacher == "clip" else [])]
    if edge_margin is not None:
        if teacher != "clip":
            raise ValueError("edge_margin is a setting of the CLIP guidance's labels (teacher='clip')")
        opts += ["SEMI.CLIP_GUIDANCE_EDGE_MARGIN", str(edge_margin)]
    cfg, model, images = unlabeled_shapes(run_dir, num_images, weights, classes_file, opts)
    names = list(model.class_names)
    if teacher == "clip":
        from hvlformer.modeling.clip_guidance import CLIPGuidance

        guidance = CLIPGuidance(cfg, clip_logit_scale=model.clip_ensemble.logit_scale)
        threshold = cfg.SEMI.CLIP_GUIDANCE_THRESHOLD
        probabilities = lambda image: clip_guidance_probabilities(model, guidance, image,
                                                                  cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE)
    else:
        threshold = cfg.SEMI.CONFIDENCE_THRESHOLD
        probabilities = lambda image: teacher_probabilities(model, image, layer)
    tally = PseudoLabelTally(len(names), threshold)
    count = 0
    for image, label in images:
        tally.add(probabilities(image), label)
        count += 1
    return {"run": str(run_dir), "weights": Path(cfg.MODEL.WEIGHTS).name, "images": count,
            **({"classes_file": classes_file} if classes_file else {}),
            **({"layer": layer} if layer is not None else {}),
            **({"teacher": teacher} if teacher != "model" else {}),
            **({"edge_margin": guidance.edge_margin} if teacher == "clip" else {}),
            **({"opts": list(opts)} if opts else {}),
            "threshold": threshold, **tally.summary(names)}


def evaluate_over_training(run_dir: Path, num_images: Optional[int] = None, opts: Sequence[str] = ()) -> Dict[str, Any]:
    """:func:`evaluate_run` on every periodic checkpoint of the run (:func:`run_checkpoints`)."""
    checkpoints = run_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}: no model_NNNNNNN.pth checkpoints (train with a SOLVER.CHECKPOINT_PERIOD "
                                "below SOLVER.MAX_ITER)")
    return {"run": str(run_dir), "over_training": [
        {"iteration": iteration, **evaluate_run(run_dir, num_images, weights=path, opts=opts)} for iteration, path in checkpoints]}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="OUTPUT_DIR of finished train_net.py runs on shapes")
    parser.add_argument("--num-images", type=int, default=None, help="only the first N unlabeled images")
    parser.add_argument("--over-training", action="store_true",
                        help="evaluate every periodic checkpoint of each run (model_NNNNNNN.pth), not only model_final")
    parser.add_argument("--classes-file", default=None,
                        help="score each run on its unlabeled images drawn from this class table of the generator "
                             "(DATASETS.SHAPES.CLASSES_FILE's values, e.g. shapes_square_cross_textures_swapped.json: "
                             "the same layouts and labels, other textures); not with --over-training")
    parser.add_argument("--layer", type=int, default=None,
                        help="score decoder layer N's pseudo-labels (1..DEC_LAYERS; CMCR trains each layer of the "
                             "views against the same layer of the original view) instead of the last layer's; "
                             "not with --over-training")
    parser.add_argument("--teacher", choices=("model", "clip"), default="model",
                        help="clip: score the labels of the dense CLIP guidance (SEMI.CLIP_GUIDANCE_*: the run's frozen "
                             "pretrained CLIP, zero-shot) instead of the run's model; not with --over-training or --layer")
    parser.add_argument("--edge-margin", type=int, default=None,
                        help="with --teacher clip: the guidance's SEMI.CLIP_GUIDANCE_EDGE_MARGIN instead of the run's "
                             "(the pixels it drops count as unconfident)")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides of the scored models, e.g. SEMI.LABEL_REFINEMENT_ITERATIONS 10 (score the "
                             "pseudo-labels as the image-guided refinement makes them); with --teacher model only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.classes_file and args.over_training:
        parser.error("--classes-file scores the final weights only: leave out --over-training")
    if args.layer is not None and args.over_training:
        parser.error("--layer scores the final weights only: leave out --over-training")
    if args.teacher == "clip" and (args.over_training or args.layer is not None):
        parser.error("--teacher clip scores the frozen CLIP, which training does not change: leave out --over-training "
                     "and --layer")
    if args.opts and args.teacher != "model":
        parser.error("--opts overrides the scored model's config: use it with --teacher model")
    if len(args.opts) % 2:
        parser.error("--opts takes KEY VALUE pairs")
    if args.edge_margin is not None and args.teacher != "clip":
        parser.error("--edge-margin sets the CLIP guidance's labels: use it with --teacher clip")
    result = {"command": "python tools/pseudo_label_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": [evaluate_over_training(run, args.num_images, opts=args.opts) if args.over_training
                       else evaluate_run(run, args.num_images, classes_file=args.classes_file, layer=args.layer,
                                         teacher=args.teacher, edge_margin=args.edge_margin, opts=args.opts)
                       for run in args.runs]}
    emit_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
