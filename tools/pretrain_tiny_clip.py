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

The checkpoint is the open_clip state dict in fp16, loadable with
``MODEL.HVLFORMER.CLIP.MODEL_NAME HVL-Tiny-ViT-P8 MODEL.HVLFORMER.CLIP.PRETRAINED <path>``; the metrics,
command, time and sha256 go to ``--metrics-out`` (JSON).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shlex
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hvlformer.data.captions import caption_shapes_image, visible_classes
from hvlformer.data.shapes import _image_rng, load_shapes_classes, render_shapes_image
from hvlformer.modeling.backbone.clip_vit import _select_adapter
from hvlformer.modeling.clip_loader import build_clip_model

ROOT = Path(__file__).resolve().parents[1]

MODEL_NAME = "HVL-Tiny-ViT-P8"
DEFAULT_OUT = ROOT / "projects" / "HVLFormer" / "hvlformer" / "modeling" / "backbone" / "pretrained" / "hvl_tiny_vit_p8_shapes_v2.pt"
DEFAULT_METRICS = ROOT / "docs" / "results" / "tiny_clip_pretraining.json"
PLAIN_TEMPLATE = "a photo of a {}."
# The normalisation of configs/Base-HVLFormer.yaml (MODEL.PIXEL_MEAN / PIXEL_STD, 0-255 RGB).
PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)
ALL_KINDS = 11  # background + the 10 shape kinds of classes/shapes.json
SEG_CLASSES = 6  # the segmentation dataset: background + the first 5 kinds
JPEG_QUALITY = 95  # as the shapes dataset files


def vocabulary() -> List[str]:
    """``["background", <the 10 shape names>]`` (index = label id of an 11-class shapes image)."""
    spec = load_shapes_classes()
    return [spec["background"]["name"]] + [c["name"] for c in spec["classes"]]


