"""Class-Aware Affinity (CAA), thesis chapter 3 (Sec. 3.2, eqs. 3.1-3.12), on one pixel-decoder level.

Shapes: ``B`` batch, ``D`` level width, ``D'`` reduced width, ``K`` classes, ``h x w`` the level's grid
(stride ``s >= 8`` of the input), ``P = h * w`` pixels of the level, ``C`` text-embedding width.

Forward (``ClassAwareAffinity.forward``):

1. ``F' = ReLU(Norm(Conv1x1(F)))``: ``B x D' x h x w`` (Sec. 3.2.3, the channel reduction to D').
2. Coarse prediction ``F_coarse``: ``B x K x h x w``, cosine between ``F'`` and the projected class text
   embeddings over a learnable temperature (auxiliary CE, eq. 3.10, weight 0.4).
3. Class centres (eq. 3.1): ``F_center = softmax_P(F_coarse) @ F'^T``: ``B x K x D'``.
4. Affinity (Sec. 3.2.4): ``e = Conv1x1(ReLU(Norm(Conv1x1(F))))`` (the "two 1x1 convolutions"),
   ``M_ij = sigmoid(a * cos(e_i, e_j) + b)``: ``B x P x P`` (BCE against the label affinity, eq. 3.9).
5. ``F_intra = M F' / rowsum(M)``, ``F_inter = (1 - M) F' / rowsum(1 - M)`` (eqs. 3.2, 3.3), each
   ``B x P x D'``; the inter term is computed as ``(sum_j F'_j - M F') / (P - rowsum(M))`` so that no
   second ``P x P`` map is materialised.
6. Intra / inter association (eqs. 3.4-3.7): ``r = softmax_K(F_intra F_center^T / sqrt(D'))``,
   ``F~_intra = r F_center`` (and ``t``, ``F~_inter`` alike): ``B x P x D'``.
7. Fusion (eq. 3.8): ``F_out = F + Delta(Concat(F, F~_intra, F~_inter))`` with ``Delta`` a 1x1 conv
   ``D + 2D' -> D``: ``B x D x h x w``.

Losses (separate functions, eq. 3.12 with lambda_2 = 1, lambda_3 = 0.4; the segmentation loss is the host
model's own): :func:`caa_affinity_loss` (eq. 3.9) and :func:`caa_auxiliary_loss` (eq. 3.10);
:func:`affinity_targets` builds the label affinity ``L = G G^T`` of Fig. 3.5.

Memory (why the map is built from an embedding and not predicted with ``P`` output channels). A head that
predicts the ``P x P`` map with a 1x1 conv of ``P`` output channels (the thesis's ``512 x 64 x 64`` example)
fixes ``P`` and hence the input size; here ``M`` is a product of per-pixel embeddings, so any input size
works, but its memory grows with the square of the pixel count::

    entries(M) = B * P^2,   P = ceil(H / s) * ceil(W / s)
    training:  4 float32 maps + 1 bool map kept for the backward (the scaled cosine, the logits, M = sigmoid,
               the BCE target; the "valid pair" mask), i.e. about 17 * B * P^2 bytes (counted with
               saved-tensor hooks in tests/modeling/thesis/test_thesis_caa.py);
    inference: 2 float32 maps held (the returned logits and M), 3 for a moment while the logits are scaled:
               8 to 12 * B * P^2 bytes.

    crop 512 x 512,  s = 8  : P = 4096,  P^2 = 16.8 M -> 64 MiB per map, 272 MiB / image training, 128-192 MiB inference
    crop 512 x 512,  s = 16 : P = 1024,  P^2 = 1.05 M ->  4 MiB per map,  17 MiB / image training
    crop 801 -> 832 (Cityscapes, padded to 32), s = 8 : P = 10816, P^2 = 117 M -> 446 MiB per map,
                              1.85 GiB / image training (a batch of 8: 14.8 GiB; use s = 16 there)
    crop 801 -> 832, s = 16 : P = 2704,  P^2 = 7.3 M  -> 28 MiB per map, 119 MiB / image training

Decisions (where chapter 3 leaves things open):

- ``D' = D / 2`` by default (128 at the paper's width 256): half the width keeps the ``P x P`` products and
  the class centres cheap while the fusion conv still sees the full ``D``.
- Affinity head: a shared embedding and a cosine, so ``M`` is symmetric like its target ``G G^T``, bounded,
  and independent of the input size; ``a`` (init 5) and ``b`` (init 0) are learnable.
- ``M`` is row-normalised in eqs. 3.2 / 3.3 (a mean over the same-class / other-class pixels, not a sum):
  an unnormalised sum grows with ``P``, which would again tie the feature scale to the input size.
- ``softmax(F_coarse)`` of eq. 3.1 is taken over the pixels (OCR's object-region convention): every centre
  is a convex combination of pixel features, so it has the scale of a feature whatever ``P`` is.
- The coarse classifier scores pixels against the class TEXT embeddings (not a ``K``-way conv), so CAA
  follows the model's vocabulary (a new vocabulary at inference works).
- Norm: ``GN`` by default (batch-size independent; the pixel decoder's own norm; ``gcd(32, D')`` groups),
  ``BN`` selectable.
- The fusion is residual and ``Delta`` starts at zero: the module is the identity at initialisation, so it
  can be switched on when fine-tuning a trained HVLFormer without disturbing it (the thesis's plain
  ``Delta(Concat(...))`` would replace ``F``).
- Affinity target: the label map is downsampled by nearest neighbour to ``h x w`` (Fig. 3.5), pairs with an
  ignore pixel are excluded from the BCE mean.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import get_norm
from torch import Tensor, nn

from ..regularization import fp32_loss

__all__ = ["ClassAwareAffinity", "class_centers", "intra_inter_features", "class_association", "affinity_targets", "caa_affinity_loss", "caa_auxiliary_loss", "caa_affinity_bytes"]


def caa_affinity_bytes(height: int, width: int, stride: int, batch: int = 1, bytes_per_entry: int = 4) -> int:
    """Bytes of ONE ``P x P`` affinity map for an input of ``height x width`` at ``stride`` (see module
    docstring): ``bytes_per_entry * batch * (ceil(H/s) * ceil(W/s))^2``."""
    pixels = math.ceil(height / stride) * math.ceil(width / stride)
    return bytes_per_entry * batch * pixels * pixels


def affinity_targets(labels: Tensor, ignore_value: int = 255):
    """Label affinity of Fig. 3.5 on an already downsampled label map.

    Args:
        labels: ``B x h x w`` class indices (``ignore_value`` = unlabeled).

    Returns ``(target, valid)``, both ``B x P x P`` bool: ``target[b, i, j]`` = pixels i and j have the same
    class (``G G^T`` of the one-hot ``G``); ``valid[b, i, j]`` = neither pixel is ignored.
    """
    flat = labels.flatten(1)
    known = flat != ignore_value
    target = flat[:, :, None] == flat[:, None, :]
    valid = known[:, :, None] & known[:, None, :]
    return target & valid, valid


@fp32_loss
def caa_affinity_loss(affinity_logits: Tensor, labels: Tensor, ignore_value: int = 255) -> Tensor:
    """Eq. 3.9: BCE between ``sigmoid(affinity_logits)`` (``B x P x P``) and the label affinity of
    ``labels`` (``B x h x w`` with ``h * w = P``, already at the level's resolution), averaged over the pairs
    where neither pixel is ``ignore_value``. 0 (with a graph) when no pair is valid."""
    target, valid = affinity_targets(labels, ignore_value)
    losses = F.binary_cross_entropy_with_logits(affinity_logits.float(), target.float(), reduction="none")
    count = valid.sum()
    if count == 0:
        return affinity_logits.sum() * 0.0
    return (losses * valid).sum() / count


@fp32_loss
def caa_auxiliary_loss(coarse_logits: Tensor, labels: Tensor, ignore_value: int = 255) -> Tensor:
    """Eq. 3.10: cross-entropy of the coarse prediction ``B x K x h x w``, bilinearly upsampled to the label
    size ``B x H x W``, ignoring ``ignore_value``. 0 (with a graph) when every pixel is ignored."""
    logits = F.interpolate(coarse_logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    if not (labels != ignore_value).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_value)


def class_centers(coarse_logits: Tensor, reduced: Tensor) -> Tensor:
    """Eq. 3.1: ``softmax_P(F_coarse) @ F'^T``: coarse ``B x K x h x w``, ``F'`` ``B x D' x h x w`` ->
    ``B x K x D'`` (each centre a convex combination of the pixel features)."""
    return torch.einsum("bkp,bdp->bkd", coarse_logits.flatten(2).softmax(dim=-1), reduced.flatten(2))


def intra_inter_features(affinity: Tensor, pixels: Tensor, eps: float = 1e-6):
    """Eqs. 3.2 / 3.3, row-normalised: affinity ``M`` ``B x P x P`` in [0, 1], pixel features ``B x P x D'``
    -> (``F_intra``, ``F_inter``), each ``B x P x D'``: the ``M``- and ``(1 - M)``-weighted means over the
    pixels. ``(1 - M) F`` is computed as ``sum_j F_j - M F`` (no second ``P x P`` map)."""
    same_sum = torch.bmm(affinity, pixels)
    same_mass = affinity.sum(dim=-1, keepdim=True)
    intra = same_sum / same_mass.clamp_min(eps)
    inter = (pixels.sum(dim=1, keepdim=True) - same_sum) / (pixels.shape[1] - same_mass).clamp_min(eps)
    return intra, inter


def class_association(pixels: Tensor, centers: Tensor) -> Tensor:
    """Eqs. 3.4-3.7: ``sum_j softmax_j(pixels_i . centers_j / sqrt(D')) centers_j``: pixels ``B x P x D'``,
    centres ``B x K x D'`` -> ``B x P x D'``."""
    scale = 1.0 / math.sqrt(pixels.shape[-1])
    return torch.bmm((torch.bmm(pixels, centers.transpose(1, 2)) * scale).softmax(dim=-1), centers)


class ClassAwareAffinity(nn.Module):
    """CAA on one feature map (see the module docstring for the equations, memory and decisions)."""

    @configurable
    def __init__(self, *, in_channels: int, text_dim: int, reduced_dim: int = 0, norm: str = "GN",
                 init_temperature: float = 0.07) -> None:
        """
        Args:
            in_channels: D, the width of the pixel-decoder level CAA refines.
            text_dim: C, the width of the class text embeddings of the coarse classifier.
            reduced_dim: D' (0 = D // 2).
            norm: detectron2 norm name of the reductions ("GN", "BN", "SyncBN", "" = none).
            init_temperature: initial temperature of the coarse cosine classifier.
        """
        super().__init__()
        reduced = reduced_dim or in_channels // 2
        if reduced < 1:
            raise ValueError(f"reduced_dim must be >= 1, got {reduced}")
        self.in_channels, self.reduced_dim = in_channels, reduced

        def reduce() -> nn.Sequential:
            # GN with gcd(32, D') groups, so any D' works (detectron2's "GN" needs a multiple of 32)
            layer = nn.GroupNorm(math.gcd(32, reduced), reduced) if norm == "GN" else get_norm(norm, reduced)
            layers = [nn.Conv2d(in_channels, reduced, 1, bias=not norm)] + ([layer] if layer is not None else [])
            return nn.Sequential(*layers, nn.ReLU(inplace=True))

        self.reduce = reduce()                                       # F -> F' (Sec. 3.2.3)
        self.affinity_embed = nn.Sequential(reduce(), nn.Conv2d(reduced, reduced, 1))  # the two 1x1 convs
        self.affinity_scale = nn.Parameter(torch.tensor(5.0))        # a
        self.affinity_bias = nn.Parameter(torch.tensor(0.0))         # b
        self.text_proj = nn.Linear(text_dim, reduced)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.fuse = nn.Conv2d(in_channels + 2 * reduced, in_channels, 1)  # Delta (eq. 3.8)
        nn.init.zeros_(self.fuse.weight)
        nn.init.zeros_(self.fuse.bias)

    @classmethod
    def from_config(cls, cfg, text_dim: int, in_channels: Optional[int] = None) -> Dict[str, Any]:
        """``text_dim``: the CLIP text width (known once the CLIP model is built, not a config key);
        ``in_channels`` defaults to the pixel decoder's ``CONVS_DIM``."""
        caa = cfg.MODEL.HVLFORMER.CAA
        return {"in_channels": in_channels or cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, "text_dim": text_dim,
                "reduced_dim": caa.REDUCED_DIM, "norm": caa.NORM}

    def coarse_logits(self, reduced: Tensor, class_embeddings: Tensor) -> Tensor:
        """``F'`` ``B x D' x h x w``, class embeddings ``K x C`` -> ``F_coarse`` ``B x K x h x w``."""
        text = F.normalize(self.text_proj(class_embeddings.to(reduced.dtype)), dim=-1)
        pixels = F.normalize(reduced, dim=1)
        return self.logit_scale.exp().clamp(max=100.0) * torch.einsum("kd,bdhw->bkhw", text, pixels)

    def affinity_logits(self, features: Tensor) -> Tensor:
        """``F`` ``B x D x h x w`` -> affinity logits ``a * cos(e_i, e_j) + b``: ``B x P x P``."""
        embed = F.normalize(self.affinity_embed(features).flatten(2), dim=1)    # B x D' x P
        return self.affinity_scale * torch.einsum("bdi,bdj->bij", embed, embed) + self.affinity_bias

    def forward(self, features: Tensor, class_embeddings: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            features: ``F``: ``B x D x h x w`` (a pixel-decoder level of stride >= 8).
            class_embeddings: ``K x C`` class text embeddings t_k.

        Returns a dict: ``features`` ``B x D x h x w`` (F_out, eq. 3.8), ``coarse_logits``
        ``B x K x h x w`` (eq. 3.10's input), ``affinity_logits`` ``B x P x P`` (eq. 3.9's input),
        ``centers`` ``B x K x D'`` (eq. 3.1).
        """
        batch, _, height, width = features.shape
        reduced = self.reduce(features)                                          # B x D' x h x w
        coarse = self.coarse_logits(reduced, class_embeddings)                   # B x K x h x w
        flat = reduced.flatten(2).transpose(1, 2)                                # B x P x D'
        centers = class_centers(coarse, reduced)                                 # eq. 3.1
        logits = self.affinity_logits(features)                                  # B x P x P
        intra, inter = intra_inter_features(logits.sigmoid(), flat)              # eqs. 3.2, 3.3
        intra_ctx = class_association(intra, centers)                            # eqs. 3.4, 3.5
        inter_ctx = class_association(inter, centers)                            # eqs. 3.6, 3.7

        def to_map(x: Tensor) -> Tensor:
            return x.transpose(1, 2).reshape(batch, -1, height, width)

        fused = features + self.fuse(torch.cat([features, to_map(intra_ctx), to_map(inter_ctx)], dim=1))
        return {"features": fused, "coarse_logits": coarse, "affinity_logits": logits, "centers": centers}
