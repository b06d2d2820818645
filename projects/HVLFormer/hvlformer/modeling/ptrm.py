"""Pixel-Text Refinement Module (PTRM), paper Sec. 3.2 / eqs. 2-4 and supplement A.2.

Per pixel level ``e`` (strides 32/16/8, coarse to fine) with its query level ``Q~^e`` (``B x K x D``):

1. ``V = Conv1x1(z)``; affinity ``A_k(p) = softmax_k(<Wq q~_k, V(p)> / sqrt(D))``.
2. text map ``T(p) = sum_k A_k(p) Wt q~_k``; fused ``F = T + V``.
3. ``X = [mean_c T, mean_c V, mean_c F]``; ``W = sigmoid(Conv(ReLU(Conv(X))))`` split into W_T, W_V, W_F.
4. ``T' = T * W_V * W_F``, ``V' = V * W_T * W_F``.
5. ``Q^e_k = q~_k + Wo(sum_p A_k(p) T'(p) / sum_p A_k(p))``; ``z_out = z + Conv1x1(V')``.

With fewer query levels than pixel levels (E < 3), each extra pixel level interacts with the finest
query level (``E - 1``): it is refined by it and adds its own pooled text feedback to that level's
queries (the cross-scale refinement of appendix A.2).

Modes (paper Table 7b): ``ptrm``, ``cross_attention`` (queries attend to the pixels with standard
multi-head cross-attention; pixels unchanged), ``none`` (identity).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch
from detectron2.config import configurable
from torch import Tensor, nn

PTRM_MODES = ("ptrm", "cross_attention", "none")


class PTRMLevel(nn.Module):
    """The bidirectional pixel-text refinement of one pixel level."""

    def __init__(self, dim: int, kernel_size: int = 7, hidden_channels: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.visual_proj = nn.Conv2d(dim, dim, kernel_size=1)          # V = Conv1x1(z)
        self.query_proj = nn.Linear(dim, dim)                            # Wq
        self.text_proj = nn.Linear(dim, dim)                             # Wt
        self.query_out = nn.Linear(dim, dim)                             # Wo
        self.pixel_out = nn.Conv2d(dim, dim, kernel_size=1)              # back to the decoder domain
        padding = kernel_size // 2
        self.gate = nn.Sequential(
            nn.Conv2d(3, hidden_channels, kernel_size, padding=padding), nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, 3, kernel_size, padding=padding), nn.Sigmoid(),
        )

    def affinity(self, queries: Tensor, visual: Tensor) -> Tensor:
        """queries ``B x K x D``, visual ``B x D x H x W`` -> ``A``: ``B x K x H x W``, softmax over K."""
        logits = torch.einsum("bkd,bdhw->bkhw", self.query_proj(queries), visual) / math.sqrt(self.dim)
        return logits.softmax(dim=1)

    def forward(self, queries: Tensor, pixels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """queries ``Q~^e``: ``B x K x D``; pixels ``z``: ``B x D x H x W``.

        Returns (query update ``B x K x D`` to add to ``Q~^e``, refined pixels ``z_out`` ``B x D x H x W``,
        affinity ``A`` ``B x K x H x W``).
        """
        visual = self.visual_proj(pixels)
        affinity = self.affinity(queries, visual)
        text = torch.einsum("bkhw,bkd->bdhw", affinity, self.text_proj(queries))
        fused = text + visual
        pooled = torch.stack([text.mean(dim=1), visual.mean(dim=1), fused.mean(dim=1)], dim=1)  # B x 3 x H x W
        gate_text, gate_visual, gate_fused = self.gate(pooled).unbind(dim=1)
        text_refined = text * (gate_visual * gate_fused).unsqueeze(1)
        visual_refined = visual * (gate_text * gate_fused).unsqueeze(1)
        # per-query pooling of the spatially distributed text map, weighted by that query's affinity
        weights = affinity.flatten(2)                                                        # B x K x HW
        pooled_text = torch.einsum("bkp,bdp->bkd", weights, text_refined.flatten(2))
        pooled_text = pooled_text / weights.sum(dim=-1, keepdim=True).clamp_min(1e-6)
        return self.query_out(pooled_text), pixels + self.pixel_out(visual_refined), affinity


class CrossAttentionLevel(nn.Module):
    """Ablation: the queries of one level attend to that level's pixels (standard cross-attention)."""

    def __init__(self, dim: int, num_heads: int = 8) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries: Tensor, pixels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        tokens = pixels.flatten(2).transpose(1, 2)  # B x HW x D
        update, weights = self.attn(queries, tokens, tokens, need_weights=True)
        height, width = pixels.shape[-2:]
        return self.norm(update), pixels, weights.reshape(weights.shape[0], weights.shape[1], height, width)


