#!/usr/bin/env python
"""(e) Open vocabulary on `shapes`: train the tiny HVLFormer with the ``text`` classifier on the 5
segmentation classes, then segment held-out images that also hold a shape kind never labeled for
segmentation, named only at inference (the predictor's ``set_vocabulary``, as ``demo.py --vocabulary``).

    python tools/open_vocabulary_shapes.py                    # unseen kind "ring", 3 seeds
    python tools/open_vocabulary_shapes.py --seeds 0 --iters 300 --unseen hexagon
    python tools/open_vocabulary_shapes.py --seeds 0 --output-dir output/e_paper \
        --opts MODEL.HVLFORMER.TEXT.DESCRIPTIONS datasets/descriptions/shapes.json   # other prompts

Per seed, one ``train_net.py`` run (the tiny config, ``MODEL.HVLFORMER.CLASSIFIER text``, all 400 images
labeled with the 5 classes, 96 px). Evaluation on the first ``--num-images`` images of the ``val`` split of
a shapes dataset with background + the 5 classes + the unseen kind (its own labels are only read for the
score):

* ``open``: vocabulary background + 5 classes + the unseen name; IoU per class (the unseen one is the
  target), and the seen classes' mIoU;
* ``closed``: the same images with the training vocabulary, the unseen kind's pixels ignored (``seen_cost`` =
  ``closed - open`` on the seen classes; the two arms are scored on different pixels, so this also charges
  the open arm for every unseen pixel it gives a seen class, which the closed arm is excused);
* ``closed_same_pixels``: the same closed predictions scored on the open arm's pixels, the unseen kind's
  pixels counted as false positives of the seen class each is given, as the open arm's are
  (``seen_cost_same_pixels`` = ``closed_same_pixels - open``: what naming the kind changes for the seen
  classes on the same pixels and labels);
* ``zero_shot_vlm``: the pretrained tiny CLIP alone (dense argmax of the plain prompts, as
  ``tools/pretrain_tiny_clip.py`` measures it) on the same images and vocabulary;
* ``described``: the open vocabulary again, every name given the sentences of the config's descriptions
  file (``MODEL.HVLFORMER.TEXT.DESCRIPTIONS``; the tiny configs' ``shapes_tiny_clip.json``, or
  ``datasets/descriptions/shapes.json`` when the key is empty), where otherwise the training names keep their
  training prompts and the unseen name gets the plain fallback prompt;
* ``ensemble``: ``open`` and ``closed`` again with ``TEST.CLIP_ENSEMBLE`` on (each query's class
  probabilities mixed with the pretrained tiny CLIP's classification of its mask, FC-CLIP's weights 0.4 /
  0.8; ``hvlformer/modeling/clip_ensemble.py``); its seen cost is measured against the plain closed vocabulary;
* ``pixel_ensemble``: the same with ``TEST.CLIP_ENSEMBLE.LEVEL pixel`` (the same rule and weights on each
  pixel's class distribution instead of each mask's, so the unseen name can win part of a mask);
* ``pixel_unseen_ensemble``: ``LEVEL pixel_unseen`` (per pixel, but the training names share what the mixture
  leaves them in the decoder's proportions, so CLIP only decides how much goes to the unseen name);
* ``unseen_queries``: why the unseen name wins or loses pixels: the SRE relevance of each class, the class
  distribution of the unseen name's own queries per level, and each class's queries' mask probability on
  the unseen kind's pixels.

With ``--distractors N`` (LSMSeg's category filter, thesis Sec. 5.2.5; docs/THESIS_MODULES.md), the same
trained runs are also evaluated with a large vocabulary: background + the 5 classes + ``N`` distractor names
(class names of the other datasets' description files in ``datasets/descriptions/``, none of them a shape
kind), once without and once with ``MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER`` (top ``--filter-top-k``):
the seen classes' mIoU (a pixel given a distractor name counts as wrong) and the inference time per image.

    python tools/open_vocabulary_shapes.py --distractors 200  # filter on vs off with 206 names

With ``--seen-classes N`` the runs are trained on the first N of the 10 shape kinds (``DATASETS.SHAPES.NUM_CLASSES``
N + 1; their own folders ``text_classifier_{N}seen_seed*``) and ``--unseen`` must be one of the kinds after them:
does a name never labeled transfer better when the decoder has seen more names than 5?

    python tools/open_vocabulary_shapes.py --seen-classes 9 --unseen crescent
    python tools/open_vocabulary_shapes.py --unseen crescent   # the same unseen kind after the 5 classes

The trained runs are reused from ``--output-dir`` when their command line and CLIP weights match.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

# tools/_common.py (this folder is on sys.path when the tool runs)
from _common import confusion_of, emit_json, finished_run_cfg, iou_table, mean_std, resolved_cfg, run_train_net
from tiny_clip_pretraining.data import PLAIN_TEMPLATE, jpeg_roundtrip  # tools/tiny_clip_pretraining/
from tiny_clip_pretraining.pretrainer import TinyClipPretrainer

ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = ROOT / "projects" / "HVLFormer" / "train_net.py"
CONFIG = ROOT / "configs" / "tiny" / "hvlformer_tiny_shapes.yaml"


DESCRIPTIONS = ROOT / "datasets" / "descriptions"
#: the CLIP ensemble arms: the prefix of their result fields -> their TEST.CLIP_ENSEMBLE.LEVEL
ENSEMBLE_ARMS = {"ensemble": "mask", "pixel_ensemble": "pixel", "pixel_unseen_ensemble": "pixel_unseen"}


def distractor_names(count: int, exclude: Sequence[str]) -> List[str]:
    """``count`` class names of the description files in ``datasets/descriptions/`` (files in name order,
    classes in file order, first occurrence kept), none of them in ``exclude`` (nor "background")."""
    skip = {n.lower() for n in exclude} | {"background"}
    names: List[str] = []
    for path in sorted(DESCRIPTIONS.glob("*.json")):
        for name in json.loads(path.read_text()).get("classes", {}):
            if name.lower() not in skip and name not in names:
                names.append(name)
    if count > len(names):
        raise ValueError(f"--distractors {count}: only {len(names)} distinct names in {DESCRIPTIONS}")
    return names[:count]


def evaluate_distractors(run_dir: Path, args: argparse.Namespace) -> Dict[str, Any]:
    """Seen-class IoUs and seconds per image with background + 5 classes + ``args.distractors`` names, the
    category filter off and on (the same checkpoint: the filter has no parameters)."""
    from hvlformer.data.shapes import _image_rng, render_shapes_image, shapes_class_names
    from hvlformer.predictor import HVLFormerPredictor

    seen = shapes_class_names(args.seen_classes + 1)
    vocabulary = seen + distractor_names(args.distractors, shapes_class_names(11))
    images = []
    for i in range(args.num_images):
        image, label = render_shapes_image(_image_rng(0, "openvocab", i), args.image_size, len(seen),
                                           guaranteed_class=1 + i % args.seen_classes)
        images.append((jpeg_roundtrip(image), label.astype(np.int64)))
    result: Dict[str, Any] = {"distractors": args.distractors, "vocabulary": len(vocabulary),
                              "top_k": args.filter_top_k}
    # reference: the same images with the training vocabulary only (what the distractors cost)
    for arm, names, on in (("no_distractors", seen, False), ("filter_off", vocabulary, False),
                           ("filter_on", vocabulary, True)):
        cfg = finished_run_cfg(run_dir, opts=["MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER", str(on),
                                              "MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER_TOP_K", str(args.filter_top_k)])
        predictor = HVLFormerPredictor(cfg)
        predictor.set_vocabulary(names)
        predictor(images[0][0], format="RGB")  # warm-up (text embeddings, allocations), not timed
        confusion = np.zeros((len(names), len(names)), np.int64)
        start = time.perf_counter()
        for image, label in images:
            confusion += confusion_of(predictor(image, format="RGB").labels, label, len(names))
        seconds = (time.perf_counter() - start) / len(images)
        iou = iou_table(confusion, names, ignore=range(len(seen), len(names)))
        result[arm] = {"seen_iou": iou, "seen_miou": statistics.mean(iou.values()), "seconds_per_image": seconds}
    return result


def train(seed: int, args: argparse.Namespace) -> Path:
    """Train (or reuse) the text-classifier model of one seed; returns its output folder."""
    out = args.output_dir / run_name(seed, args.seen_classes)
    # --opts first: the tool's own options (text classifier, classes, seed, size, steps, folder) win
    opts = [*args.opts, "MODEL.HVLFORMER.CLASSIFIER", "text", *class_opts(args.seen_classes),
            "DATASETS.SHAPES.SEED", str(seed), "SEED", str(seed), *size_opts(args), "SOLVER.MAX_ITER", str(args.iters),
            "TEST.EVAL_PERIOD", str(args.iters), "SOLVER.CHECKPOINT_PERIOD", str(args.iters),
            "DATALOADER.NUM_WORKERS", str(args.workers), "OUTPUT_DIR", str(out)]
    result = run_train_net(TRAIN_NET, CONFIG, opts, out, ROOT, args.threads,
                           finished=lambda run: (run / "model_final.pth").exists())
    if result is not None and result.returncode != 0:
        raise RuntimeError(f"seed {seed} failed:\n{result.stderr[-3000:]}")
    return out


def evaluate(run_dir: Path, args: argparse.Namespace) -> Dict[str, Any]:
    """Open- and closed-vocabulary IoUs of a trained run, and the tiny CLIP alone, on the same images."""
    from hvlformer.data.shapes import _image_rng, render_shapes_image
    from hvlformer.modeling.clip_loader import build_clip_model
    from hvlformer.modeling.text.descriptions import resolve_descriptions_path
    from hvlformer.predictor import HVLFormerPredictor

    seen, open_names, unseen_id = vocabulary(args.seen_classes, args.unseen)
    n_open, n_seen, unseen_label = len(open_names), len(seen), len(seen)  # the unseen name is the last class
    # the run's own config: inference reads the prompts, image size and every other key it was trained with
    cfg = finished_run_cfg(run_dir)
    predictor = HVLFormerPredictor(cfg)
    # the CLIP ensemble arms, by their fields' prefix
    ensemble_predictors = {
        arm: HVLFormerPredictor(finished_run_cfg(run_dir, opts=[
            "TEST.CLIP_ENSEMBLE.ENABLED", "True", *ensemble_weight_opts(args), "TEST.CLIP_ENSEMBLE.LEVEL", level]))
        for arm, level in ENSEMBLE_ARMS.items()}
    clip_model, tokenizer = build_clip_model(cfg.MODEL.HVLFORMER.CLIP.MODEL_NAME, cfg.MODEL.HVLFORMER.CLIP.PRETRAINED)
    vlm = TinyClipPretrainer(clip_model, tokenizer).eval()
    with torch.no_grad():
        prompts = vlm.encode_text(tokenizer([PLAIN_TEMPLATE.format(n) for n in open_names]))
    described_file = resolve_descriptions_path(cfg.MODEL.HVLFORMER.TEXT.DESCRIPTIONS, "shapes")
    # recorded relative to the repository when it lies in it
    shown_file = (str(Path(described_file).relative_to(ROOT))
                  if described_file and Path(described_file).is_relative_to(ROOT) else described_file)
    conf_open = np.zeros((n_open, n_open), np.int64)
    conf_described = np.zeros((n_open, n_open), np.int64)
    conf_closed = np.zeros((n_seen, n_seen), np.int64)
    conf_closed_all = np.zeros((n_open, n_open), np.int64)  # the closed predictions scored on the open arm's pixels
    conf_ensemble_open = {arm: np.zeros((n_open, n_open), np.int64) for arm in ENSEMBLE_ARMS}
    conf_ensemble_closed = {arm: np.zeros((n_seen, n_seen), np.int64) for arm in ENSEMBLE_ARMS}
    captured: Dict[str, Any] = {}
    predict = predictor.model.predict

    def recording_predict(*inputs, **kwargs):  # keep the network's raw outputs of the last image
        captured["out"] = predict(*inputs, **kwargs)
        return captured["out"]

    predictor.model.predict = recording_predict
    queries = QueryDiagnosis(open_names)
    conf_vlm = np.zeros((n_open, n_open), np.int64)
    images_with_unseen = 0
    for i in range(args.num_images):
        # images of all 10 kinds; pixels of kinds other than the seen + unseen are ignored
        image, label = render_shapes_image(_image_rng(0, "openvocab", i), args.image_size, 11,
                                           guaranteed_class=unseen_id if i % 2 == 0 else 1 + i % args.seen_classes)
        label = label.astype(np.int64)
        mapped = np.full_like(label, 255)
        for k in range(n_seen):
            mapped[label == k] = k
        mapped[label == unseen_id] = unseen_label
        images_with_unseen += int((mapped == unseen_label).any())
        image = jpeg_roundtrip(image)
        predictor.set_vocabulary(open_names)
        conf_open += confusion_of(predictor(image, format="RGB").labels, mapped, n_open)
        if (mapped == unseen_label).any():
            queries.add(captured["out"], mapped == unseen_label)
        # every name described alike (the descriptions file), instead of training prompts + one plain prompt
        predictor.set_vocabulary(open_names, descriptions_file=described_file)
        conf_described += confusion_of(predictor(image, format="RGB").labels, mapped, n_open)
        predictor.set_vocabulary(seen)
        closed_label = np.where(mapped == unseen_label, 255, mapped)
        closed_prediction = predictor(image, format="RGB").labels
        conf_closed += confusion_of(closed_prediction, closed_label, n_seen)
        conf_closed_all += confusion_of(closed_prediction, mapped, n_open)
        for arm, ensemble_predictor in ensemble_predictors.items():
            ensemble_predictor.set_vocabulary(open_names)
            conf_ensemble_open[arm] += confusion_of(ensemble_predictor(image, format="RGB").labels, mapped, n_open)
            ensemble_predictor.set_vocabulary(seen)
            conf_ensemble_closed[arm] += confusion_of(ensemble_predictor(image, format="RGB").labels, closed_label,
                                                      n_seen)
        with torch.no_grad():
            _, dense, (h, w) = vlm.encode_image(torch.from_numpy(image).permute(2, 0, 1)[None])
            cos = (dense @ prompts.t()).transpose(1, 2).reshape(1, n_open, h, w)
            pred = torch.nn.functional.interpolate(cos, size=label.shape, mode="bilinear",
                                                   align_corners=False).argmax(1)[0].numpy()
        conf_vlm += confusion_of(pred, mapped, n_open)
    predictor.model.predict = predict
    open_iou = iou_table(conf_open, open_names)
    described_iou = iou_table(conf_described, open_names)
    closed_iou = iou_table(conf_closed, seen)
    closed_same_pixels_iou = iou_table(conf_closed_all, open_names, ignore=[unseen_label])
    vlm_iou = iou_table(conf_vlm, open_names)
    ensemble_fields = {}
    for arm in ENSEMBLE_ARMS:  # TEST.CLIP_ENSEMBLE on, open and closed vocabulary
        open_arm, closed_arm = iou_table(conf_ensemble_open[arm], open_names), iou_table(conf_ensemble_closed[arm], seen)
        ensemble_fields.update({
            f"{arm}_open_iou": open_arm,
            f"{arm}_open_seen_miou": statistics.mean(open_arm[n] for n in seen),
            f"{arm}_closed_iou": closed_arm,
            f"{arm}_closed_seen_miou": statistics.mean(closed_arm.values()),
            f"{arm}_open_confusion": conf_ensemble_open[arm].tolist(),
        })
    return {
        "unseen": args.unseen, "seen_classes": seen[1:], "images": args.num_images, "images_with_unseen": images_with_unseen,
        "open_iou": open_iou, "open_seen_miou": statistics.mean(open_iou[n] for n in seen),
        "closed_iou": closed_iou, "closed_seen_miou": statistics.mean(closed_iou.values()),
        # the same closed-vocabulary predictions scored on the open arm's pixels: the unseen kind's pixels count,
        # as false positives of the seen class each is given (the open arm's seen IoUs count them alike)
        "closed_same_pixels_iou": closed_same_pixels_iou,
        "closed_same_pixels_seen_miou": statistics.mean(closed_same_pixels_iou.values()),
        # rows: ground truth, columns: prediction (open vocabulary): where the unseen kind's pixels go
        "open_confusion": conf_open.tolist(),
        "zero_shot_vlm_iou": vlm_iou,
        # the same images with the descriptions file's sentences for all names
        "described_iou": described_iou,
        "descriptions_file": shown_file,
        "described_seen_miou": statistics.mean(described_iou[n] for n in seen),
        "unseen_queries": queries.summary(),
        **ensemble_fields,
    }


class QueryDiagnosis:
    """What the network does with the unseen name's own queries, on the images that hold the unseen kind.

    The textual queries are ``E x K`` (level-major: query ``q`` belongs to class ``q % K``); the unseen name is
    the last class. Accumulates, per image: the SRE relevance of every class, each unseen query's class
    distribution (softmax over the K classes + no-object), and every query's mean mask probability on the
    unseen kind's pixels.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.relevance: List[np.ndarray] = []
        self.class_probs: List[np.ndarray] = []  # per image: levels x (K + 1)
        self.mask_on_unseen: List[np.ndarray] = []  # per image: Q

    def add(self, out: Any, unseen_pixels: np.ndarray) -> None:
        k = len(self.names)
        textual = out.level_queries.shape[0] * k  # the E x K textual queries come first (instance queries after)
        probs = out.pred_logits[0, :textual].float().softmax(-1)
        self.relevance.append(out.relevance[0].float().numpy())
        self.class_probs.append(probs[k - 1::k].numpy())
        masks = torch.nn.functional.interpolate(out.pred_masks[:, :textual].float().sigmoid(),
                                                size=unseen_pixels.shape, mode="bilinear", align_corners=False)[0]
        self.mask_on_unseen.append(masks[:, torch.from_numpy(unseen_pixels)].mean(dim=1).numpy())

    def summary(self) -> Dict[str, Any]:
        if not self.class_probs:
            return {}
        k = len(self.names)
        probs = np.mean(self.class_probs, axis=0)  # levels x (K + 1)
        masks = np.mean(self.mask_on_unseen, axis=0)
        per_class_mask = {n: round(float(masks[j::k].mean()), 3) for j, n in enumerate(self.names)}
        return {
            "images": len(self.class_probs),
            "relevance": {n: round(float(v), 3) for n, v in zip(self.names, np.mean(self.relevance, axis=0))},
            # mean class distribution of the unseen name's queries (one row per level)
            "class_probability_per_level": [{n: round(float(v), 3) for n, v in zip(self.names + ["no object"], row)}
                                            for row in probs],
            # mean mask probability on the unseen kind's pixels, over each class's queries
            "mask_on_unseen_pixels": per_class_mask,
        }


