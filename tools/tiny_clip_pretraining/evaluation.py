"""Zero-shot evaluation of an open_clip model on held-out ``shapes`` images, with no segmentation training and
the plain prompt ``"a photo of a {name}."``: dense mIoU (per-patch argmax), presence AUROC per name, and the
twin patch probe (can the patch embeddings tell a kind from its colour twin at all?)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hvlformer.data.captions import visible_classes
from hvlformer.data.shapes import _image_rng, render_shapes_image

from .data import ALL_KINDS, PLAIN_TEMPLATE, SEG_CLASSES, draw_batch, vocabulary
from .pretrainer import TinyClipPretrainer, gwrp


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