def _jpeg_roundtrip(image: np.ndarray) -> np.ndarray:
    """RGB uint8 -> the same image after the dataset's JPEG encoding (what reading its file gives)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG image")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def colour_twins() -> Dict[int, int]:
    """Kind id (1-10) -> the other kind whose hue family is nearest (circular distance in degrees): the kind
    that only shape and texture tell apart from it (:file:`classes/shapes.json`)."""
    hues = [c["color"]["hue"] for c in load_shapes_classes()["classes"]]

    def distance(a: float, b: float) -> float:
        d = abs(a - b) % 360.0
        return min(d, 360.0 - d)

    return {i + 1: 1 + min((j for j in range(len(hues)) if j != i), key=lambda j: distance(hues[i], hues[j]))
            for i in range(len(hues))}


def swapped_caption(record: Dict[str, Any], image_size: int, caption_rng_state: Dict[str, Any],
                    rng: np.random.Generator, twins: Dict[int, int]) -> str:
    """The caption of ``record`` with one visible kind (chosen by ``rng``) renamed to its colour twin, written
    with the template, order and attribute choices of the true caption (``caption_rng_state``: the state of
    its generator before it was captioned). An image with no visible kind keeps its caption."""
    visible = sorted(visible_classes(record, image_size))
    swapped = copy.deepcopy(record)
    if visible:
        kind = visible[int(rng.integers(len(visible)))]
        for inst in swapped["instances"]:
            if int(inst["class"]) == kind:
                inst["class"] = twins[kind]
    caption_rng = np.random.default_rng()
    caption_rng.bit_generator.state = caption_rng_state
    return caption_shapes_image(swapped, image_size, caption_rng)[0]


def draw_batch(indices: Sequence[int], split: str, seed: int, image_size: int, num_classes: int,
               random_hue_probability: float = 0.0, negatives: Optional[List[str]] = None,
               classes_file: Optional[str] = None) -> Tuple[Tensor, Tensor, List[str], Tensor]:
    """Images ``indices`` of a shapes split, drawn in memory exactly as the dataset files would be (with
    ``random_hue_probability`` > 0, the pretraining images: instances recoloured at random, see
    :func:`render_shapes_image`).

    Returns ``(images B x 3 x H x W uint8, labels B x H x W uint8, captions, tags B x ALL_KINDS float)``;
    ``tags[:, 0]`` (background) is 1, ``tags[:, k]`` is 1 when the caption names kind ``k``. When a list is
    given as ``negatives``, one name-swapped caption per image (:func:`swapped_caption`) is appended to it;
    the returned values do not depend on it. ``classes_file``: another class table of the generator (the same
    layouts and labels drawn with, e.g., other textures; evaluation only).
    """
    names = vocabulary()
    twins = colour_twins() if negatives is not None else {}
    images, labels, captions, tags = [], [], [], torch.zeros(len(indices), ALL_KINDS)
    for row, i in enumerate(indices):
        record: Dict[str, Any] = {}
        image, label = render_shapes_image(_image_rng(seed, split, i), image_size, num_classes,
                                           guaranteed_class=1 + i % (num_classes - 1), record=record,
                                           random_hue_probability=random_hue_probability,
                                           classes_file=classes_file)
        caption_rng = np.random.default_rng([seed, zlib.crc32(f"{split}/caption".encode()), i])
        state = copy.deepcopy(caption_rng.bit_generator.state)
        caption, caption_tags = caption_shapes_image(record, image_size, caption_rng)
        if negatives is not None:
            swap_rng = np.random.default_rng([seed, zlib.crc32(f"{split}/swap".encode()), i])
            negatives.append(swapped_caption(record, image_size, state, swap_rng, twins))
        images.append(torch.from_numpy(_jpeg_roundtrip(image)).permute(2, 0, 1))
        labels.append(torch.from_numpy(label))
        captions.append(caption)
        tags[row, 0] = 1.0
        for name in caption_tags:
            tags[row, names.index(name)] = 1.0
    return torch.stack(images), torch.stack(labels), captions, tags


def gwrp(scores: Tensor, decay: Tensor) -> Tensor:
    """Global weighted rank pooling over patches.

    scores: ``B x N x K``; decay: ``K`` (one ``d`` per class). Returns ``B x K``:
    ``sum_r d^r s_(r) / sum_r d^r`` over the scores sorted in decreasing order.
    """
    n = scores.shape[1]
    ranks = torch.arange(n, dtype=scores.dtype, device=scores.device)
    weights = decay.to(scores.dtype)[None, :] ** ranks[:, None]  # N x K
    weights = weights / weights.sum(dim=0, keepdim=True)
    ordered = scores.sort(dim=1, descending=True).values
    return (ordered * weights[None]).sum(dim=1)


def region_tags(labels: Tensor, cell: int, min_fraction: float) -> Tensor:
    """Which kinds are visible in each ``cell x cell`` pixel square of the image (region tags).

    labels: ``B x H x W`` class ids (0 background, 1-10 the kinds; H, W multiples of ``cell``). Returns
    ``B x H/cell x W/cell x ALL_KINDS`` float: 1 where the kind covers at least ``min_fraction`` of the cell.
    These are the tags a caption of the cell would carry (as region captions, e.g. Visual Genome's, give a
    real vision-language model), not a pixel mask: they say what is in a 32 px square, not where.
    """
    one_hot = F.one_hot(labels.long(), ALL_KINDS).permute(0, 3, 1, 2).float()  # B x K x H x W
    fractions = F.avg_pool2d(one_hot, cell)  # B x K x H/cell x W/cell
    return (fractions >= min_fraction).float().permute(0, 2, 3, 1)


def cell_pooled(probs: Tensor, grid: Tuple[int, int], patches_per_cell: int, decay: Tensor) -> Tensor:
    """GWRP of patch probabilities within each cell of ``patches_per_cell x patches_per_cell`` patches.

    probs: ``B x N x K`` (N = h * w, row-major); returns ``B x h/p x w/p x K``.
    """
    b, _, k = probs.shape
    (h, w), c = grid, patches_per_cell
    cells = probs.reshape(b, h // c, c, w // c, c, k).permute(0, 1, 3, 2, 4, 5).reshape(b * (h // c) * (w // c), c * c, k)
    return gwrp(cells, decay).reshape(b, h // c, w // c, k)


class TinyClipPretrainer(nn.Module):
    """An open_clip model plus the few scalars of the pretraining losses (not part of the checkpoint)."""

    def __init__(self, clip_model: nn.Module, tokenizer, fg_decay: float = 0.9, bg_decay: float = 0.99,
                 loss_weights: Sequence[float] = (1.0, 1.0, 1.0, 0.0, 0.0, 0.0), dense_mode: str = "softmax",
                 region_cell: int = 32, region_decay: float = 0.5) -> None:
        super().__init__()
        self.clip = clip_model
        self.tokenizer = tokenizer
        self._adapter = _select_adapter(clip_model.visual)
        self.tag_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.tag_bias = nn.Parameter(torch.tensor(-2.0))
        self.dense_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.dense_bias = nn.Parameter(torch.tensor(-2.0 if dense_mode == "sigmoid" else 0.0))
        self.dense_mode = dense_mode
        self.register_buffer("decay", torch.tensor([bg_decay] + [fg_decay] * (ALL_KINDS - 1)))
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1))
        if len(loss_weights) != 6:
            raise ValueError(f"loss_weights are (clip, tag, dense, region, swap, names), got {loss_weights}")
        self.loss_weights = tuple(loss_weights)  # clip, tag, dense, region, swap, names
        self.region_cell = region_cell
        self.register_buffer("region_decay", torch.full((ALL_KINDS,), float(region_decay)))
        self.prompt_tokens = tokenizer([PLAIN_TEMPLATE.format(n) for n in vocabulary()])

    def encode_image(self, images: Tensor, stages: Optional[List[Tensor]] = None
                     ) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
        """uint8 ``B x 3 x H x W`` -> (unit global ``B x C``, unit patch embeddings ``B x N x C``, grid).

        ``stages`` (optional) receives the tower's tokens (batch-first, class token included) after the patch
        embedding and after each block."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        ad, visual = self._adapter, self.clip.visual
        x, grid, extra = ad.embed(visual, x)
        if stages is not None:
            stages.append(x)
        for block in ad.blocks(visual):
            x = ad.run_block(block, x, extra)
            if stages is not None:
                stages.append(x)
        pooled, dense = ad.heads(visual, x, dense=True)
        return F.normalize(pooled, dim=-1), F.normalize(dense, dim=-1), grid

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Token ids ``T x L`` -> unit text embeddings ``T x C``.

        The same result as ``clip.encode_text`` (causal mask, pooled at the EOT token = argmax id), on the
        tokens up to the last EOT of the batch only: nothing after it can reach a pooled token.
        """
        clip = self.clip
        pool = tokens.argmax(dim=-1)
        length = int(pool.max()) + 1
        x = clip.token_embedding(tokens[:, :length]) + clip.positional_embedding[:length]
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0]), pool] @ clip.text_projection
        return F.normalize(x, dim=-1)

    def losses(self, images: Tensor, captions: Sequence[str], tags: Tensor,
               cell_tags: Optional[Tensor] = None, negatives: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        """The weighted pretraining losses of a batch (images uint8 ``B x 3 x H x W``, tags ``B x 11``,
        ``cell_tags`` ``B x H/cell x W/cell x 11`` from :func:`region_tags`, needed when the region weight > 0;
        ``negatives``: one name-swapped caption per image, needed when the swap weight > 0)."""
        image_emb, dense, grid = self.encode_image(images)
        w = self.loss_weights
        extra = list(negatives) if w[4] > 0 else []
        texts = self.encode_text(torch.cat([self.prompt_tokens, self.tokenizer(list(captions) + extra)]))
        prompts, caption_emb = texts[:ALL_KINDS], texts[ALL_KINDS: ALL_KINDS + len(captions)]
        scale = self.clip.logit_scale.exp().clamp(max=100.0)
        logits = scale * image_emb @ caption_emb.t()
        target = torch.arange(len(captions))
        clip_loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        tag_logits = self.tag_scale.exp() * image_emb @ prompts[1:].t() + self.tag_bias
        tag_loss = F.binary_cross_entropy_with_logits(tag_logits, tags[:, 1:])
        dense_logits = self.dense_scale.exp() * dense @ prompts.t() + self.dense_bias  # B x N x 11
        if self.dense_mode == "softmax":
            pooled = gwrp(dense_logits.softmax(dim=-1), self.decay).clamp(1e-6, 1 - 1e-6)
            dense_loss = F.binary_cross_entropy(pooled, tags)
        else:  # sigmoid: MIL per shape kind; background = no kind here
            kinds = dense_logits[..., 1:].sigmoid()  # B x N x 10
            pooled = gwrp(kinds, self.decay[1:]).clamp(1e-6, 1 - 1e-6)
            background_target = 1.0 - kinds.detach().max(dim=-1).values  # B x N
            dense_loss = (F.binary_cross_entropy(pooled, tags[:, 1:])
                          + F.binary_cross_entropy_with_logits(dense_logits[..., 0], background_target))
        out = {"clip": w[0] * clip_loss, "tag": w[1] * tag_loss, "dense": w[2] * dense_loss}
        if w[4] > 0:
            # image -> text over the B captions and the B swapped ones: a caption that names the colour twin
            # instead of the kind drawn must score below the true one
            negative_emb = texts[ALL_KINDS + len(captions):]
            swap_logits = scale * image_emb @ torch.cat([caption_emb, negative_emb]).t()
            out["swap"] = w[4] * F.cross_entropy(swap_logits, target)
        if w[5] > 0:
            cosine = prompts @ prompts.t()
            off_diagonal = ~torch.eye(ALL_KINDS, dtype=torch.bool, device=cosine.device)
            out["names"] = w[5] * cosine[off_diagonal].clamp(min=0).pow(2).mean()
        if w[3] > 0:
            # the same multiple-instance term inside each cell: a kind absent from a cell must lose all of its
            # patches, which ties the patch scores to what is under the patch (image-level pooling alone
            # lets background patches carry "there is a circle somewhere", see docs/RESULTS.md)
            patch_size = images.shape[-1] // grid[1]
            pooled_cells = cell_pooled(dense_logits.softmax(dim=-1), grid, self.region_cell // patch_size,
                                       self.region_decay).clamp(1e-6, 1 - 1e-6)
            out["region"] = w[3] * F.binary_cross_entropy(pooled_cells, cell_tags)
        return out


# ----------------------------------------------------------------------------------------- evaluation
def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN without both classes."""
    pos, neg = scores[positives], scores[~positives]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    allv = np.concatenate([pos, neg])[order]
    ranks = np.empty(allv.size)
    i = 0
    while i < allv.size:  # average ranks over ties
        j = i
        while j + 1 < allv.size and allv[j + 1] == allv[i]:
            j += 1
        ranks[i:j + 1] = 0.5 * (i + j) + 1
        i = j + 1
    rank_of = np.empty(allv.size)
    rank_of[order] = ranks
    return float((rank_of[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def _closest_names(prompts: Tensor, names: Sequence[str]) -> Dict[str, List[Any]]:
    """For each shape name: the other shape name whose plain prompt is closest, and their cosine."""
    cos = (prompts[1:] @ prompts[1:].t()).fill_diagonal_(-2.0)
    best = cos.max(dim=1)
    return {names[k + 1]: [names[int(j) + 1], round(float(v), 3)] for k, (v, j) in enumerate(zip(*best))}


def pure_patch_owners(labels: Tensor, patch: int, kinds: Sequence[int]) -> Tensor:
    """Label maps ``B x H x W`` -> ``B x N`` (row-major ``patch`` px patches): the kind that covers at least
    70 % of the patch when it is one of ``kinds``, else -1."""
    fractions = F.avg_pool2d(F.one_hot(labels.long(), ALL_KINDS).permute(0, 3, 1, 2).float(), patch)
    fractions = fractions.permute(0, 2, 3, 1).reshape(len(labels), -1, ALL_KINDS)
    majority, share = fractions.argmax(dim=-1), fractions.max(dim=-1).values
    keep = (share >= 0.7) & torch.isin(majority, torch.tensor(list(kinds)))
    return majority.masked_fill(~keep, -1)


def _pure_patches(model: "TinyClipPretrainer", split: str, num_images: int, image_size: int,
                  kinds: Sequence[int], batch_size: int = 50, classes_file: Optional[str] = None
                  ) -> Tuple[Tensor, Tensor]:
    """Patch embeddings (``N x C``) of 11-kind images of ``split`` whose 8 px patch is at least 70 % one of
    ``kinds``, and that kind (``N``)."""
    features, owners = [], []
    for start in range(0, num_images, batch_size):
        images, labels, _, _ = draw_batch(range(start, min(start + batch_size, num_images)), split, 0, image_size,
                                          ALL_KINDS, classes_file=classes_file)
        _, dense, (h, _) = model.encode_image(images)
        owner = pure_patch_owners(labels, image_size // h, kinds)
        features.append(dense[owner >= 0])
        owners.append(owner[owner >= 0])
    return torch.cat(features), torch.cat(owners)


def linear_probe_accuracy(fit_x: Tensor, fit_target: Tensor, test_x: Tensor, test_target: Tensor) -> float:
    """Accuracy (%) on ``test_x`` (``M x C``) of a logistic regression fitted on ``fit_x`` (``N x C``) with
    L-BFGS (binary bool targets ``N`` / ``M``; a small L2 penalty; deterministic)."""
    torch.manual_seed(0)
    linear = nn.Linear(fit_x.shape[1], 1)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=300, line_search_fn="strong_wolfe")
    target = fit_target.float()

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(linear(fit_x)[:, 0], target) + 1e-4 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may run under no_grad
        optimizer.step(closure)
    with torch.no_grad():
        return 100 * float(((linear(test_x)[:, 0] > 0) == test_target.bool()).float().mean())


TWIN_PAIRS = (("square", "cross"), ("star", "ellipse"))  # the kinds whose names v1 / v2 tie


def twin_patch_probe(model: "TinyClipPretrainer", split_suffix: str, num_images: int = 300,
                     image_size: int = 128, pairs: Sequence[Tuple[str, str]] = TWIN_PAIRS,
                     classes_file: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Can the patch embeddings tell a kind from its colour twin at all? Per pair (square / cross, star /
    ellipse): the accuracy on held-out patches (split ``clip<suffix>``) of a logistic regression fitted on
    patches of other images (split ``probe``), the share of the more frequent kind (what a constant guess
    scores), and the zero-shot accuracy (the closer of the two plain prompts). A probe near the constant
    guess means the image tower has not learned the difference, whatever the text tower does."""
    names = vocabulary()
    prompts = model.encode_text(model.prompt_tokens)
    kinds = sorted({names.index(n) for pair in pairs for n in pair})
    with torch.no_grad():  # one pass over each split for all pairs; each pair takes its own patches
        all_fit_x, all_fit_y = _pure_patches(model, "probe", num_images, image_size, kinds, classes_file=classes_file)
        all_test_x, all_test_y = _pure_patches(model, "clip" + split_suffix, num_images, image_size, kinds,
                                               classes_file=classes_file)
    out: Dict[str, Dict[str, float]] = {}
    for first, second in pairs:
        pair = (names.index(first), names.index(second))
        in_fit, in_test = torch.isin(all_fit_y, torch.tensor(pair)), torch.isin(all_test_y, torch.tensor(pair))
        fit_x, fit_y, test_x, test_y = all_fit_x[in_fit], all_fit_y[in_fit], all_test_x[in_test], all_test_y[in_test]
        if fit_y.unique().numel() < 2 or test_y.numel() == 0:  # too few images for this pair
            out[f"{first}/{second}"] = {"linear_probe": float("nan"), "constant_guess": float("nan"),
                                        "zero_shot": float("nan"), "test_patches": int(test_y.numel())}
            continue
        probe = linear_probe_accuracy(fit_x, fit_y == pair[1], test_x, test_y == pair[1])
        with torch.no_grad():
            zero_shot = float((torch.tensor(pair)[(test_x @ prompts[list(pair)].t()).argmax(dim=1)] == test_y)
                              .float().mean())
        constant = float(max((test_y == pair[0]).float().mean(), (test_y == pair[1]).float().mean()))
        out[f"{first}/{second}"] = {"linear_probe": round(probe, 1), "constant_guess": round(100 * constant, 1),
                                    "zero_shot": round(100 * zero_shot, 1), "test_patches": int(test_y.numel())}
    return out


@torch.no_grad()
def evaluate(clip_model: nn.Module, tokenizer, split_suffix: str = "val", num_seg_images: int = 200,
             num_presence_images: int = 500, image_size: int = 128, batch_size: int = 50,
             classes_file: Optional[str] = None) -> Dict[str, Any]:
    """Zero-shot metrics of an open_clip model (see the module docstring); ``split_suffix`` ``val`` or ``dev``;
    ``classes_file``: the images drawn from another class table (the same layouts and labels)."""
    clip_model.eval()
    model = TinyClipPretrainer(clip_model, tokenizer).eval()
    names = vocabulary()
    prompts = model.encode_text(model.prompt_tokens)  # 11 x C
    seg_names = names[:SEG_CLASSES]
    confusion = np.zeros((SEG_CLASSES, SEG_CLASSES), dtype=np.int64)
    for start in range(0, num_seg_images, batch_size):
        idx = range(start, min(start + batch_size, num_seg_images))
        images, labels, _, _ = draw_batch(idx, split_suffix, 0, image_size, SEG_CLASSES, classes_file=classes_file)
        _, dense, (h, w) = model.encode_image(images)
        cos = (dense @ prompts[:SEG_CLASSES].t()).transpose(1, 2).reshape(len(idx), SEG_CLASSES, h, w)
        pred = F.interpolate(cos, size=labels.shape[-2:], mode="bilinear", align_corners=False).argmax(dim=1)
        confusion += np.bincount((labels.long() * SEG_CLASSES + pred).flatten().numpy(),
                                 minlength=SEG_CLASSES ** 2).reshape(SEG_CLASSES, SEG_CLASSES)
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    iou = 100.0 * inter / np.maximum(union, 1)

    presence_split = "clip" + split_suffix
    global_scores, dense_scores, present = [], [], []
    for start in range(0, num_presence_images, batch_size):
        idx = list(range(start, min(start + batch_size, num_presence_images)))
        images, labels, _, _ = draw_batch(idx, presence_split, 0, image_size, ALL_KINDS, classes_file=classes_file)
        image_emb, dense, _ = model.encode_image(images)
        global_scores.append((image_emb @ prompts[1:].t()).numpy())
        dense_scores.append(gwrp(dense @ prompts[1:].t(), model.decay[1:]).numpy())  # pooled patch cosines
        for i in idx:  # presence = what a caption of the image would name
            record: Dict[str, Any] = {}
            render_shapes_image(_image_rng(0, presence_split, i), image_size, ALL_KINDS, 1 + i % (ALL_KINDS - 1),
                                record=record)
            visible = visible_classes(record, image_size)
            present.append([k in visible for k in range(1, ALL_KINDS)])
    g, d, p = np.concatenate(global_scores), np.concatenate(dense_scores), np.array(present)
    global_auroc = {names[k + 1]: auroc(g[:, k], p[:, k]) for k in range(ALL_KINDS - 1)}
    dense_auroc = {names[k + 1]: auroc(d[:, k], p[:, k]) for k in range(ALL_KINDS - 1)}
    return {
        "seg_split": f"shapes {SEG_CLASSES} classes, {image_size} px, seed 0, split {split_suffix!r}, images 0-{num_seg_images - 1}",
        "presence_split": f"shapes {ALL_KINDS} classes, {image_size} px, seed 0, split {presence_split!r}, images 0-{num_presence_images - 1}",
        "prompt": PLAIN_TEMPLATE,
        "dense_miou": float(iou.mean()),
        "dense_iou": {n: float(v) for n, v in zip(seg_names, iou)},
        "dense_pixel_accuracy": float(100.0 * inter.sum() / confusion.sum()),
        # where each class's pixels go (rows: ground truth, % of the row), and how alike the names are
        "dense_confusion_percent": {n: {m: round(float(v), 1) for m, v in zip(seg_names, row)} for n, row in
                                    zip(seg_names, 100.0 * confusion / np.maximum(confusion.sum(1, keepdims=True), 1))},
        "text_cosine_max": _closest_names(prompts, names),
        "global_auroc": global_auroc,
        "global_auroc_min": float(min(global_auroc.values())),
        "dense_pooled_auroc": dense_auroc,
        "dense_pooled_auroc_min": float(min(dense_auroc.values())),
        "twin_patch_probe": twin_patch_probe(model, split_suffix, min(300, num_presence_images), image_size,
                                             classes_file=classes_file),
        **({"classes_file": classes_file} if classes_file else {}),
    }


# ----------------------------------------------------------------------------------------- training
def build_model(seed: int, model_name: str = MODEL_NAME) -> Tuple[nn.Module, Any]:
    """A randomly initialised open_clip model (seeded; ``HVL-Tiny-ViT-P8`` by default) and its tokenizer."""
    torch.manual_seed(seed)
    return build_clip_model(model_name, "")


def weights_digest(state: Dict[str, Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (sorted by name). Unlike the file's
    hash it does not depend on ``torch.save``'s random serialization id, so retraining can be compared."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(state[key].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(clip_model: nn.Module, path: Path) -> Tuple[str, str]:
    """Write the open_clip state dict in fp16 (floating tensors); returns (file sha256, weights digest)."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in clip_model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest(), weights_digest(state)


def warmup_cosine_lr(step: int, steps: int, lr: float) -> float:
    """The learning rate of step ``step`` (0-based) of ``steps``: linear warm-up over the first 5 %, then a
    cosine decay to 0."""
    warmup = max(1, int(0.05 * steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: ``weight_decay`` on weight matrices and kernels, none on biases, norms and embeddings
    (open_clip's ``*_embedding``; a timm tower's ``pos_embed`` / ``cls_token`` / ``reg_token``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_embedding = "embedding" in name or name.endswith(("pos_embed", "cls_token", "reg_token"))
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(args: argparse.Namespace, log=print) -> Tuple[nn.Module, Any, Dict[str, Any]]:
    """Pretrain from scratch; returns ``(clip model, tokenizer, history)``."""
    clip_model, tokenizer = build_model(args.seed, args.model)
    model = TinyClipPretrainer(clip_model, tokenizer, args.fg_decay, args.bg_decay,
                               (args.clip_weight, args.tag_weight, args.dense_weight, args.region_weight,
                                args.swap_weight, args.name_weight),
                               args.dense_mode, args.region_cell, args.region_decay)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98))
    history: List[Dict[str, float]] = []
    start, running = time.perf_counter(), {}
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine_lr(step, args.steps, args.lr)
        negatives: Optional[List[str]] = [] if args.swap_weight > 0 else None
        images, labels, captions, tags = draw_batch(range(step * args.batch_size, (step + 1) * args.batch_size),
                                                    "pretrain", args.seed, args.image_size, ALL_KINDS, args.random_hue,
                                                    negatives=negatives)
        cell_tags = region_tags(labels, args.region_cell, args.region_min_fraction) if args.region_weight > 0 else None
        losses = model.losses(images, captions, tags, cell_tags, negatives)
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for k, v in losses.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = (step % args.log_every) + 1
            entry = {"step": step + 1, "time_s": round(time.perf_counter() - start, 1),
                     **{k: round(v / n, 4) for k, v in running.items()}}
            history.append(entry)
            log(json.dumps(entry))
            running = {}
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            # progress is always measured on the dev images, never on the held-out evaluation images
            m = evaluate(clip_model, tokenizer, "dev", num_seg_images=50, num_presence_images=200)
            log(json.dumps({"step": step + 1, "eval": "dev", "dense_miou": round(m["dense_miou"], 2),
                            "dense_iou": {k: round(v, 1) for k, v in m["dense_iou"].items()},
                            "global_auroc_min": round(m["global_auroc_min"], 3),
                            "dense_pooled_auroc_min": round(m["dense_pooled_auroc_min"], 3)}))
            model.train()
    return clip_model, tokenizer, {"losses": history, "train_time_s": round(time.perf_counter() - start, 1)}


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