class PTRM(nn.Module):
    """PTRM over all pixel levels. See the module docstring for the equations and the E < 3 rule."""

    @configurable
    def __init__(self, dim: int, num_query_levels: int, num_pixel_levels: int = 3, mode: str = "ptrm",
                 kernel_size: int = 7, hidden_channels: int = 16, num_heads: int = 8) -> None:
        """dim: D of queries and pixels; num_query_levels: E; num_pixel_levels: pixel-decoder levels (3);
        mode: see the module docstring; kernel_size, hidden_channels: the gate convolutions; num_heads: of
        ``cross_attention``."""
        super().__init__()
        if mode not in PTRM_MODES:
            raise ValueError(f"MODEL.HVLFORMER.PTRM.MODE must be one of {PTRM_MODES}, got {mode!r}")
        self.mode = mode
        self.num_query_levels = num_query_levels
        self.num_pixel_levels = num_pixel_levels
        if mode == "ptrm":
            self.levels = nn.ModuleList(PTRMLevel(dim, kernel_size, hidden_channels) for _ in range(num_pixel_levels))
        elif mode == "cross_attention":
            self.levels = nn.ModuleList(CrossAttentionLevel(dim, num_heads) for _ in range(num_pixel_levels))
        else:
            self.levels = nn.ModuleList()

    @classmethod
    def from_config(cls, cfg, num_pixel_levels: int = 3) -> Dict[str, Any]:
        hv = cfg.MODEL.HVLFORMER
        return {"dim": hv.HIDDEN_DIM, "num_query_levels": hv.NUM_QUERY_LEVELS, "num_pixel_levels": num_pixel_levels,
                "mode": hv.PTRM.MODE, "kernel_size": hv.PTRM.KERNEL_SIZE,
                "hidden_channels": hv.PTRM.HIDDEN_CHANNELS, "num_heads": hv.NHEADS}

    def query_level_of(self, pixel_level: int) -> int:
        """Query level used by a pixel level: the same index, or the finest query level for the extras."""
        return min(pixel_level, self.num_query_levels - 1)

    def forward(self, queries: Tensor, pixel_features: List[Tensor]) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
        """queries ``Q~``: ``B x E x K x D``; pixel_features ``[z^1, z^2, z^3]`` each ``B x D x H_e x W_e``.

        Returns (refined queries ``Q``: ``B x E x K x D``, ``z_out`` list like the input, affinity maps
        per pixel level ``B x K x H_e x W_e`` (empty for mode ``none``)).
        """
        if self.mode == "none":
            return queries, list(pixel_features), []
        if len(pixel_features) != self.num_pixel_levels:
            raise ValueError(f"PTRM expects {self.num_pixel_levels} pixel levels, got {len(pixel_features)}")
        updates = [torch.zeros_like(queries[:, e]) for e in range(self.num_query_levels)]
        refined_pixels, affinities = [], []
        for pixel_level, (module, pixels) in enumerate(zip(self.levels, pixel_features)):
            level = self.query_level_of(pixel_level)
            update, refined, affinity = module(queries[:, level], pixels)
            updates[level] = updates[level] + update
            refined_pixels.append(refined)
            affinities.append(affinity)
        return queries + torch.stack(updates, dim=1), refined_pixels, affinities