def vocabulary(seen_classes: int, unseen: str) -> Tuple[List[str], List[str], int]:
    """``(seen, open, unseen_id)``: background + the first ``seen_classes`` kinds, those + ``unseen``, and the
    unseen kind's label id in the 10-kind renderer. Raises if ``unseen`` is not a kind after the seen ones."""
    from hvlformer.data.shapes import shapes_class_names

    seen = shapes_class_names(seen_classes + 1)
    all_names = shapes_class_names(11)
    if unseen not in all_names[len(seen):]:
        raise ValueError(f"--unseen must be one of {all_names[len(seen):]} (a kind outside the "
                         f"{seen_classes} segmentation classes)")
    return seen, seen + [unseen], all_names.index(unseen)


def run_name(seed: int, seen_classes: int) -> str:
    """Folder of one seed's run: ``text_classifier_seed{seed}`` for the 5 segmentation classes (the runs made
    before ``--seen-classes`` existed keep their name), ``text_classifier_{N}seen_seed{seed}`` otherwise."""
    return f"text_classifier_seed{seed}" if seen_classes == 5 else f"text_classifier_{seen_classes}seen_seed{seed}"


def class_opts(seen_classes: int) -> List[str]:
    """``DATASETS.SHAPES.NUM_CLASSES`` for ``seen_classes`` labeled shape kinds; none for the tiny config's own 5
    (so that the command line, and with it the reuse of the earlier runs, is unchanged)."""
    if not 1 <= seen_classes <= 9:
        raise ValueError(f"--seen-classes must be 1..9 (one of the 10 kinds stays unseen), got {seen_classes}")
    return [] if seen_classes == 5 else ["DATASETS.SHAPES.NUM_CLASSES", str(seen_classes + 1)]


