"""Cross-View and Modal Consistency Regularisation (CMCR, paper eq. 5 and supplement A.3) and the HierVL
entropy alternative.

For every decoder layer ``n = 1..N`` the original view ``I`` (detached, from the teacher) is the
target of the weak view ``I_w`` and of the strong (CutMix-ed) view ``I_s``:

- ``l_mask`` (paper supplement A.3.1 / eq. 2): BCE between the per-class probability maps of a view and the one-hot hard
  pseudo-label of the original view (summed over the class maps), kept on pixels whose original max
  probability is >= the confidence threshold and AVERAGED OVER ALL (non-padded) PIXELS, of the mask
  resolution (stride 4, one hard target per cell) or, with ``SEMI.MASK_CONSISTENCY_PIXELS`` N > 0, of N image
  pixels drawn per step (every pixel when N >= H x W, eq. 2's H x W; the targets' and views' maps read there
  bilinearly, as inference upsamples them): unconfident pixels contribute zero but still count in the denominator, as in the paper and
  UniMatch (``(loss * conf_mask).sum() / (ignore != 255).sum()``). Dividing by the confident pixels only
  would inflate the loss by 1 / confident-fraction early in training. Padding is not an image pixel and
  counts in neither sum. Weak view x 1/2, strong view x 1/10. The paper writes a leading minus sign; it is
  a typo, the loss is positive. Its gradient reaches the views' class logits and mask logits (eq. 2 as
  written); ``SEMI.MASK_CONSISTENCY_CLASS_GRADIENT False`` lets it reach the masks only
  (:func:`view_probability_maps`).
- ``l_class``: mean over queries of ``JS(C_i, C_w,i) + JS(C_i, C_s,i)`` of the softmax class
  distributions (K + 1 with no-object). With ``class_on_mixed=False`` (``SEMI.CLASS_CONSISTENCY_MIXED``)
  the strong term leaves out the images whose strong view holds a CutMix box, and averages over the
  others: the box adds the other image's objects and hides part of this one's, so the original view's
  per-query class distributions (a query's "which class, or none, is in this image") no longer describe
  the strong view; the paper's eq. 3 is silent on CutMix (decision in docs/DESIGN.md).
- ``l_align``: mean over queries of ``(1 - cos(A_i, A_w,i)) + (1 - cos(A_i, A_s,i))`` of the flattened
  cross-attention maps; pixels inside the CutMix box (whose content comes from another image) are
  excluded from both maps of the strong pair.

``L_CMCR = sum_n (l_mask + l_class + l_align)``. The strong view's pseudo-labels inside the CutMix box
come from the other image's original view, exactly like its pixels.

Precision: every term runs with autocast disabled on float32 inputs (:func:`~.regularization.fp32_loss`):
``F.binary_cross_entropy`` is forbidden under CUDA autocast, and under autocast the einsum of the
probability maps (and so the 0.95 threshold) would otherwise run in bf16/fp16 even on ``.float()`` inputs.

The "per-class probability map" of a prediction is its semantic score map (``sum_q softmax(c_q)[k] *
sigmoid(m_q)``, the inference output) normalised over the K classes, so it is a distribution per pixel.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import point_sample
from torch import Tensor, nn

from ..cutmix import mix_spatial
from .outputs import semantic_scores
from .regularization import fp32_loss

# strides of the levels the decoder layers cycle over (coarse to fine; layer n uses level n % 3)
LEVEL_STRIDES = (32, 16, 8)


@fp32_loss
def class_probability_maps(pred_logits: Tensor, pred_masks: Tensor, eps: float = 1e-6) -> Tensor:
    """``B x Q x (K+1)`` logits and ``B x Q x h x w`` mask logits -> ``B x K x h x w`` per-pixel distributions."""
    scores = semantic_scores(pred_logits, pred_masks)
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(eps)


def view_probability_maps(layer: Dict[str, Tensor], class_gradient: bool = True) -> Tensor:
    """``B x K x h x w`` per-class probability maps of one decoder layer of a view (``pred_logits``
    ``B x Q x (K+1)``, ``pred_masks`` ``B x Q x h x w``), as l_mask reads them.

    ``class_gradient=False`` detaches the class logits: the maps' values are unchanged, but l_mask's gradient
    reaches only the mask logits. A query's class distribution is one decision per image, so with the
    gradient a pixel pseudo-label of class ``j`` inside an object of class ``k`` also pushes the ``k``
    queries towards "no ``k`` in this image" (``SEMI.MASK_CONSISTENCY_CLASS_GRADIENT``; paper eq. 2 as
    written is ``True``)."""
    logits = layer["pred_logits"] if class_gradient else layer["pred_logits"].detach()
    return class_probability_maps(logits, layer["pred_masks"])


def layer_outputs(outputs: Dict) -> List[Dict[str, Tensor]]:
    """The N decoder layers' predictions (``aux_outputs[1:]`` + the final), each with ``attn_maps``."""
    aux = outputs.get("aux_outputs", [])
    final = {k: outputs[k] for k in ("pred_logits", "pred_masks", "attn_maps")}
    return [*aux[1:], final]


