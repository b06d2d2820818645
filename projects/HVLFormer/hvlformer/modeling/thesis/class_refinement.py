"""LSMSeg's class-level feature refinement, thesis chapter 5, Sec. 5.2.6 (eq. 5.8, Fig. 5.5), applied to
HVLFormer's textual queries: a linear-attention transformer block over the CLASS dimension, so each class's
query is refined by the other classes of the (possibly large, possibly filtered) vocabulary.

Shapes: ``K`` classes, ``D`` query width, any leading dims ``...`` (e.g. ``B x E`` for the HTQG output
``B x E x K x D``: each query level is refined on its own).

Block (pre-norm): ``x = x + Wo(LinAttn(LN(x)))``, ``x = x + FFN(LN(x))`` with linear attention
(Katharopoulos et al.): ``phi(u) = elu(u) + 1`` and, per head,
``out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j))``, i.e. ``O(K D^2)`` instead of
softmax attention's ``O(K^2 D)``; the cost stays linear in the vocabulary size, which is what matters for
hundreds of class names.

Decisions:

- It acts on the textual queries (after HTQG, before PTRM) rather than on a CAT-Seg-style cost volume:
  HVLFormer's class-level representation IS its per-class query; the spatial refinement of eq. 5.7 is what
  PTRM and the masked-attention decoder already do.
- Identity at initialisation (``zero_init``): the output projections of the attention and of the FFN start
  at zero, so switching the block on in a trained model changes nothing until it is trained.
- Heads ``4``, FFN ratio ``2``: the block must be cheap next to the decoder; the width is the query width.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import Tensor, nn

__all__ = ["ClassLinearAttentionRefinement", "linear_attention"]


def linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """Non-causal linear attention over the token dim: ``q``, ``k`` ``... x N x H x d``, ``v``
    ``... x N x H x e`` -> ``... x N x H x e`` with ``phi = elu + 1``."""
    q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
    kv = torch.einsum("...nhd,...nhe->...hde", k, v)
    normaliser = torch.einsum("...nhd,...hd->...nh", q, k.sum(dim=-3)).clamp_min(eps)
    return torch.einsum("...nhd,...hde->...nhe", q, kv) / normaliser[..., None]


class ClassLinearAttentionRefinement(nn.Module):
    """One linear-attention transformer block over the class dimension (module docstring)."""

    @configurable
    def __init__(self, *, dim: int, num_heads: int = 4, ffn_ratio: int = 2, zero_init: bool = True) -> None:
        """
        Args:
            dim: D, the query width (divisible by num_heads).
            num_heads: attention heads. ffn_ratio: FFN hidden width / D.
            zero_init: start as the identity (zero output projections).
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_ratio * dim), nn.GELU(), nn.Linear(ffn_ratio * dim, dim))
        if zero_init:
            for layer in (self.out, self.ffn[-1]):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        lsm = cfg.MODEL.HVLFORMER.LSMSEG
        return {"dim": cfg.MODEL.HVLFORMER.HIDDEN_DIM, "num_heads": lsm.CLASS_REFINEMENT_HEADS}

    def forward(self, queries: Tensor) -> Tensor:
        """queries ``... x K x D`` -> refined ``... x K x D`` (classes attend to each other)."""
        *lead, num_classes, dim = queries.shape
        q, k, v = self.qkv(self.norm1(queries)).reshape(*lead, num_classes, 3, self.num_heads, -1).unbind(-3)
        attended = linear_attention(q, k, v).reshape(*lead, num_classes, dim)
        x = queries + self.out(attended)
        return x + self.ffn(self.norm2(x))