def size_opts(args: argparse.Namespace) -> List[str]:
    """The image-size options of training (inference reads them from the run's config): the predictor resizes
    a test image's long side to ``INPUT.RESIZE_BASE`` (times the largest jitter ratio), so inference with the
    tiny config's 128 would show a model trained at 96 px every shape 1.33x larger."""
    size = str(args.image_size)
    return ["DATASETS.SHAPES.IMAGE_SIZE", size, "INPUT.CROP.SIZE", f"({size}, {size})", "INPUT.RESIZE_BASE", size]


def ensemble_weight_opts(args: argparse.Namespace) -> List[str]:
    """The ``TEST.CLIP_ENSEMBLE`` weights of ``--ensemble-weights`` as config options (none: the config's own)."""
    if args.ensemble_weights is None:
        return []
    seen_weight, unseen_weight = args.ensemble_weights
    return ["TEST.CLIP_ENSEMBLE.SEEN_WEIGHT", str(seen_weight), "TEST.CLIP_ENSEMBLE.UNSEEN_WEIGHT", str(unseen_weight)]


def ensemble_weights(args: argparse.Namespace) -> List[float]:
    """``[SEEN_WEIGHT, UNSEEN_WEIGHT]`` of the ensemble arm (``--ensemble-weights`` or the config's: the tiny
    config with ``--opts``, which the runs were trained from and dumped)."""
    ensemble = resolved_cfg(CONFIG, [*args.opts, *ensemble_weight_opts(args)]).TEST.CLIP_ENSEMBLE
    return [ensemble.SEEN_WEIGHT, ensemble.UNSEEN_WEIGHT]


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--unseen", default="ring", help="the shape kind named only at inference")
    parser.add_argument("--seen-classes", type=int, default=5,
                        help="shape kinds labeled for segmentation (the first N of the 10; the tiny config's 5): "
                             "does the unseen name transfer better when the decoder saw more names?")
    parser.add_argument("--iters", type=int, default=1200)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "output" / "open_vocabulary")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--ensemble-weights", type=float, nargs=2, default=None, metavar=("SEEN", "UNSEEN"),
                        help="TEST.CLIP_ENSEMBLE.SEEN_WEIGHT / UNSEEN_WEIGHT of the ensemble arm (default: the config's)")
    parser.add_argument("--distractors", type=int, default=0,
                        help="also evaluate with this many distractor names, LSMSeg's category filter off vs on")
    parser.add_argument("--filter-top-k", type=int, default=32, help="classes the category filter keeps")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                        help="config overrides of training and evaluation (e.g. the paper's prompts: "
                             "MODEL.HVLFORMER.TEXT.DESCRIPTIONS datasets/descriptions/shapes.json); the tool's own "
                             "options win; give the runs their own --output-dir")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the class options checked before any run trains (a bad --unseen used to surface after seed 0's training)
    class_opts(args.seen_classes)
    vocabulary(args.seen_classes, args.unseen)
    per_seed = {}
    for seed in args.seeds:
        run_dir = train(seed, args)
        per_seed[seed] = evaluate(run_dir, args)
        if args.distractors > 0:
            per_seed[seed]["category_filter"] = evaluate_distractors(run_dir, args)
    summary = {}
    for key in ("open_seen_miou", "closed_seen_miou", "ensemble_open_seen_miou", "ensemble_closed_seen_miou"):
        summary[key] = [round(r[key], 2) for r in per_seed.values()]
    summary["unseen_iou"] = [round(r["open_iou"][args.unseen], 2) for r in per_seed.values()]
    summary["seen_cost"] = [round(r["closed_seen_miou"] - r["open_seen_miou"], 2) for r in per_seed.values()]
    # naming the unseen kind, measured on the same pixels and labels with and without its name
    summary["seen_cost_same_pixels"] = [round(r["closed_same_pixels_seen_miou"] - r["open_seen_miou"], 2)
                                        for r in per_seed.values()]
    for arm in ENSEMBLE_ARMS:
        summary[f"{arm}_seen_cost_same_pixels"] = [
            round(r["closed_same_pixels_seen_miou"] - r[f"{arm}_open_seen_miou"], 2) for r in per_seed.values()]
        summary[f"{arm}_unseen_iou"] = [round(r[f"{arm}_open_iou"][args.unseen], 2) for r in per_seed.values()]
        # against the trained model as it is (closed vocabulary, no ensemble)
        summary[f"{arm}_seen_cost"] = [round(r["closed_seen_miou"] - r[f"{arm}_open_seen_miou"], 2)
                                       for r in per_seed.values()]
    summary["zero_shot_vlm_unseen_iou"] = round(next(iter(per_seed.values()))["zero_shot_vlm_iou"][args.unseen], 2)
    if args.distractors > 0:
        for arm in ("no_distractors", "filter_off", "filter_on"):
            summary[f"distractors_seen_miou_{arm}"] = [round(r["category_filter"][arm]["seen_miou"], 2)
                                                       for r in per_seed.values()]
            summary[f"distractors_ms_per_image_{arm}"] = [
                round(1000 * r["category_filter"][arm]["seconds_per_image"], 1) for r in per_seed.values()]
    for key in [k for k in summary if k != "zero_shot_vlm_unseen_iou"]:
        values = summary[key]
        summary[key] = {"runs": values, **mean_std(values)}
    output = {"setup": {"command": "python tools/open_vocabulary_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                        "seeds": args.seeds, "seen_classes": args.seen_classes, "unseen": args.unseen,
                        "iterations": args.iters, "image_size": args.image_size, "opts": args.opts,
                        "ensemble_weights": ensemble_weights(args),
                        **({"distractors": args.distractors, "filter_top_k": args.filter_top_k}
                           if args.distractors > 0 else {})},
              "summary": summary, "per_seed": {str(k): v for k, v in per_seed.items()}}
    emit_json(output, args.json_out)
    return output


if __name__ == "__main__":
    main()
