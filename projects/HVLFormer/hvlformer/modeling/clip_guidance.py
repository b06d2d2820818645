"""Dense CLIP guidance of the unlabeled views (SemiVL: Hoyer et al., "SemiVL: Semi-supervised semantic
segmentation with vision-language guidance", ECCV 2024, Sec. 3.4; not in the HVLFormer paper;
``SEMI.CLIP_GUIDANCE_*``, off by default).

Self-training can drift: a class the model confuses with another early on is pseudo-labelled as the other, and
every step on those pseudo-labels makes the next ones more wrong (confirmation bias). The frozen pretrained CLIP
cannot drift. Its zero-shot classification of each patch, ``softmax(s * cos(f0(p), u_k))`` with E_I^0's dense
embedding ``f0`` (the frozen reference encoder of L^V) and the plain-prompt text embedding ``u_k`` of class
``k``, is a second, fixed set of pseudo-labels; SemiVL trains the student views towards it where it is confident,
with a weight that decays linearly to zero over training: early, while the model's own pseudo-labels are still
being formed, the VLM anchors them; late, the model's own (better) ones take over.

Here the term has exactly the form of CMCR's ``l_mask`` (:func:`~hvlformer.modeling.cmcr.mask_consistency`),
with CLIP's hard labels in place of the original view's: for every decoder layer, the BCE of the weak view's
per-class probability maps (x ``MASK_WEIGHT_WEAK``) and of the strong view's (x ``MASK_WEIGHT_STRONG``; inside
the CutMix box CLIP's labels of the pasted image) against CLIP's one-hot labels, on the pixels where CLIP's top
probability reaches ``CLIP_GUIDANCE_THRESHOLD``, averaged over all valid pixels. So ``CLIP_GUIDANCE_WEIGHT`` is
the guidance's weight relative to ``l_mask`` (both are then scaled by ``SEMI.CMCR_WEIGHT`` and by the unlabeled
ramp-up). The training step applies the schedule: ``CLIP_GUIDANCE_WEIGHT`` at step 0, falling linearly to
``CLIP_GUIDANCE_FINAL_WEIGHT`` at ``SOLVER.MAX_ITER``.

``CLIP_GUIDANCE_EDGE_MARGIN`` (0 = SemiVL) keeps only the labels of CLIP's object interiors: a pixel is a target
only if CLIP gives every pixel within that many mask pixels (Chebyshev distance) the same class. CLIP's labels
come from a coarse patch grid (12 x 12 for the tiny model at 96 px, 2 mask pixels per patch), upsampled, so its
outlines are blurred over about one patch; the margin leaves the outlines to self-training and anchors only
which class an object is.

Decisions (docs/DESIGN.md, "Dense CLIP guidance"): CLIP sees the original view (no photometric change), as
SemiVL's MaskCLIP sees the weak view of UniMatch, which has none; the patch logits are upsampled bilinearly to
the mask resolution before the softmax; the default weight 0.2 -> 0 keeps SemiVL's ratio of guidance to
self-training (its 0.1 against its self-training's total weight of 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import Tensor, nn

from .clip_ensemble import PromptEmbeddings
from .cmcr import downsample_mask, view_pair_mask_consistency
from .regularization import fp32_loss

__all__ = ["CLIPGuidance", "GuidanceTargets", "interior", "connected_regions", "relabel_objects"]


def interior(labels: Tensor, num_classes: int, margin: int) -> Tensor:
    """``B x h x w`` bool: True where every pixel within ``margin`` (Chebyshev distance, inside the map) has the
    same label as the pixel itself, i.e. at least ``margin + 1`` pixels away from a change of ``labels``
    (``B x h x w`` long in ``[0, num_classes)``). The map's border is no change of label."""
    one_hot = F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    present = F.max_pool2d(one_hot, kernel_size=2 * margin + 1, stride=1, padding=margin)
    return present.sum(dim=1) == 1


@dataclass
class GuidanceTargets:
    """The frozen CLIP's pseudo-labels of a batch at the mask resolution ``h x w``."""

    labels: Tensor       # B x h x w long, CLIP's argmax class
    confident: Tensor    # B x h x w bool, top probability >= the threshold (and not padding)
    probs: Tensor        # B x K x h x w, CLIP's per-pixel class distribution


