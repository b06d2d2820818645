"""The unlabeled objective (paper Sec. 3.3, eq. 5, and eq. 6's ``lambda_cmcr * l_CMCR``): teacher targets of
the original view and the consistency losses of the weak and strong views.

The terms themselves are :class:`~hvlformer.modeling.cmcr.CMCRLoss` (``l_mask``, ``l_class``, ``l_align`` per
decoder layer; or HierVL's entropy minimisation). This module runs the network for them:

- :func:`teacher_targets`: the teacher (the model itself without gradient, or an EMA copy) predicts the
  original view; its per-layer outputs become the detached targets.
- :func:`clip_guidance_terms`: with ``SEMI.CLIP_GUIDANCE_WEIGHT`` the frozen CLIP's zero-shot labels of the
  original view are a second target of the same views (:mod:`~hvlformer.modeling.clip_guidance`);
  :func:`clip_checked_targets`: with ``SEMI.CLIP_RELABEL_OBJECTS`` they rename the teacher's objects.
- :func:`refined_targets`: with ``SEMI.LABEL_REFINEMENT_*`` the teacher's maps are refined with the original
  view's colours (:mod:`~hvlformer.modeling.label_refinement`).
- :func:`oracle_targets`: with ``SEMI.ORACLE_LABELS`` (a diagnostic) l_mask's targets are the unlabeled
  images' hidden labels instead.
- :func:`unlabeled_losses`: the weak and strong views go through the network as one batch (so the student
  runs once per view kind and DDP synchronises one forward); the output is split back into the two views
  and compared with the targets; the losses are multiplied by the model's ``unlabeled_weight``
  (``lambda_cmcr``, ``SEMI.CMCR_WEIGHT``). Keys ``stat_*`` are statistics, not losses.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip_guidance import CLIPGuidance, GuidanceTargets, relabel_objects
from .cmcr import CMCRLoss, LayerTargets, layer_outputs
from .label_maps import downsample_labels
from .label_refinement import PixelAdaptiveRefinement, refine_to

__all__ = ["teacher_targets", "split_views", "unlabeled_losses", "oracle_targets", "refined_targets",
           "clip_checked_targets", "clip_guidance_terms", "clip_zero_shot_inputs", "clip_guidance_targets"]

_PREDICTION_KEYS = ("pred_logits", "pred_masks", "attn_maps")


@torch.no_grad()
def teacher_targets(teacher: nn.Module, images: Tensor, text_embeddings: Tensor, criterion: CMCRLoss,
                    padding: Optional[Tensor] = None) -> List[LayerTargets]:
    """Detached per-layer targets of the original view.

    Args:
        teacher: an HVLFormer (the student itself, or the EMA teacher's copy).
        images: ``B x 3 x H x W`` original views, 0-255 (normalised here).
        text_embeddings: ``K x C`` class embeddings (the step's own, detached, for the self teacher).
        criterion: the CMCR loss whose targets are built (distribution alignment lives there).
        padding: ``B x H x W`` bool, True on padded pixels.
    """
    outputs = teacher.predict(teacher.normalize(images), text_embeddings.detach())
    return criterion.targets(outputs.decoder_outputs(), padding)


def split_views(outputs: Dict[str, Any], part: slice) -> Dict[str, Any]:
    """The images ``part`` of decoder outputs (final and auxiliary predictions) of a concatenated batch."""
    return {**{k: outputs[k][part] for k in _PREDICTION_KEYS},
            "aux_outputs": [{k: (a[k][part] if a.get(k) is not None else None) for k in _PREDICTION_KEYS}
                            for a in outputs["aux_outputs"]]}


def unlabeled_losses(model: nn.Module, unlabeled: Dict[str, Any], text_embeddings: Tensor) -> Dict[str, Tensor]:
    """Weighted losses of the weak and strong views of a batch of unlabeled images, and ``stat_*`` values.

    Args:
        model: the HVLFormer being trained (its ``unlabeled_criterion`` and ``unlabeled_weight``).
        unlabeled: ``"image_weak"`` and ``"image_strong"`` (``B x 3 x H x W``, the strong one already
            CutMix-ed), ``"padding"`` and ``"cutmix_box"`` (``B x H x W`` bool), ``"mix_order"`` (``B``) and
            ``"image_original"`` (``B x 3 x H x W``, the original views) and, with an EMA teacher,
            ``"targets"`` (its targets, from :func:`teacher_targets`); without ``"targets"`` the model itself
            is the teacher of the original views, without gradient.
        text_embeddings: ``K x C`` class embeddings of this step.
    """
    criterion: CMCRLoss = model.unlabeled_criterion
    if "targets" not in unlabeled and criterion.mode == "cmcr":
        targets = teacher_targets(model, unlabeled["image_original"], text_embeddings, criterion,
                                  unlabeled["padding"])
        unlabeled = {**unlabeled, "targets": targets}
    padding = unlabeled["padding"].to(model.device)
    guidance, clip_targets, clip_stats = model.clip_guidance, None, {}
    if guidance is not None and "targets" in unlabeled:
        clip_targets, unlabeled, clip_stats = clip_checked_targets(model, unlabeled, padding)
    if model.label_refinement is not None and "targets" in unlabeled:
        unlabeled = {**unlabeled, "targets": refined_targets(
            model.label_refinement, unlabeled["targets"], unlabeled["image_original"].to(model.device), padding,
            at_image_resolution=criterion.mask_pixels > 0)}
    if "oracle_sem_seg" in unlabeled and "targets" in unlabeled:  # SEMI.ORACLE_LABELS, a diagnostic
        unlabeled = {**unlabeled, "targets": oracle_targets(
            unlabeled["targets"], unlabeled["oracle_sem_seg"], at_image_resolution=criterion.mask_pixels > 0,
            teacher_coverage=criterion.oracle_coverage == "teacher")}
    weak = model.normalize(unlabeled["image_weak"])
    strong = model.normalize(unlabeled["image_strong"])
    batch = weak.shape[0]
    outputs = model.predict(torch.cat([weak, strong]), text_embeddings)
    predictions = outputs.decoder_outputs()
    weak_out, strong_out = split_views(predictions, slice(0, batch)), split_views(predictions, slice(batch, 2 * batch))
    if criterion.mode == "entropy":
        terms = criterion.entropy(weak_out, strong_out, padding)
    else:
        terms = criterion(unlabeled["targets"], weak_out, strong_out, padding,
                          unlabeled["cutmix_box"].to(model.device), unlabeled["mix_order"].to(model.device))
    if guidance is not None and guidance.loss:
        terms.update(clip_guidance_terms(model, unlabeled, weak_out, strong_out, padding, clip_targets))
    terms.update(clip_stats)
    stats = {k: v for k, v in terms.items() if k.startswith("stat_")}
    stats["stat_sre_mean_unlabeled"] = outputs.relevance.detach().float().mean()
    losses = {k: model.unlabeled_weight * v for k, v in terms.items() if k.startswith("loss")}
    return {**losses, **stats}


@torch.no_grad()
def refined_targets(refinement: PixelAdaptiveRefinement, targets: List[LayerTargets], images: Tensor,
                    padding: Optional[Tensor] = None, at_image_resolution: bool = False) -> List[LayerTargets]:
    """``SEMI.LABEL_REFINEMENT_*``: every layer's ``probs`` (``B x K x h x w``) refined with the colours of the original
    views ``images`` (``B x 3 x H x W``, 0-255; ``padding`` ``B x H x W`` bool): at the mask resolution each cell's
    centre pixel of the refined maps, or with ``at_image_resolution`` (l_mask at image pixels,
    ``SEMI.MASK_CONSISTENCY_PIXELS``) the ``B x K x H x W`` maps themselves. ``pred_logits`` and ``attn_maps``
    (l_class's and l_align's targets) stay. The refinement acts on each class map alone with one set of weights
    per image, so the layers of one size are refined together as one stack of maps."""
    by_size: Dict[Tuple[int, ...], List[int]] = {}
    for index, layer in enumerate(targets):
        by_size.setdefault(tuple(layer.probs.shape[-2:]), []).append(index)
    probs: List[Optional[Tensor]] = [None] * len(targets)
    for size, indices in by_size.items():
        stack = torch.cat([targets[i].probs for i in indices], dim=1)
        refined = refine_to(stack, refinement, images, padding, images.shape[-2:] if at_image_resolution else size)
        for i, part in zip(indices, refined.split([targets[i].probs.shape[1] for i in indices], dim=1)):
            probs[i] = part
    return [replace(layer, probs=layer_probs) for layer, layer_probs in zip(targets, probs)]


@torch.no_grad()
def oracle_targets(targets: List[LayerTargets], labels: Tensor, at_image_resolution: bool = False,
                   teacher_coverage: bool = False) -> List[LayerTargets]:
    """``SEMI.ORACLE_LABELS`` (a diagnostic): every layer's ``probs`` (``B x K x h x w``) replaced by the one-hot
    hidden labels ``labels`` (``B x H x W`` long): at the label at each ``h x w`` cell's centre
    (:func:`~.label_maps.downsample_labels`), or with ``at_image_resolution`` (l_mask at image pixels,
    ``SEMI.MASK_CONSISTENCY_PIXELS``) ``B x K x H x W``, every pixel's own label; a value outside ``0..K-1``
    (255: padding, ignored) gives all-zero probabilities, below any threshold above 0, so no target. The teacher's
    ``pred_logits`` and ``attn_maps`` (l_class's and l_align's targets) stay.

    ``teacher_coverage`` (``SEMI.ORACLE_COVERAGE teacher``): each layer's one-hot label is scaled by that layer's
    teacher confidence (its top class probability; bilinearly upsampled maps at image resolution), so a pixel is
    a target exactly where the teacher's own pseudo-label would be, with the hidden label's class."""
    by_shape: Dict[Tuple[int, ...], Tensor] = {}  # layers of one size share one (read-only) target
    renamed = []
    for layer in targets:
        num_classes, size = layer.probs.shape[1], tuple(layer.probs.shape[-2:])
        key = (num_classes, *size)
        if key not in by_shape:
            small = labels.long() if at_image_resolution else downsample_labels(labels, size)
            valid = (small >= 0) & (small < num_classes)
            one_hot = F.one_hot(small.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).to(layer.probs)
            by_shape[key] = one_hot * valid[:, None]
        probs = by_shape[key]
        if teacher_coverage:
            teacher = layer.probs
            if at_image_resolution:
                teacher = F.interpolate(teacher, size=probs.shape[-2:], mode="bilinear", align_corners=False)
            probs = probs * teacher.max(dim=1, keepdim=True).values
        renamed.append(replace(layer, probs=probs))
    return renamed


@torch.no_grad()
def clip_checked_targets(model: nn.Module, unlabeled: Dict[str, Any], padding: Tensor
                         ) -> Tuple[GuidanceTargets, Dict[str, Any], Dict[str, Tensor]]:
    """CLIP's labels of the original views at the CMCR targets' resolution, the batch with its targets renamed
    by CLIP when ``SEMI.CLIP_RELABEL_OBJECTS`` (:func:`~hvlformer.modeling.clip_guidance.relabel_objects`, every
    decoder layer), and statistics: ``stat_clip_guidance_agreement``, on the pixels confident for both CLIP and
    the teacher's last layer (before renaming), the share where the two name the same class; with renaming,
    ``stat_clip_relabelled_fraction``, the share of the last layer's confident pixels renamed."""
    guidance, threshold = model.clip_guidance, model.unlabeled_criterion.confidence_threshold
    targets: List[LayerTargets] = unlabeled["targets"]
    clip_targets = clip_guidance_targets(model, guidance, unlabeled["image_original"], targets[-1].probs.shape[-2:],
                                         padding)
    confidence, teacher_labels = targets[-1].probs.max(dim=1)
    teacher_confident = confidence >= threshold
    both = clip_targets.confident & teacher_confident
    agree = (teacher_labels == clip_targets.labels) & both
    stats = {"stat_clip_guidance_agreement": agree.float().sum() / both.float().sum().clamp_min(1.0)}
    if guidance.relabel_objects:
        renamed = [replace(t, probs=relabel_objects(t.probs, clip_targets, threshold)) for t in targets]
        changed = (renamed[-1].probs.argmax(dim=1) != teacher_labels) & teacher_confident
        stats["stat_clip_relabelled_fraction"] = changed.float().sum() / teacher_confident.float().sum().clamp_min(1.0)
        unlabeled = {**unlabeled, "targets": renamed}
    return clip_targets, unlabeled, stats


def clip_guidance_terms(model: nn.Module, unlabeled: Dict[str, Any], weak_out: Dict[str, Any],
                        strong_out: Dict[str, Any], padding: Tensor,
                        clip_targets: Optional[GuidanceTargets] = None) -> Dict[str, Tensor]:
    """``loss_clip_guidance`` of the weak and strong views against the frozen CLIP's zero-shot labels of the
    original views (``unlabeled["image_original"]``, ``B x 3 x H x W`` 0-255; ``clip_targets`` when already
    computed, :func:`clip_checked_targets`), and the share of CLIP-confident pixels."""
    guidance = model.clip_guidance
    weak_layers, strong_layers = layer_outputs(weak_out), layer_outputs(strong_out)
    if clip_targets is None:
        clip_targets = clip_guidance_targets(model, guidance, unlabeled["image_original"],
                                             weak_layers[-1]["pred_masks"].shape[-2:], padding)
    return guidance(clip_targets, weak_layers, strong_layers, padding, unlabeled["cutmix_box"].to(model.device),
                    unlabeled["mix_order"].to(model.device))


@torch.no_grad()
def clip_zero_shot_inputs(model: nn.Module, guidance: CLIPGuidance, images: Tensor) -> Tuple[Tensor, Tensor]:
    """What :meth:`CLIPGuidance.targets` classifies: ``model``'s frozen E_I^0 dense embedding of ``images``
    (``B x 3 x H x W``, 0-255 -> ``B x C x h0 x w0``) and its text tower's ``K x C`` class embeddings. Also what
    ``tools/pseudo_label_quality.py --teacher clip`` scores, at two sizes from one pass."""
    reference_dense = model.backbone.reference_dense_embedding(model.normalize(images))
    return reference_dense, guidance.class_embeddings(model.text_encoder, model.class_names)


@torch.no_grad()
def clip_guidance_targets(model: nn.Module, guidance: CLIPGuidance, images: Tensor, size: Sequence[int],
                          padding: Optional[Tensor] = None) -> GuidanceTargets:
    """The dense CLIP guidance's labels (:meth:`CLIPGuidance.targets`) of ``images`` (``B x 3 x H x W``, 0-255)
    at ``size`` (``h, w``): ``model``'s frozen E_I^0 and text tower on its vocabulary."""
    return guidance.targets(*clip_zero_shot_inputs(model, guidance, images), size, padding)
