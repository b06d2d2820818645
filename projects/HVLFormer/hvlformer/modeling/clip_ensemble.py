"""Open-vocabulary inference with the frozen CLIP's own classification of each mask (``TEST.CLIP_ENSEMBLE``).

HVLFormer's classifier (``CLASSIFIER text``) scores a query against any vocabulary, but its projection of a
query into the text space is fitted on the training classes only: on ``shapes``, a name never labeled for
segmentation got no pixel although its queries' masks covered its shapes and the pretrained CLIP alone
segments it well (docs/RESULTS.md, "(e) open vocabulary"). The pretrained CLIP keeps the open vocabulary
that segmentation training narrows, so inference can ask it too, as FC-CLIP does (Yu et al., "Convolutions
die hard", NeurIPS 2023, Sec. 3.3 "geometric ensemble"): for every query ``q`` and class ``k``

* ``v_q = normalize(sum_p sigmoid(m_q(p)) f0(p) / sum_p sigmoid(m_q(p)))``: the frozen reference tower
  E_I^0's dense embedding ``f0`` (the pretrained CLIP, as L^V's anchor) pooled under the query's soft mask;
* ``p_clip(k | q) = softmax_k(s * cos(v_q, u_k))`` with ``u_k`` the frozen text tower's embedding of a plain
  prompt ("a photo of a {}.") and ``s`` the CLIP model's learned logit scale (or ``1 / TEMPERATURE``);
* ``p(k | q) ~ p_dec(k | q)^(1 - w_k) * p_clip(k | q)^w_k``, renormalised over the K classes, with
  ``p_dec`` the decoder's distribution over the K classes (no-object left out) and ``w_k`` =
  ``SEEN_WEIGHT`` for a class of the training vocabulary, ``UNSEEN_WEIGHT`` for any other name;
* the decoder's no-object probability is kept: ``[p(k | q) * (1 - p_dec(none | q)), p_dec(none | q)]``.

The result replaces the query's class logits (as log-probabilities), so Mask2Former's semantic inference
(:func:`~hvlformer.modeling.outputs.semantic_scores`) is unchanged.

``LEVEL pixel`` applies the same rule to each pixel instead of each mask: the decoder's per-pixel class
distribution ``p_seg(k | p) = S_k(p) / sum_j S_j(p)`` (``S`` Mask2Former's semantic scores, decoder alone)
and CLIP's own per-patch one ``p_clip(k | p) = softmax_k(s * cos(f0(p), u_k))`` (its logits upsampled
bilinearly to the image) give ``p(k | p) ~ p_seg^(1 - w_k) * p_clip^w_k``, scaled back by ``sum_j S_j(p)``
(:func:`pixel_geometric_ensemble`). A mask is classified as a whole, so a shape the decoder leaves under
another class's mask (on ``shapes`` the hollow ring, under the background's) can only be found when the
unit is the pixel. Same weights, no new parameter; the levels are alternatives, CLIP is not counted
twice.

``LEVEL pixel_unseen`` is ``pixel`` with the split among the training names left to the decoder: the mixture
above decides only how much of each pixel goes to each name never labeled for segmentation; the share it leaves
to the training names (``sum_{j seen} p(j | p)``) is divided among them as the decoder divides it
(``p_seg(k | p) / sum_{j seen} p_seg(j | p)``). CLIP's 8 px patch map, coarser than the decoder's masks, then
reaches a training class only where an unseen name takes the pixel, and with the training vocabulary alone
the result is exactly the decoder's (:func:`pixel_geometric_ensemble`'s ``decoder_split``). Off by default (the paper's model);
needs ``MODEL.HVLFORMER.CLIP.PRETRAINED`` (E_I^0 is rebuilt from it at inference, see
:func:`~hvlformer.modeling.clip_loader.reference_needed_at_test`). The weights 0.4 / 0.8 are FC-CLIP's, not
tuned here. Design notes: docs/DESIGN.md, "Open vocabulary".
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import Tensor, nn

__all__ = ["CLIPEnsemble", "mask_pooled_embeddings", "geometric_ensemble", "pixel_geometric_ensemble",
           "LEVELS"]

#: the unit CLIP classifies: a query's mask (FC-CLIP), each pixel of the image, or each pixel with the split among
#: the training names kept from the decoder
LEVELS = ("mask", "pixel", "pixel_unseen")


def mask_pooled_embeddings(pred_masks: Tensor, dense: Tensor) -> Tensor:
    """Unit embeddings ``B x Q x C`` of the dense map ``dense`` (``B x C x h x w``) averaged under each query's
    soft mask (``pred_masks``: ``B x Q x H x W`` logits, resized to ``h x w`` first)."""
    masks = F.interpolate(pred_masks.float(), size=dense.shape[-2:], mode="bilinear", align_corners=False).sigmoid()
    pooled = torch.einsum("bqhw,bchw->bqc", masks, dense.float())
    pooled = pooled / masks.sum(dim=(-2, -1)).clamp(min=1e-6).unsqueeze(-1)
    return F.normalize(pooled, dim=-1)


def _mix(decoder_log: Tensor, clip_log: Tensor, weights: Tensor, dim: int) -> Tensor:
    """The rule of both levels: ``softmax((1 - w_k) log p_dec + w_k log p_clip)`` over the classes (``dim``);
    ``weights`` broadcast against the class axis."""
    return ((1.0 - weights) * decoder_log + weights * clip_log).softmax(dim=dim)


def geometric_ensemble(pred_logits: Tensor, clip_probs: Tensor, class_weights: Tensor) -> Tensor:
    """Mix the decoder's class distribution with CLIP's (see the module docstring).

    Args:
        pred_logits: ``B x Q x (K+1)`` decoder logits (last = no object).
        clip_probs: ``B x Q x K`` CLIP's class probabilities of each query's mask.
        class_weights: ``K`` exponents ``w_k`` of CLIP's probability (0 = the decoder alone, 1 = CLIP alone).

    Returns:
        ``B x Q x (K+1)`` log-probabilities: the mixed K-class distribution scaled by ``1 - p_none``, then the
        decoder's ``p_none``.
    """
    probs = pred_logits.float().softmax(dim=-1)
    no_object = probs[..., -1:]
    decoder_log = pred_logits.float()[..., :-1].log_softmax(dim=-1)
    mixed = _mix(decoder_log, clip_probs.float().clamp(min=1e-12).log(), class_weights.to(decoder_log), dim=-1)
    return torch.cat([mixed * (1.0 - no_object), no_object], dim=-1).clamp(min=1e-12).log()


def pixel_geometric_ensemble(scores: Tensor, clip_logits: Tensor, class_weights: Tensor,
                             decoder_split: Optional[Tensor] = None) -> Tensor:
    """The geometric ensemble per pixel (``LEVEL pixel`` / ``pixel_unseen``, see the module docstring).

    Args:
        scores: ``B x K x H x W`` Mask2Former semantic scores (``sum_q p(k | q) sigmoid(m_q)``, >= 0).
        clip_logits: ``B x K x H x W`` CLIP's per-pixel class logits ``s * cos(f0(p), u_k)``.
        class_weights: ``K`` exponents ``w_k`` of CLIP's probability (0 = the decoder alone, 1 = CLIP alone).
        decoder_split: optional ``K`` bools (``LEVEL pixel_unseen``: the training names). The mixture's total
            share of these classes is kept and divided among them in the decoder's proportions; the other
            classes keep the mixture's probabilities. None = the mixture for every class (``LEVEL pixel``).

    Returns:
        ``B x K x H x W`` scores: the mixed per-pixel class distribution times the pixel's total score
        ``sum_k S_k(p)``, so that each pixel keeps the decoder's total and only its split over classes changes.
    """
    scores = scores.float()
    total = scores.sum(dim=1, keepdim=True)
    decoder = (scores / total.clamp(min=1e-12)).clamp(min=1e-12)
    weights = class_weights.to(decoder).view(1, -1, 1, 1)
    mixed = _mix(decoder.log(), clip_logits.float().log_softmax(dim=1), weights, dim=1)
    if decoder_split is not None:
        kept = decoder_split.to(device=decoder.device, dtype=torch.bool).view(1, -1, 1, 1)
        kept_share = mixed.masked_fill(~kept, 0.0).sum(dim=1, keepdim=True)
        decoder_kept = decoder.masked_fill(~kept, 0.0)
        decoder_kept = decoder_kept / decoder_kept.sum(dim=1, keepdim=True).clamp(min=1e-12)
        mixed = torch.where(kept, decoder_kept * kept_share, mixed)
    return mixed * total


class PromptEmbeddings:
    """``K x C`` unit embeddings of ``template.format(name)`` for each class name by the frozen text tower (no
    learned context), cached per vocabulary, device and dtype; shared by the CLIP ensemble and the dense CLIP
    guidance (:mod:`hvlformer.modeling.clip_guidance`)."""

    def __init__(self, template: str) -> None:
        self.template = template
        self._cache: Optional[Tuple[Any, Tensor]] = None

    def reset(self) -> None:
        """Forget the cached embeddings (new vocabulary or new text-tower weights)."""
        self._cache = None

    def __call__(self, text_encoder: nn.Module, class_names: Sequence[str]) -> Tensor:
        weight = text_encoder.tower.token_embedding.weight
        key = (tuple(class_names), weight.device, weight.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, text_encoder.reference_embeddings([self.template.format(n) for n in class_names]))
        return self._cache[1]


class CLIPEnsemble(nn.Module):
    """The geometric ensemble of the decoder's and the frozen CLIP's class probabilities (no parameters)."""

    @configurable
    def __init__(self, *, logit_scale: float, seen_weight: float = 0.4, unseen_weight: float = 0.8,
                 template: str = "a photo of a {}.", level: str = "mask") -> None:
        """
        Args:
            logit_scale: ``s``, the scale of CLIP's cosine similarities (CLIP's learned ``exp(logit_scale)``).
            seen_weight, unseen_weight: CLIP's exponent for classes of the training vocabulary / other names.
            template: the prompt of CLIP's classification (``{}`` = the class name).
            level: ``mask`` (each query's mask, FC-CLIP), ``pixel`` (each pixel, :func:`pixel_geometric_ensemble`)
                or ``pixel_unseen`` (each pixel, the split among the training names kept from the decoder).
        """
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"TEST.CLIP_ENSEMBLE.LEVEL must be one of {LEVELS}, got {level!r}")
        for name, value in (("seen_weight", seen_weight), ("unseen_weight", unseen_weight)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TEST.CLIP_ENSEMBLE: {name} must be in [0, 1], got {value}")
        if logit_scale <= 0:
            raise ValueError(f"TEST.CLIP_ENSEMBLE: the logit scale must be positive, got {logit_scale}")
        if "{}" not in template:
            raise ValueError(f"TEST.CLIP_ENSEMBLE.TEMPLATE must hold '{{}}' for the class name, got {template!r}")
        self.logit_scale = float(logit_scale)
        self.seen_weight = float(seen_weight)
        self.unseen_weight = float(unseen_weight)
        self.template = template
        self.level = level
        self._prompts = PromptEmbeddings(template)

    @classmethod
    def from_config(cls, cfg, clip_logit_scale: float) -> Dict[str, Any]:
        """``clip_logit_scale``: ``exp(logit_scale)`` of the loaded CLIP model, used when TEMPERATURE is 0."""
        c = cfg.TEST.CLIP_ENSEMBLE
        return {
            "logit_scale": 1.0 / c.TEMPERATURE if c.TEMPERATURE > 0 else float(clip_logit_scale),
            "seen_weight": c.SEEN_WEIGHT,
            "unseen_weight": c.UNSEEN_WEIGHT,
            "template": c.TEMPLATE,
            "level": c.LEVEL,
        }

    def reset(self) -> None:
        """Forget the cached class embeddings (new vocabulary or new text-tower weights)."""
        self._prompts.reset()

    def class_embeddings(self, text_encoder: nn.Module, class_names: Sequence[str]) -> Tensor:
        """``u``: ``K x C`` unit embeddings of the plain prompts by the frozen text tower (no learned context),
        cached per vocabulary."""
        return self._prompts(text_encoder, class_names)

    def class_weights(self, class_names: Sequence[str], training_class_names: Sequence[str],
                      device: torch.device) -> Tensor:
        """``K`` exponents: ``seen_weight`` for names of the training vocabulary, ``unseen_weight`` otherwise."""
        seen = self.seen_classes(class_names, training_class_names, device)
        return torch.where(seen, self.seen_weight, self.unseen_weight)

    @staticmethod
    def seen_classes(class_names: Sequence[str], training_class_names: Sequence[str],
                     device: torch.device) -> Tensor:
        """``K`` bools: True for the names of the training vocabulary."""
        seen = set(training_class_names)
        return torch.tensor([n in seen for n in class_names], dtype=torch.bool, device=device)

    def forward(self, pred_logits: Tensor, pred_masks: Tensor, reference_dense: Tensor, class_embeddings: Tensor,
                class_weights: Tensor) -> Tensor:
        """New ``B x Q x (K+1)`` class logits (log-probabilities).

        Args:
            pred_logits: ``B x Q x (K+1)``; pred_masks: ``B x Q x H x W`` logits (the decoder's last layer).
            reference_dense: ``B x C x h x w`` dense embedding of E_I^0 for the same images.
            class_embeddings: ``K x C`` unit text embeddings (:meth:`class_embeddings`).
            class_weights: ``K`` (:meth:`class_weights`).
        """
        pooled = mask_pooled_embeddings(pred_masks, reference_dense)
        clip_probs = (self.logit_scale * pooled @ class_embeddings.float().t()).softmax(dim=-1)
        return geometric_ensemble(pred_logits, clip_probs, class_weights)

    def pixel_logits(self, reference_dense: Tensor, class_embeddings: Tensor) -> Tensor:
        """CLIP's per-patch class logits ``B x K x h x w``: ``s * cos(f0(p), u_k)`` for ``LEVEL pixel``.

        Args:
            reference_dense: ``B x C x h x w`` dense embedding of E_I^0; class_embeddings: ``K x C`` unit vectors.
        """
        dense = F.normalize(reference_dense.float(), dim=1)
        return self.logit_scale * torch.einsum("bchw,kc->bkhw", dense, class_embeddings.float())