@fp32_loss
def js_divergence(p: Tensor, q: Tensor, eps: float = 1e-8) -> Tensor:
    """Jensen-Shannon divergence along the last dim of two probability tensors (natural log)."""
    m = 0.5 * (p + q)
    kl_pm = (p * (torch.log(p + eps) - torch.log(m + eps))).sum(-1)
    kl_qm = (q * (torch.log(q + eps) - torch.log(m + eps))).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


@fp32_loss
def mask_consistency(view_probs: Tensor, pseudo_labels: Tensor, confident: Tensor,
                     valid: Optional[Tensor] = None) -> Tensor:
    """l_mask of one view (supplement eq. 2): confidence-masked BCE averaged over all valid pixels.

    Args:
        view_probs: ``B x K x h x w`` per-class probability maps of the view.
        pseudo_labels: ``B x h x w`` long, the original view's hard pseudo-labels.
        confident: ``B x h x w`` bool, pixels whose original max probability passes the threshold (and
            that are valid).
        valid: ``B x h x w`` bool, the pixels that count in the average (non-padded); ``None`` = all.

    Returns ``sum_{confident} sum_k BCE(p_k, onehot_k) / #valid``: one BCE per class map, summed over the
    K classes (a mean over the classes would shrink the unlabeled signal by K); unconfident pixels add 0
    but count in the denominator. 0 (still in the graph) when no pixel is confident.
    """
    num_classes = view_probs.shape[1]
    target = F.one_hot(pseudo_labels.long(), num_classes).permute(0, 3, 1, 2).float()
    probs = view_probs.float().clamp(1e-6, 1 - 1e-6)
    bce = F.binary_cross_entropy(probs, target, reduction="none").sum(dim=1)  # B x h x w
    kept = confident if valid is None else confident & valid
    num_pixels = bce.new_tensor(float(bce.numel())) if valid is None else valid.sum().to(bce.dtype)
    return torch.where(kept, bce, torch.zeros_like(bce)).sum() / num_pixels.clamp_min(1.0)


def view_pair_mask_consistency(weak: Dict[str, Tensor], strong: Dict[str, Tensor], pseudo_labels: Tensor,
                               confident: Tensor, valid: Tensor, cutmix_box: Tensor, mix_order: Tensor,
                               weak_weight: float, strong_weight: float, class_gradient: bool = True,
                               pixel_coords: Optional[Tensor] = None) -> Tensor:
    """l_mask of one decoder layer's weak and strong views against one set of hard pseudo-labels:
    ``weak_weight * mask_consistency(weak) + strong_weight * mask_consistency(strong)``, where inside the
    strong view's CutMix box the pseudo-labels, confidences and validity are the pasted image's.

    Args:
        weak, strong: the layer's predictions of the two views (``pred_logits``, ``pred_masks``).
        pseudo_labels: ``B x h x w`` long; confident, valid: ``B x h x w`` bool (see :func:`mask_consistency`).
        cutmix_box: ``B x h x w`` bool at the same resolution; mix_order: ``B`` long (the image each box comes from).
        class_gradient: see :func:`view_probability_maps`.
        pixel_coords: ``P x 2`` (x, y in [0, 1]) image pixels (:func:`sample_image_pixels`) at which the views'
            maps are read (bilinear, as inference upsamples them); then ``pseudo_labels``, ``confident``,
            ``valid`` and ``cutmix_box`` are ``B x P x 1``, at those pixels. The same pixels in every image, so
            that inside a CutMix box the pasted image's pseudo-label is the one at the same place.
    """
    weak_probs = view_probability_maps(weak, class_gradient)
    strong_probs = view_probability_maps(strong, class_gradient)
    if pixel_coords is not None:
        weak_probs, strong_probs = at_pixels(weak_probs, pixel_coords), at_pixels(strong_probs, pixel_coords)
    mixed_pseudo = mix_spatial(pseudo_labels[:, None], cutmix_box, mix_order)[:, 0]
    mixed_confident = mix_spatial(confident[:, None], cutmix_box, mix_order)[:, 0]
    mixed_valid = mix_spatial(valid[:, None], cutmix_box, mix_order)[:, 0]
    return (weak_weight * mask_consistency(weak_probs, pseudo_labels, confident, valid)
            + strong_weight * mask_consistency(strong_probs, mixed_pseudo, mixed_confident, mixed_valid))


