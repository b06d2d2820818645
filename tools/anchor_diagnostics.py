#!/usr/bin/env python
"""What a trained tiny `shapes` run's language anchors and fine-tuned image tower still know (issue 13).

For each run (the OUTPUT_DIR of a finished ``train_net.py`` run from the project's tiny CLIP) it reports:

* ``text``: how far apart the pretrained text tower puts the classes, for three phrasings: the plain prompt
  ``"a photo of a {name}."`` (what the tiny CLIP was trained and evaluated with), the run's class prompts
  (the dataset descriptions its CoOp text encoder starts from, averaged per class) and its reference prompts
  T0 (``TEXT.REFERENCE_TEMPLATE``, the anchor of L^L). Per phrasing: the square/cross cosine and the mean and
  largest cosine between different classes. Also the cosines of the run's trained class embeddings t.
* ``finetuned_tower``: the run's fine-tuned image tower (``backbone.visual``) put back into the pretrained
  CLIP, scored like the pretraining tool scores a CLIP (``tools/pretrain_tiny_clip.py``'s dense zero-shot
  with plain prompts, and the twin patch probe) on its ``dev`` images at the run's image size. A high twin
  probe here next to a low square IoU in the run's own evaluation says the segmentation head, not the
  encoder, loses the class.
* ``head``: the segmentation head on the val images and on the run's labeled training images
  (:func:`head_diagnostics`): where the square pixels go and which query (level, class) takes them when they
  are called cross; the class probabilities of the cross queries on images with a square and no cross
  (their fixed-matching target there is "no object") and of the square queries; linear probes square vs cross
  on ``clip_dense`` and ``mask_features``, which say whether the pixel features still tell them apart; and the
  per-class IoU of the model's output next to its own L^VL pixel classifier (``clip_dense`` against the trained
  class embeddings t, :func:`vision_language_scores`) on the same images.
* ``vision_language_before_training``: the L^VL pixel classifier of an untrained build of the run's config
  on the val images (:func:`initial_vision_language`), next to the trained one in ``head``.
* ``decoder_queries``: how far apart the decoder's first attention puts the classes (:func:`query_geometry`
  of the content queries it receives, after SRE and PTRM, and its level positional embeddings, on val images):
  the content queries' length next to the positional embedding's, and the cosine of ``content + position``
  between classes of a level (near 1: every class of the level attends to the same pixels).
* ``query_probe``: whether the decoder's final embeddings of the cross queries know if a cross is in the image
  (:func:`query_presence_probe`: a linear probe fitted on the training images, scored on val, next to the class
  head's own decision).

    python tools/anchor_diagnostics.py output/c_conv/supervised_seed0 --json-out d.json
    python tools/anchor_diagnostics.py output/c_scale1/supervised_seed0 --parts decoder_queries  # one section
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import tiny_clip_pretraining as tiny  # tools/tiny_clip_pretraining/ (this folder is on sys.path when the tool runs)
from _common import confusion_of, emit_json, finished_run_cfg, iou_table


def cosine_summary(embeddings: Tensor, names: Sequence[str]) -> Dict[str, Any]:
    """``K x C`` embeddings -> square/cross cosine, mean and max cosine between different classes, the matrix."""
    e = F.normalize(embeddings.float(), dim=-1)
    cos = e @ e.T
    off = cos[~torch.eye(len(names), dtype=torch.bool)]
    return {"square_cross": round(float(cos[names.index("square"), names.index("cross")]), 3),
            "mean_between_classes": round(float(off.mean()), 3), "max_between_classes": round(float(off.max()), 3),
            "cosine": [[round(float(v), 3) for v in row] for row in cos]}


def load_run(run_dir: Path):
    """(cfg, trained HVLFormer model in eval mode) of a finished run."""
    from hvlformer.predictor import HVLFormerPredictor

    cfg = finished_run_cfg(run_dir)
    return cfg, HVLFormerPredictor(cfg).model.eval()


def finetuned_clip(cfg, model) -> "tiny.TinyClipPretrainer":
    """The run's pretrained CLIP with its image tower replaced by the run's fine-tuned one (its text tower is
    the pretrained one)."""
    from hvlformer.modeling.clip_loader import build_clip_model

    c = cfg.MODEL.HVLFORMER.CLIP
    if not c.PRETRAINED:
        raise ValueError("the run starts from random CLIP weights: there is no pretrained text tower to compare with")
    clip_model, tokenizer = build_clip_model(c.MODEL_NAME, c.PRETRAINED)
    clip_model.visual.load_state_dict(model.backbone.visual.state_dict(), strict=True)
    return tiny.TinyClipPretrainer(clip_model.eval(), tokenizer).eval()


def prompt_cosines(clip_model, tokenizer, names: Sequence[str], class_prompts: Sequence[Sequence[str]],
                   reference_prompts: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """:func:`cosine_summary` of the plain prompts, of the class prompts (``K`` lists, each class's
    embeddings averaged and renormalised, as the CoOp text encoder's start) and of the reference prompts T0,
    all embedded by ``clip_model``'s (frozen) text tower."""
    with torch.no_grad():
        def embed(texts: List[str]) -> Tensor:
            return F.normalize(clip_model.encode_text(tokenizer(texts)).float(), dim=-1)

        plain = embed([tiny.PLAIN_TEMPLATE.format(n) for n in names])
        described = torch.stack([F.normalize(embed(list(p)).mean(0), dim=-1) for p in class_prompts])
        reference = embed(list(reference_prompts))
    return {"plain_prompts": cosine_summary(plain, names), "class_prompts": cosine_summary(described, names),
            "reference_prompts_T0": cosine_summary(reference, names)}


def query_attribution(pred_logits: Tensor, mask_probs: Tensor, labels: Tensor, names: Sequence[str],
                      num_levels: int, pair: Tuple[str, str] = ("square", "cross")) -> Dict[str, Dict[str, int]]:
    """Where the pixels of ``pair[0]`` go in one image's mask-classification prediction.

    Args:
        pred_logits: ``Q x (K+1)`` class logits (query ``e*K + k`` is the textual query of class ``k`` at level
            ``e``; queries after ``E*K`` are instance queries, named ``"instance<i>"``).
        mask_probs: ``Q x H x W`` mask probabilities (sigmoid), at the size of ``labels``.
        labels: ``H x W`` class ids (255 ignored).
    Returns ``{"predicted_as": {class: pixels of pair[0] predicted as it}, "top_query_when_wrong": {query:
    pixels}}``: for each ``pair[0]`` pixel predicted as ``pair[1]``, the query with the largest share
    ``p_q(pair[1]) * m_q(pixel)`` of the winning score (Mask2Former's semantic inference
    ``sum_q p_q(c) m_q``), named ``"L<e>:<class of the query>"``.
    """
    num_classes = len(names)
    first, second = names.index(pair[0]), names.index(pair[1])
    probs = pred_logits.softmax(-1)[:, :num_classes]
    semantic = torch.einsum("qc,qhw->chw", probs, mask_probs)
    predicted = semantic.argmax(0)
    on_first = labels == first
    counts = torch.bincount(predicted[on_first], minlength=num_classes)
    wrong = on_first & (predicted == second)
    top: Dict[str, int] = {}
    if wrong.any():
        winners = (probs[:, second, None] * mask_probs[:, wrong]).argmax(0)
        for q, n in zip(*torch.unique(winners, return_counts=True)):
            q = int(q)
            key = (f"L{q // num_classes}:{names[q % num_classes]}" if q < num_levels * num_classes
                   else f"instance{q - num_levels * num_classes}")
            top[key] = top.get(key, 0) + int(n)
    return {"predicted_as": {n: int(c) for n, c in zip(names, counts)}, "top_query_when_wrong": top}


def _images(cfg, dataset: str) -> Iterator[Tuple[Tensor, Tensor]]:
    """``(3 x H x W`` image as the model reads it, ``H x W`` int64 labels)`` of each record of a registered
    `shapes` dataset (the run's semi split registered first)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from hvlformer.data.datasets.register_shapes import register_shapes_semi_split

    register_shapes_semi_split(cfg)
    for record in DatasetCatalog.get(dataset):
        image = torch.from_numpy(read_image(record["file_name"], format=cfg.INPUT.FORMAT).copy()).permute(2, 0, 1)
        yield image, torch.from_numpy(read_image(record["sem_seg_file_name"]).astype("int64"))


def _predict(model, image: Tensor, text: Tensor):
    """The model's raw outputs (``model.predict``) for one ``3 x H x W`` image (0-255, as :func:`_images` gives
    it) and the class embeddings ``text`` (``K x C``)."""
    return model.predict(model.normalize(image[None].to(model.device).float()), text)


def _standardized_probe(fit_x: Tensor, fit_y: Tensor, test_x: Tensor, test_y: Tensor) -> Dict[str, float]:
    """:func:`tiny.linear_probe_accuracy` on features standardised with the fit set's mean and std, and the
    constant guess (the more frequent answer) of the test set, both in %."""
    mean, std = fit_x.mean(0), fit_x.std(0) + 1e-6
    accuracy = tiny.linear_probe_accuracy((fit_x - mean) / std, fit_y, (test_x - mean) / std, test_y)
    share = float(test_y.float().mean())
    return {"accuracy": round(accuracy, 1), "constant_guess": round(100 * max(share, 1 - share), 1)}


def vision_language_scores(clip_dense: Tensor, text_embeddings: Tensor) -> Tensor:
    """The L^VL pixel classifier's scores (supplement A.4.2.2; ``vision_language_regularization`` without its
    1/0.07): ``normalize(clip_dense) @ normalize(t)^T``, ``B x C x h x w`` and ``K x C`` -> ``B x K x h x w``."""
    dense = F.normalize(clip_dense.float(), dim=1)
    return torch.einsum("bchw,kc->bkhw", dense, F.normalize(text_embeddings.float(), dim=-1))


def pixel_confusion(scores: Tensor, labels: Tensor, ignore_value: int = 255) -> np.ndarray:
    """``K x K`` confusion (rows: ground truth) of the argmax of ``K x h x w`` scores, upsampled bilinearly to
    the ``H x W`` labels; pixels labeled ``ignore_value`` are left out."""
    pred = F.interpolate(scores[None].float(), size=labels.shape, mode="bilinear", align_corners=False)[0].argmax(0)
    return confusion_of(pred.cpu().numpy(), labels.numpy(), scores.shape[0], ignore_value)


def iou_summary(confusion: np.ndarray, names: Sequence[str]) -> Dict[str, Any]:
    """Per-class IoU (%) of a confusion matrix, their mean, and where ``square`` pixels go (% of its row)."""
    iou = iou_table(confusion, names)
    out: Dict[str, Any] = {"miou": round(float(np.mean(list(iou.values()))), 1),
                           "iou": {n: round(v, 1) for n, v in iou.items()}}
    if "square" in names:
        row = confusion[list(names).index("square")]
        out["square_row_percent"] = {n: round(100.0 * float(v) / max(int(row.sum()), 1), 1) for n, v in zip(names, row)}
    return out


def head_diagnostics(cfg, model, dataset: str, pair: Tuple[str, str] = ("square", "cross")) -> Dict[str, Any]:
    """The segmentation head of a finished run on the images of ``dataset`` (``shapes_val``, or the run's
    ``shapes_labeled`` training images): :func:`query_attribution` summed over the images; the mean class
    probabilities of each level's ``pair[1]`` query on images with ``pair[0]`` and without ``pair[1]`` (its
    fixed-matching target there is "no object") and of each level's ``pair[0]`` query on images with
    ``pair[0]``; and linear probes ``pair[0]`` vs ``pair[1]`` pixels on the backbone's ``clip_dense`` and on
    the pixel decoder's ``mask_features`` (fitted on the even images, scored on the odd ones), which say
    whether the pixel features still separate the pair; and ``pixel_classifiers``: per-class IoU of the model's
    output (``semantic_scores``) and of its L^VL pixel classifier (:func:`vision_language_scores`)."""
    from hvlformer.modeling.outputs import semantic_scores

    names = list(model.class_names)
    num_classes, levels = len(names), model.num_query_levels
    first, second = names.index(pair[0]), names.index(pair[1])
    totals: Dict[str, Dict[str, int]] = {"predicted_as": {}, "top_query_when_wrong": {}}
    second_on_first_only, first_on_first = [], []
    relevance, own_class, presence = [], [], []
    features: Dict[str, List[List[Tensor]]] = {"clip_dense": [[], []], "mask_features": [[], []]}
    # the two pixel classifiers the model holds: its output (mask classification) and the L^VL one
    confusions = {"mask_classification": np.zeros((num_classes, num_classes), np.int64),
                  "vision_language": np.zeros((num_classes, num_classes), np.int64)}
    targets: Dict[str, List[List[Tensor]]] = {"clip_dense": [[], []], "mask_features": [[], []]}
    with torch.no_grad():
        text = model.encode_text()
        for i, (image, labels) in enumerate(_images(cfg, dataset)):
            out = _predict(model, image, text)
            mask_logits = F.interpolate(out.pred_masks, size=labels.shape, mode="bilinear", align_corners=False)
            masks = mask_logits[0].sigmoid()
            one = query_attribution(out.pred_logits[0].cpu(), masks.cpu(), labels, names, levels, pair)
            for part in totals:
                for key, n in one[part].items():
                    totals[part][key] = totals[part].get(key, 0) + n
            # as the model's inference: mask logits upsampled to the image first (modeling/inference.py)
            confusions["mask_classification"] += pixel_confusion(semantic_scores(out.pred_logits, mask_logits)[0],
                                                                 labels)
            confusions["vision_language"] += pixel_confusion(
                vision_language_scores(out.features["clip_dense"], text)[0], labels)
            probs = out.pred_logits[0].softmax(-1).cpu()
            present = set(labels.unique().tolist())
            relevance.append(out.relevance[0].float().cpu())
            own = torch.stack([probs[e * num_classes:(e + 1) * num_classes].diagonal() for e in range(levels)])
            own_class.append(own.mean(0))
            presence.append(torch.tensor([k in present for k in range(num_classes)]))
            if first in present:
                first_on_first.append(probs[[e * num_classes + first for e in range(levels)]])
                if second not in present:
                    second_on_first_only.append(probs[[e * num_classes + second for e in range(levels)]])
            for key, fmap in (("clip_dense", out.features["clip_dense"]), ("mask_features", out.mask_features)):
                grid = F.interpolate(labels[None, None].float(), size=fmap.shape[-2:], mode="nearest")[0, 0].long()
                keep = (grid == first) | (grid == second)
                features[key][i % 2].append(fmap[0][:, keep].T.cpu())
                targets[key][i % 2].append(grid[keep] == second)

    def mean_probs(rows: List[Tensor]) -> Optional[Dict[str, Dict[str, float]]]:
        if not rows:
            return None
        mean = torch.stack(rows).mean(0)
        return {f"L{e}": {n: round(float(v), 3) for n, v in zip(names + ["no object"], mean[e])} for e in range(levels)}

    probes = {}
    for key in features:
        fit_x, test_x = torch.cat(features[key][0]), torch.cat(features[key][1])
        fit_y, test_y = torch.cat(targets[key][0]), torch.cat(targets[key][1])
        if fit_y.unique().numel() < 2 or test_y.numel() == 0:
            probes[key] = None
            continue
        probe = _standardized_probe(fit_x, fit_y, test_x, test_y)
        probes[key] = {"accuracy": probe["accuracy"], "test_pixels": int(test_y.numel()),
                       "constant_guess": probe["constant_guess"]}

    def per_class_auroc(scores: List[Tensor]) -> Dict[str, Optional[float]]:
        s, y = torch.stack(scores).numpy(), torch.stack(presence).numpy()
        aurocs = {name: tiny.auroc(s[:, k], y[:, k]) for k, name in enumerate(names)}  # NaN: one answer only
        return {name: None if np.isnan(v) else round(float(v), 3) for name, v in aurocs.items()}

    return {"dataset": dataset, "pair": list(pair), f"{pair[0]}_pixels": totals,
            # how well each class's presence in an image is ranked by the SRE relevance s_k and by the mean
            # probability of class k of its own E textual queries (None: present in every image or none)
            "presence_auroc": {"sre_relevance": per_class_auroc(relevance), "own_queries": per_class_auroc(own_class)},
            f"{pair[1]}_queries_on_images_with_{pair[0]}_without_{pair[1]}": mean_probs(second_on_first_only),
            f"images_with_{pair[0]}_without_{pair[1]}": len(second_on_first_only),
            f"{pair[0]}_queries_on_images_with_{pair[0]}": mean_probs(first_on_first),
            "linear_probe": probes,
            # the model's output against its own L^VL pixel classifier (the run's class embeddings t on its
            # clip_dense), on the same images
            "pixel_classifiers": {key: iou_summary(c, names) for key, c in confusions.items()}}


def initial_vision_language(cfg, dataset: str = "shapes_val", seed: int = 0) -> Dict[str, Any]:
    """The L^VL pixel classifier of an untrained build of the run's config (``torch.manual_seed(seed)``, then
    ``build_model``: the config's pretrained CLIP, the prompts' initial state with a context drawn from
    ``seed``) on ``dataset``, summarised as :func:`iou_summary`: what training did to it is the difference to
    ``pixel_classifiers["vision_language"]`` of :func:`head_diagnostics`."""
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    names = list(model.class_names)
    confusion = np.zeros((len(names), len(names)), np.int64)
    with torch.no_grad():
        text = model.encode_text()
        for image, labels in _images(cfg, dataset):
            features = model.extract_features(model.normalize(image[None].to(model.device).float()))
            confusion += pixel_confusion(vision_language_scores(features["clip_dense"], text)[0], labels)
    return {"dataset": dataset, "seed": seed, **iou_summary(confusion, names)}


def query_geometry(text_queries: Tensor, level_pos: Tensor, names: Sequence[str],
                   pair: Tuple[str, str] = ("square", "cross")) -> Dict[str, Dict[str, float]]:
    """Per query level ``L{e}``: the mean length of the content queries and of the level's positional embedding,
    the cosine of ``content + position`` (what the first masked cross-attention compares with the pixels)
    for ``pair`` and averaged over every pair of different classes, and that average for the content alone
    (``content_cos_between_classes``: how alike the HQG makes the classes before the position is added);
    means over the batch.

    text_queries: ``B x E*K x D`` (level-major, the decoder's ``text_queries``); level_pos: ``E x D``."""
    num_classes = len(names)
    first, second = names.index(pair[0]), names.index(pair[1])
    others = ~torch.eye(num_classes, dtype=torch.bool)
    out = {}
    for e in range(level_pos.shape[0]):
        content = text_queries[:, e * num_classes:(e + 1) * num_classes].float()  # B x K x D
        attended = F.normalize(content + level_pos[e].float(), dim=-1)
        cos = attended @ attended.transpose(1, 2)  # B x K x K
        direction = F.normalize(content, dim=-1)
        content_cos = direction @ direction.transpose(1, 2)
        out[f"L{e}"] = {"content_length": round(float(content.norm(dim=-1).mean()), 3),
                        "position_length": round(float(level_pos[e].norm()), 3),
                        f"cos_{pair[0]}_{pair[1]}": round(float(cos[:, first, second].mean()), 4),
                        "cos_between_classes": round(float(cos[:, others].mean()), 4),
                        "content_cos_between_classes": round(float(content_cos[:, others].mean()), 4)}
    return out


def decoder_query_geometry(cfg, model, dataset: str = "shapes_val", num_images: int = 20) -> Dict[str, Any]:
    """:func:`query_geometry` of the content queries the decoder receives on the first ``num_images`` images
    of ``dataset``."""
    captured: List[Tensor] = []
    decoder = model.transformer_decoder

    def keep(module, args, kwargs):
        captured.append((kwargs["text_queries"] if "text_queries" in kwargs else args[2]).detach().cpu())

    hook = decoder.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            text = model.encode_text()
            for i, (image, _) in enumerate(_images(cfg, dataset)):
                if i >= num_images:
                    break
                _predict(model, image, text)
    finally:
        hook.remove()
    queries = torch.cat([q if q.dim() == 3 else q[None] for q in captured])
    return {"dataset": dataset, "images": len(captured),
            **query_geometry(queries, decoder.query_level_pos.weight.detach().cpu(), list(model.class_names))}


def query_presence_probe(cfg, model, pair: Tuple[str, str] = ("square", "cross"), fit: str = "shapes_train",
                         test: str = "shapes_val") -> Dict[str, Any]:
    """Do the decoder's final embeddings of the ``pair[1]`` queries know whether ``pair[1]`` is in the image?

    On the images holding ``pair[0]`` or ``pair[1]``: the last decoder layer's normalised query embeddings
    (``decoder_norm``'s output, the class head's input) of the ``E`` textual queries of ``pair[1]``, averaged
    over the levels (``D``); a logistic regression for "``pair[1]`` present", fitted on ``fit`` and scored on
    ``test``, next to the constant guess and to the class head's own decision (``p(pair[1]) > 0.5``, levels
    averaged) on the same test images. A probe far above the class head says the embeddings carry the answer
    and the head does not read it."""
    names = list(model.class_names)
    num_classes, levels = len(names), model.num_query_levels
    first, second = names.index(pair[0]), names.index(pair[1])
    queries = [e * num_classes + second for e in range(levels)]
    captured: Dict[str, Tensor] = {}
    hook = model.transformer_decoder.decoder_norm.register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("last", output))  # the last call = the last layer

    def collect(dataset: str) -> Tuple[Tensor, Tensor, Tensor]:
        rows, present, head = [], [], []
        with torch.no_grad():
            text = model.encode_text()
            for image, labels in _images(cfg, dataset):
                kinds = set(labels.unique().tolist())
                if first not in kinds and second not in kinds:
                    continue
                out = _predict(model, image, text)
                rows.append(captured["last"][0, queries].float().mean(0).cpu())
                present.append(second in kinds)
                head.append(float(out.pred_logits[0, queries].softmax(-1)[:, second].mean()))
        return torch.stack(rows), torch.tensor(present), torch.tensor(head)

    try:
        fit_x, fit_y, _ = collect(fit)
        test_x, test_y, head_p = collect(test)
    finally:
        hook.remove()
    probe = _standardized_probe(fit_x, fit_y, test_x, test_y)
    return {"pair": list(pair), "fit": fit, "test": test, "fit_images": int(fit_y.numel()),
            "test_images": int(test_y.numel()), "probe_accuracy": probe["accuracy"],
            "head_accuracy": round(100 * float(((head_p > 0.5) == test_y).float().mean()), 1),
            "constant_guess": probe["constant_guess"]}