def connected_regions(mask: Tensor, labels: Optional[Tensor] = None) -> Tensor:
    """``... x h x w`` bool -> long region ids of the same shape: 0 off the mask, and on it one id per
    8-connected region, unique over the whole tensor (the largest flat index + 1 of the region's pixels).
    With ``labels`` (long, the mask's shape) two neighbours join only when their labels are equal, so one
    ``B x h x w`` label map gives every class's regions at once (instead of a ``B x K x h x w`` mask per class).
    Each step hands every pixel the largest id of its joined neighbours, on the tensor's device; a few dozen
    steps for the maps of the mask resolution."""
    shape = mask.shape
    flat = mask.reshape(-1, *shape[-2:])
    height, width = flat.shape[-2:]
    ids = torch.arange(1, flat.numel() + 1, device=mask.device).view(flat.shape) * flat
    # labels off the mask and in the padding never match a pixel on it (padding: -1, off the mask: -2)
    joined = (labels.reshape(flat.shape) if labels is not None else torch.zeros_like(ids)).masked_fill(~flat, -2)
    joined = F.pad(joined, (1, 1, 1, 1), value=-1)
    centre = joined[:, 1:-1, 1:-1]
    neighbours = [(dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]
    same = [joined[:, dy:dy + height, dx:dx + width] == centre for dy, dx in neighbours]
    while True:
        padded = F.pad(ids, (1, 1, 1, 1))
        grown = ids
        for (dy, dx), linked in zip(neighbours, same):
            grown = torch.where(linked, torch.maximum(grown, padded[:, dy:dy + height, dx:dx + width]), grown)
        if torch.equal(grown, ids):
            return ids.view(shape)
        ids = grown


@torch.no_grad()
def relabel_objects(probs: Tensor, clip: GuidanceTargets, threshold: float) -> Tensor:
    """The teacher's ``B x K x h x w`` per-class probabilities with each object region renamed by CLIP.

    A region is an 8-connected set of pixels whose top teacher probability reaches ``threshold`` for the same
    class ``k >= 1`` (0 is background). Among the region's pixels that CLIP is confident of, if one object class
    ``c != k`` holds more than half, the region's probabilities of ``k`` and ``c`` are swapped. Background,
    regions CLIP is not sure of, and renamings to background are left as they are.
    """
    num_classes = probs.shape[1]
    confidence, labels = probs.max(dim=1)
    objects = (confidence >= threshold) & (labels > 0)                               # B x h x w
    regions = connected_regions(objects, labels)                                     # B x h x w, one class each
    region_ids, regions = torch.unique(regions, return_inverse=True)  # compact ids: 0 .. number of regions
    votes = torch.zeros(region_ids.numel(), num_classes, device=probs.device)     # one row per region (+ none)
    voting = clip.confident & (region_ids[regions] > 0)
    votes.index_put_((regions[voting], clip.labels[voting]), torch.ones_like(regions[voting], dtype=votes.dtype),
                     accumulate=True)
    top_votes, top_class = votes.max(dim=1)
    renamed = (top_class > 0) & (top_votes > 0.5 * votes.sum(dim=1)) & (region_ids > 0)  # per region
    target = torch.where(renamed[regions], top_class[regions], labels)                     # B x h x w
    order = torch.arange(num_classes, device=probs.device).view(1, -1, 1, 1).expand_as(probs).clone()
    b, y, x = (target != labels).nonzero(as_tuple=True)
    order[b, labels[b, y, x], y, x] = target[b, y, x]
    order[b, target[b, y, x], y, x] = labels[b, y, x]
    return probs.gather(1, order)


class CLIPGuidance(nn.Module):
    """CLIP's zero-shot pseudo-labels (:meth:`targets`) and the guidance loss of the weak and strong views
    (:meth:`forward`); see the module docstring. No parameters."""

    @configurable
    def __init__(self, *, logit_scale: float, threshold: float = 0.9, template: str = "a photo of a {}.",
                 weak_weight: float = 0.5, strong_weight: float = 0.1, class_gradient: bool = True,
                 edge_margin: int = 0, relabel_objects: bool = False, loss: bool = True) -> None:
        """
        Args:
            logit_scale: CLIP's ``s`` (the exponentiated ``logit_scale`` of the pretrained model).
            threshold: CLIP's top probability a pixel needs to be a target (SemiVL: 0.9).
            template: the prompt of CLIP's classification (``{}`` = the class name).
            weak_weight, strong_weight: the views' weights (CMCR's ``l_mask`` weights, 1/2 and 1/10).
            class_gradient: whether the loss reaches the views' class logits (``SEMI.MASK_CONSISTENCY_CLASS_GRADIENT``).
            edge_margin: mask pixels around a change of CLIP's label that are no target (0: none are dropped).
            relabel_objects: CLIP renames the teacher's object regions (:func:`relabel_objects`;
                ``SEMI.CLIP_RELABEL_OBJECTS``).
            loss: whether the guidance loss is trained (a weight above zero at some step); False with
                ``relabel_objects`` alone.
        """
        super().__init__()
        if "{}" not in template:
            raise ValueError(f"SEMI.CLIP_GUIDANCE_TEMPLATE must hold '{{}}' for the class name, got {template!r}")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"SEMI.CLIP_GUIDANCE_THRESHOLD must be in (0, 1], got {threshold}")
        if edge_margin < 0:
            raise ValueError(f"SEMI.CLIP_GUIDANCE_EDGE_MARGIN must be >= 0, got {edge_margin}")
        self.logit_scale = float(logit_scale)
        self.threshold = threshold
        self.template = template
        self.weak_weight = weak_weight
        self.strong_weight = strong_weight
        self.class_gradient = class_gradient
        self.edge_margin = int(edge_margin)
        self.relabel_objects = relabel_objects
        self.loss = loss
        self._prompts = PromptEmbeddings(template)

    @classmethod
    def from_config(cls, cfg, clip_logit_scale: float) -> Dict[str, Any]:
        return {
            "logit_scale": clip_logit_scale,
            "threshold": cfg.SEMI.CLIP_GUIDANCE_THRESHOLD,
            "template": cfg.SEMI.CLIP_GUIDANCE_TEMPLATE,
            "weak_weight": cfg.SEMI.MASK_WEIGHT_WEAK,
            "strong_weight": cfg.SEMI.MASK_WEIGHT_STRONG,
            "class_gradient": cfg.SEMI.MASK_CONSISTENCY_CLASS_GRADIENT,
            "edge_margin": cfg.SEMI.CLIP_GUIDANCE_EDGE_MARGIN,
            "relabel_objects": cfg.SEMI.CLIP_RELABEL_OBJECTS,
            "loss": cfg.SEMI.CLIP_GUIDANCE_WEIGHT > 0 or cfg.SEMI.CLIP_GUIDANCE_FINAL_WEIGHT > 0,
        }

    @staticmethod
    def enabled(cfg) -> bool:
        """Whether the config asks for CLIP's labels of the unlabeled images (a guidance weight above zero at some
        step, or the renaming of the teacher's objects)."""
        return (cfg.SEMI.CLIP_GUIDANCE_WEIGHT > 0 or cfg.SEMI.CLIP_GUIDANCE_FINAL_WEIGHT > 0
                or bool(cfg.SEMI.CLIP_RELABEL_OBJECTS))

    def reset(self) -> None:
        """Forget the cached class embeddings (new vocabulary or new text-tower weights)."""
        self._prompts.reset()

    def class_embeddings(self, text_encoder: nn.Module, class_names: Sequence[str]) -> Tensor:
        """``K x C`` unit embeddings of the plain prompts by the frozen text tower, cached per vocabulary."""
        return self._prompts(text_encoder, class_names)

    @torch.no_grad()
    @fp32_loss
    def targets(self, reference_dense: Tensor, class_embeddings: Tensor, size: Sequence[int],
                padding: Optional[Tensor] = None) -> GuidanceTargets:
        """CLIP's pseudo-labels at the mask resolution.

        Args:
            reference_dense: ``B x C x h0 x w0`` E_I^0's dense embedding of the original views.
            class_embeddings: ``K x C`` unit text embeddings (:meth:`class_embeddings`).
            size: ``(h, w)``, the mask resolution of the decoder's predictions.
            padding: ``B x H x W`` bool, True on padded pixels (never targets).
        """
        dense = F.normalize(reference_dense.float(), dim=1)
        logits = self.logit_scale * torch.einsum("bchw,kc->bkhw", dense, class_embeddings.float())
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        confidence, labels = probs.max(dim=1)
        confident = confidence >= self.threshold
        if self.edge_margin > 0:
            confident &= interior(labels, probs.shape[1], self.edge_margin)
        if padding is not None:
            confident &= ~downsample_mask(padding.to(confident.device), size)
        return GuidanceTargets(labels, confident, probs)

    @fp32_loss
    def forward(self, targets: GuidanceTargets, weak_layers: List[Dict[str, Tensor]],
                strong_layers: List[Dict[str, Tensor]], padding: Tensor, cutmix_box: Tensor,
                mix_order: Tensor) -> Dict[str, Tensor]:
        """``loss_clip_guidance`` (unweighted by the schedule: summed over the layers) and statistics.

        weak_layers / strong_layers: the N decoder layers' predictions of the weak view and of the CutMix-ed
        strong view (``pred_logits`` ``B x Q x (K+1)``, ``pred_masks`` ``B x Q x h x w``); padding, cutmix_box:
        ``B x H x W`` bool; mix_order: ``B`` long (the image each box comes from).
        """
        size = targets.labels.shape[-2:]
        valid = ~downsample_mask(padding, size)
        box = downsample_mask(cutmix_box, size)
        loss = weak_layers[0]["pred_logits"].sum() * 0.0
        for weak, strong in zip(weak_layers, strong_layers):
            if weak["pred_masks"].shape[-2:] != size:
                raise ValueError(f"CLIP guidance targets are {tuple(size)}, the predictions "
                                 f"{tuple(weak['pred_masks'].shape[-2:])}")
            loss = loss + view_pair_mask_consistency(weak, strong, targets.labels, targets.confident, valid, box,
                                                     mix_order, self.weak_weight, self.strong_weight,
                                                     self.class_gradient)
        confident_fraction = (targets.confident & valid).float().sum() / valid.float().sum().clamp_min(1.0)
        return {"loss_clip_guidance": loss, "stat_clip_guidance_confident_fraction": confident_fraction.detach()}
