"""LSMSeg's Category Filtering Module (CFM), thesis chapter 5, Sec. 5.2.5 (eqs. 5.2-5.6).

For open-vocabulary inference with a large vocabulary (hundreds of names), each image keeps only the ``k``
classes whose text embedding responds most strongly somewhere in the image, BEFORE decoding, so the decoder
runs on ``k`` classes instead of ``K``.

Shapes: ``B`` batch, ``C`` joint CLIP width, ``h x w`` the dense CLIP grid, ``K`` vocabulary size, ``k``
classes kept.

1. Cost map (eq. 5.2): ``M[b, n, i, j] = cos(E[b, :, i, j], T_n)``: ``B x K x h x w``.
2. Score (eq. 5.3): ``A[b, n] = max_{i, j} M[b, n, i, j]``: ``B x K``.
3. Selection (eq. 5.4): ``I_k = TopK(A, k)``, returned sorted by class index: ``B x k``.
4. Gather (eq. 5.5): ``T' = Gather(Norm(T), I_k)``: ``B x k x C``; filtered cost map (eq. 5.6)
   ``M' = M[b, I_k]``: ``B x k x h x w``.

:func:`scatter_filtered_scores` puts per-class scores of the kept classes back into the full ``K``.

Decisions:

- Threshold: the filter acts only when ``K > k`` (the thesis's padding threshold ``q`` equals ``k``); with
  ``K <= k`` every class is kept in its own order and nothing changes (so closed-vocabulary training with
  fewer than 32 classes is untouched).
- ``k = 32`` (the thesis). The kept indices are sorted by class index (not by score) so the kept classes
  keep the vocabulary's order, which the per-class query levels and any per-class calibration rely on.
- ``E`` is the CLIP dense embedding (``clip_dense``: patch tokens after ``ln_post`` and ``proj``, in the
  text embeddings' joint space); the score is the spatial maximum, so a small object is not filtered away by
  a large background (a mean would).
- Filtered classes get score 0 in :func:`scatter_filtered_scores` (probability-like semantic scores: they are
  never the argmax while a kept class has a positive score).
"""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import Tensor, nn

__all__ = ["CategoryFilter", "scatter_filtered_scores"]


def scatter_filtered_scores(scores: Tensor, indices: Tensor, num_classes: int, fill: float = 0.0) -> Tensor:
    """``scores`` ``B x k x H x W`` of the kept classes ``indices`` ``B x k`` -> ``B x K x H x W`` with
    ``fill`` for the filtered-out classes."""
    batch, kept = indices.shape
    out = scores.new_full((batch, num_classes, *scores.shape[2:]), fill)
    index = indices[:, :, None, None].expand(-1, -1, *scores.shape[2:])
    return out.scatter(1, index, scores)


class CategoryFilter(nn.Module):
    """CFM (no parameters): see the module docstring."""

    @configurable
    def __init__(self, *, top_k: int = 32) -> None:
        """top_k: classes kept per image (also the threshold above which the filter acts)."""
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = top_k

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        return {"top_k": cfg.MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER_TOP_K}

    @staticmethod
    def cost_map(dense: Tensor, text: Tensor) -> Tensor:
        """Eq. 5.2: dense ``B x C x h x w``, text ``K x C`` (or ``B x K x C``) -> cosines ``B x K x h x w``."""
        text = F.normalize(text.to(dense.dtype), dim=-1)
        dense = F.normalize(dense, dim=1)
        if text.dim() == 2:
            return torch.einsum("kc,bchw->bkhw", text, dense)
        return torch.einsum("bkc,bchw->bkhw", text, dense)

    def forward(self, dense: Tensor, text: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            dense: ``E``: ``B x C x h x w`` dense image embedding (joint space).
            text: ``T``: ``K x C`` class text embeddings.

        Returns a dict: ``indices`` ``B x k'`` (kept classes, ascending; ``k' = min(k, K)``), ``text``
        ``B x k' x C`` (normalised, eq. 5.5), ``cost`` ``B x k' x h x w`` (eq. 5.6), ``scores`` ``B x K``
        (eq. 5.3).
        """
        cost = self.cost_map(dense, text)                                   # B x K x h x w
        scores = cost.flatten(2).amax(dim=-1)                               # eq. 5.3
        batch, num_classes = scores.shape
        if num_classes > self.top_k:
            indices = scores.topk(self.top_k, dim=1).indices.sort(dim=1).values  # eq. 5.4
        else:
            indices = torch.arange(num_classes, device=dense.device)[None].expand(batch, -1)
        normed = F.normalize(text.to(dense.dtype), dim=-1)
        gathered = normed[indices]                                          # eq. 5.5, B x k x C
        kept_cost = torch.gather(cost, 1, indices[:, :, None, None].expand(-1, -1, *cost.shape[2:]))
        return {"indices": indices, "text": gathered, "cost": kept_cost, "scores": scores}