#: The sections of a run's report, in order (``--parts`` picks some).
PARTS = ("text", "finetuned_tower", "head", "decoder_queries", "query_probe", "vision_language_before_training")


def diagnose(run_dir: Path, num_images: int = 100, parts: Sequence[str] = PARTS) -> Dict[str, Any]:
    """The report of one run: the sections named in ``parts`` (see the module docstring)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    cfg, model = load_run(run_dir)
    names = list(model.class_names)
    report: Dict[str, Any] = {"run": str(run_dir), "classes": names}
    if "text" in parts or "finetuned_tower" in parts:
        finetuned = finetuned_clip(cfg, model)
    if "text" in parts:
        text = prompt_cosines(finetuned.clip, finetuned.tokenizer, names, model.class_prompts,
                              model.reference_class_prompts)
        with torch.no_grad():
            trained = model.encode_text()
        report["text"] = {**text, "trained_class_embeddings": cosine_summary(trained, names),
                          "reference_template": cfg.MODEL.HVLFORMER.TEXT.REFERENCE_TEMPLATE}
    if "finetuned_tower" in parts:
        size = int(cfg.DATASETS.SHAPES.IMAGE_SIZE)
        metrics = tiny.evaluate(finetuned.clip, finetuned.tokenizer, "dev", num_seg_images=num_images,
                                num_presence_images=num_images, image_size=size)
        report["finetuned_tower"] = {"image_size": size, "images": num_images,
                                     "dense_miou": round(metrics["dense_miou"], 1),
                                     "dense_iou": {k: round(v, 1) for k, v in metrics["dense_iou"].items()},
                                     "square_row_percent": metrics["dense_confusion_percent"]["square"],
                                     "twin_patch_probe": metrics["twin_patch_probe"]}
    if "head" in parts:
        report["head"] = {dataset: head_diagnostics(cfg, model, dataset) for dataset in ("shapes_val", "shapes_labeled")
                          if dataset != "shapes_labeled" or cfg.DATASETS.SHAPES.NUM_LABELED > 0}
    if "decoder_queries" in parts:
        report["decoder_queries"] = decoder_query_geometry(cfg, model)
    if "query_probe" in parts:
        report["query_probe"] = query_presence_probe(cfg, model)
    if "vision_language_before_training" in parts:
        report["vision_language_before_training"] = initial_vision_language(cfg)
    return report


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="OUTPUT_DIR of finished train_net.py runs on shapes")
    parser.add_argument("--num-images", type=int, default=100, help="dev images for the zero-shot scores")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="sections of the report (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"command": "python tools/anchor_diagnostics.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "runs": [diagnose(run, args.num_images, args.parts) for run in args.runs]}
    emit_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