def sample_image_pixels(height: int, width: int, num_pixels: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """``num_pixels`` distinct pixels of an ``height x width`` image drawn at random (all of them, in order, when
    ``num_pixels >= height * width``): ``(flat indices P, coordinates P x 2)``, the coordinates (x, y) of the
    pixels' centres in [0, 1] as :func:`at_pixels` reads them."""
    total = height * width
    index = (torch.arange(total, device=device) if num_pixels >= total
             else torch.randperm(total, device=device)[:num_pixels])
    coords = torch.stack([(index % width).float().add(0.5) / width, (index // width).float().add(0.5) / height], dim=1)
    return index, coords


def at_pixels(maps: Tensor, pixel_coords: Tensor) -> Tensor:
    """``B x C x h x w`` maps at the image pixels ``pixel_coords`` (``P x 2``, from :func:`sample_image_pixels`) ->
    ``B x C x P x 1``: bilinear with ``align_corners=False``, the values the maps upsampled to the image's size
    (as inference upsamples the mask logits) hold there, the border pixels included (edge values, not zeros,
    outside the map's last cell centres, as ``F.interpolate`` does); a map at the image's own size gives its
    pixels exactly."""
    coords = pixel_coords[None].expand(maps.shape[0], -1, -1).to(maps.dtype)
    return point_sample(maps, coords, align_corners=False, padding_mode="border")[..., None]


@fp32_loss
def class_consistency(target_logits: Tensor, view_logits: Tensor) -> Tensor:
    """Mean over queries of JS(softmax(target), softmax(view)); ``B x Q x (K+1)`` each."""
    return js_divergence(target_logits.float().softmax(-1), view_logits.float().softmax(-1)).mean()


@fp32_loss
def class_consistency_per_image(target_logits: Tensor, view_logits: Tensor) -> Tensor:
    """``B``: the mean over queries of JS(softmax(target), softmax(view)) of each image (``B x Q x (K+1)``)."""
    return js_divergence(target_logits.float().softmax(-1), view_logits.float().softmax(-1)).mean(dim=1)


@fp32_loss
def align_consistency(target_attn: Tensor, view_attn: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Mean over queries of ``1 - cos`` of ``B x Q x L`` attention maps; ``valid``: ``B x L`` bool pixels kept."""
    target_attn, view_attn = target_attn.float(), view_attn.float()
    if valid is not None:
        keep = valid[:, None, :].to(target_attn.dtype)
        target_attn, view_attn = target_attn * keep, view_attn * keep
    return (1.0 - F.cosine_similarity(target_attn, view_attn, dim=-1, eps=1e-8)).mean()


@fp32_loss
def entropy_loss(probs: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Mean per-pixel entropy of ``B x K x h x w`` distributions over the ``valid`` (``B x h x w``) pixels."""
    entropy = -(probs.float() * torch.log(probs.float().clamp_min(1e-8))).sum(dim=1)
    if valid is None:
        return entropy.mean()
    return entropy[valid].mean() if valid.any() else entropy.sum() * 0.0


def downsample_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """``B x H x W`` bool -> ``B x h x w``: a cell is True when any pixel it covers is True."""
    return F.adaptive_max_pool2d(mask[:, None].float(), tuple(size))[:, 0] > 0


@dataclass
class LayerTargets:
    """Detached original-view targets of one decoder layer."""

    probs: Tensor           # B x K x h x w per-class probability maps
    pred_logits: Tensor     # B x Q x (K+1)
    attn_maps: Tensor       # B x Q x L


class CMCRLoss(nn.Module):
    """All CMCR terms over all decoder layers; see the module docstring. Also the entropy alternative."""

    @configurable
    def __init__(self, confidence_threshold: float = 0.95, weak_weight: float = 0.5, strong_weight: float = 0.1,
                 use_mask: bool = True, use_class: bool = True, use_align: bool = True, mode: str = "cmcr",
                 distribution_alignment_classes: int = 0, distribution_alignment_momentum: float = 0.99,
                 class_on_mixed: bool = True, mask_class_gradient: bool = True, mask_pixels: int = 0,
                 oracle_coverage: str = "all") -> None:
        """``distribution_alignment_classes``: K to switch distribution alignment on (0 = off, the paper);
        see :meth:`align_distribution`. ``class_on_mixed``: False leaves the CutMix-ed images out of
        l_class's strong term (see the module docstring). ``mask_class_gradient``: False detaches the views'
        class probabilities inside l_mask (see :func:`view_probability_maps`). ``mask_pixels``: 0 computes l_mask
        at the mask resolution (stride 4); N > 0 at N pixels of the image drawn per step (every pixel when N >= H x W:
        paper eq. 2's H x W), the maps read there bilinearly (:func:`at_pixels`). ``oracle_coverage``: with
        ``SEMI.ORACLE_LABELS`` (a diagnostic), ``"all"`` or ``"teacher"``: where the hidden labels are l_mask's
        targets (:func:`~hvlformer.modeling.unlabeled_objective.oracle_targets`); unused otherwise."""
        super().__init__()
        if oracle_coverage not in ("all", "teacher"):
            raise ValueError(f"SEMI.ORACLE_COVERAGE must be 'all' or 'teacher', got {oracle_coverage!r}")
        self.oracle_coverage = oracle_coverage
        if mask_pixels < 0:
            raise ValueError(f"SEMI.MASK_CONSISTENCY_PIXELS must be >= 0, got {mask_pixels}")
        self.mask_pixels = mask_pixels
        if mode not in ("cmcr", "entropy"):
            raise ValueError(f"MODEL.HIERVL.UNLABELED_LOSS must be 'cmcr' or 'entropy', got {mode!r}")
        if not 0.0 <= distribution_alignment_momentum < 1.0:
            raise ValueError(f"SEMI.DISTRIBUTION_ALIGNMENT_MOMENTUM must be in [0, 1), got {distribution_alignment_momentum}")
        self.distribution_alignment = distribution_alignment_classes > 0
        self.prior_momentum = distribution_alignment_momentum
        if self.distribution_alignment:
            # running class frequencies of the labeled pixels (checkpointed with the model) and the number
            # of batches they have seen (the first batch is copied, like the EMA teacher's warm-up)
            self.register_buffer("labeled_class_prior",
                                 torch.full((distribution_alignment_classes,), 1.0 / distribution_alignment_classes))
            self.register_buffer("prior_updates", torch.zeros((), dtype=torch.long))
        self.confidence_threshold = confidence_threshold
        self.weak_weight = weak_weight
        self.strong_weight = strong_weight
        self.use_mask = use_mask
        self.use_class = use_class
        self.use_align = use_align
        self.class_on_mixed = class_on_mixed
        self.mask_class_gradient = mask_class_gradient
        self.mode = mode

    @classmethod
    def from_config(cls, cfg, num_classes: int, mode: str = "cmcr") -> Dict[str, Any]:
        """``SEMI`` keys; ``num_classes`` K sizes the distribution-alignment prior; ``mode`` ``entropy`` is
        HierVL's alternative (``MODEL.HIERVL.UNLABELED_LOSS``)."""
        semi = cfg.SEMI
        if semi.ORACLE_COVERAGE != "all" and not semi.ORACLE_LABELS:
            raise ValueError(f"SEMI.ORACLE_COVERAGE {semi.ORACLE_COVERAGE!r} says where the oracle's labels are targets; "
                             "it needs SEMI.ORACLE_LABELS True")
        return {
            "confidence_threshold": semi.CONFIDENCE_THRESHOLD,
            "weak_weight": semi.MASK_WEIGHT_WEAK,
            "strong_weight": semi.MASK_WEIGHT_STRONG,
            "use_mask": semi.MASK_CONSISTENCY,
            "use_class": semi.CLASS_CONSISTENCY,
            "use_align": semi.ALIGN_CONSISTENCY,
            "mode": mode,
            "distribution_alignment_classes": num_classes if semi.DISTRIBUTION_ALIGNMENT else 0,
            "distribution_alignment_momentum": semi.DISTRIBUTION_ALIGNMENT_MOMENTUM,
            "class_on_mixed": semi.CLASS_CONSISTENCY_MIXED,
            "mask_class_gradient": semi.MASK_CONSISTENCY_CLASS_GRADIENT,
            "mask_pixels": semi.MASK_CONSISTENCY_PIXELS,
            "oracle_coverage": semi.ORACLE_COVERAGE,
        }

    @torch.no_grad()
    @fp32_loss
    def targets(self, teacher_outputs: Dict, padding: Optional[Tensor] = None) -> List[LayerTargets]:
        """Detached per-layer targets from the original view's decoder outputs (``padding``: ``B x H x W``
        bool, True = padded, left out of the distribution-alignment statistics)."""
        targets = [LayerTargets(class_probability_maps(out["pred_logits"], out["pred_masks"]),
                                out["pred_logits"].detach().float(), out["attn_maps"].detach().float())
                   for out in layer_outputs(teacher_outputs)]
        if self.distribution_alignment:
            targets = [replace(t, probs=self.align_distribution(t.probs, padding)) for t in targets]
        return targets

    @torch.no_grad()
    def observe_labels(self, labels: Tensor, ignore_value: int) -> None:
        """Update the running labeled class frequencies from a labeled batch ``B x H x W`` (long, with
        ``ignore_value``): ``prior = m_t * prior + (1 - m_t) * batch_frequencies`` with
        ``m_t = min(m, 1 - 1 / (t + 1))``, so the first batch is copied."""
        if not self.distribution_alignment:
            return
        num_classes = self.labeled_class_prior.numel()
        valid = labels[(labels != ignore_value) & (labels >= 0) & (labels < num_classes)]
        if valid.numel() == 0:
            return
        frequencies = torch.bincount(valid.flatten(), minlength=num_classes).float()
        frequencies = (frequencies / frequencies.sum()).to(self.labeled_class_prior)
        momentum = min(self.prior_momentum, 1.0 - 1.0 / (float(self.prior_updates) + 1.0))
        self.labeled_class_prior.mul_(momentum).add_(frequencies, alpha=1.0 - momentum)
        self.prior_updates += 1

    @fp32_loss
    def align_distribution(self, probs: Tensor, padding: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
        """Distribution alignment (ReMixMatch) of pseudo-label probabilities ``B x K x h x w``: every pixel's
        distribution is multiplied by ``labeled_class_prior / mean_prediction`` and renormalised, where
        ``mean_prediction`` (``K``) is the batch's mean distribution over its non-padded cells. A model that
        predicts one class of a confusable pair for both (in ``shapes``: circle for triangle, cross for
        square) then gives the under-predicted class its labeled share of the pseudo-labels, instead of
        self-training reinforcing the majority class."""
        if padding is None:
            cells = probs.new_ones(probs.shape[0], 1, *probs.shape[-2:])
        else:
            cells = (~downsample_mask(padding.to(probs.device), probs.shape[-2:]))[:, None].float()
        mean_prediction = (probs * cells).sum(dim=(0, 2, 3)) / cells.sum().clamp_min(1.0)
        ratio = self.labeled_class_prior.to(probs) / mean_prediction.clamp_min(eps)
        aligned = probs * ratio[None, :, None, None]
        return aligned / aligned.sum(dim=1, keepdim=True).clamp_min(eps)

    @fp32_loss
    def forward(self, targets: List[LayerTargets], weak_outputs: Dict, strong_outputs: Dict, padding: Tensor,
                cutmix_box: Tensor, mix_order: Tensor) -> Dict[str, Tensor]:
        """Unweighted CMCR terms summed over the layers, plus statistics (keys ``stat_*``, detached).

        targets: from :meth:`targets` on the original (un-mixed) view; weak/strong_outputs: decoder outputs
        of the weak view and of the CutMix-ed strong view; padding: ``B x H x W`` bool (True = padded,
        ignored), cutmix_box: ``B x H x W`` bool, mix_order: ``B`` long (the image each box comes from).
        """
        weak_layers, strong_layers = layer_outputs(weak_outputs), layer_outputs(strong_outputs)
        if not (len(targets) == len(weak_layers) == len(strong_layers)):
            raise ValueError("targets, weak and strong outputs must have the same number of decoder layers")
        zero = weak_outputs["pred_logits"].sum() * 0.0
        # only the switched-on terms appear in the result
        losses = {key: zero for key, on in (("loss_cmcr_mask", self.use_mask), ("loss_cmcr_class", self.use_class),
                                            ("loss_cmcr_align", self.use_align)) if on}
        confident_fraction = []
        image_size = padding.shape[-2:]
        # images whose strong view holds no CutMix box: the only ones in l_class's strong term unless class_on_mixed
        unmixed = ~cutmix_box.flatten(1).any(dim=1)
        pixel_coords = None
        if self.use_mask and self.mask_pixels > 0:  # l_mask at image pixels: the same ones for every layer and image
            index, pixel_coords = sample_image_pixels(*image_size, self.mask_pixels, padding.device)
            pixel_valid = (~padding).flatten(1)[:, index][..., None]
            pixel_box = cutmix_box.flatten(1)[:, index][..., None]
        for layer, (target, weak, strong) in enumerate(zip(targets, weak_layers, strong_layers)):
            if self.use_mask:
                if pixel_coords is None:  # at the mask resolution
                    mask_size = target.probs.shape[-2:]
                    box, valid = downsample_mask(cutmix_box, mask_size), ~downsample_mask(padding, mask_size)
                    confidence, pseudo = target.probs.max(dim=1)
                else:
                    box, valid = pixel_box, pixel_valid
                    confidence, pseudo = at_pixels(target.probs, pixel_coords).max(dim=1)
                confident = (confidence >= self.confidence_threshold) & valid
                losses["loss_cmcr_mask"] = losses["loss_cmcr_mask"] + view_pair_mask_consistency(
                    weak, strong, pseudo, confident, valid, box, mix_order, self.weak_weight, self.strong_weight,
                    self.mask_class_gradient, pixel_coords)
                confident_fraction.append(confident.float().sum() / valid.float().sum().clamp_min(1.0))
            if self.use_class:
                if self.class_on_mixed:
                    strong_term = class_consistency(target.pred_logits, strong["pred_logits"])
                else:
                    strong_js = class_consistency_per_image(target.pred_logits, strong["pred_logits"])
                    kept = unmixed.to(strong_js.device)
                    strong_term = (torch.where(kept, strong_js, torch.zeros_like(strong_js)).sum()
                                   / kept.sum().clamp_min(1))
                losses["loss_cmcr_class"] = losses["loss_cmcr_class"] + (
                    class_consistency(target.pred_logits, weak["pred_logits"]) + strong_term)
            if self.use_align:
                stride = LEVEL_STRIDES[layer % len(LEVEL_STRIDES)]
                level_size = (image_size[0] // stride, image_size[1] // stride)
                outside_box = ~downsample_mask(cutmix_box, level_size).flatten(1)
                losses["loss_cmcr_align"] = losses["loss_cmcr_align"] + (
                    align_consistency(target.attn_maps, weak["attn_maps"])
                    + align_consistency(target.attn_maps, strong["attn_maps"], outside_box))
        if confident_fraction:
            losses["stat_confident_fraction"] = torch.stack(confident_fraction).mean().detach()
        return losses

    @fp32_loss
    def entropy(self, weak_outputs: Dict, strong_outputs: Dict, padding: Tensor) -> Dict[str, Tensor]:
        """HierVL: entropy minimisation of the final per-pixel class distributions of both views."""
        terms = []
        for outputs in (weak_outputs, strong_outputs):
            probs = class_probability_maps(outputs["pred_logits"], outputs["pred_masks"])
            terms.append(entropy_loss(probs, ~downsample_mask(padding, probs.shape[-2:])))
        return {"loss_entropy": sum(terms)}
