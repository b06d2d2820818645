"""Hierarchical Textual Query Generation (HTQG) = HQG (multi-level query heads) + SRE (class relevance).

Paper section 3 (HTQG). ``K`` classes, ``E`` query levels, ``D`` decoder width, ``C`` CLIP embedding width.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.config import configurable

from .regularization import fp32_loss

SRE_MODES = ("soft", "threshold", "none", "clip_zero_shot")
QUERY_SOURCES = ("text", "learnable")


class HierarchicalQueryGenerator(nn.Module):
    """HQG: ``E`` heads ``MLP_e = Linear(C, D) -> ReLU -> Linear(D, D)`` turn class embeddings into queries,
    each followed (``output_norm``, the default) by a ``LayerNorm(D)``.

    Why the LayerNorm: the decoder adds a per-level positional query embedding, initialised N(0, 1) as in
    Mask2Former (norm ~sqrt(D)), to every content query before attending. ``MLP_e`` of a unit-norm t_k with
    PyTorch's default init gives queries of norm ~0.5 instead, so ``q + pos`` is the same vector for all K
    classes of a level up to ~0.5 % (measured on the tiny `shapes` runs: cosine 0.995 between every pair of
    classes, against ~0.55 for learnable N(0, 1) queries) and every class attends to the same pixels; the
    class identity survives only in the small residual. The LayerNorm puts the textual queries on the scale
    of learnable ones (per-element unit variance, norm ~sqrt(D)), keeping their direction (docs/DESIGN.md).

    Why ``zero_bias``: PyTorch's default Linear bias is scaled for inputs of unit variance per element, but
    t_k is a unit-norm vector (per element ~1/sqrt(C)), so at init both layers' biases are as large as the
    class signal and every class's query starts as nearly the same vector (on the tiny CLIP: cosine
    0.93-0.95 between the classes of a level, against 0.36 between their text embeddings). Zero biases
    (the weights keep their default init) let the queries start from the text's geometry (0.56-0.63).
    """

    def __init__(self, text_dim: int, hidden_dim: int, num_levels: int, output_norm: bool = True,
                 zero_bias: bool = True) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"NUM_QUERY_LEVELS must be >= 1, got {num_levels}")
        self.num_levels = num_levels
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, hidden_dim),
                          *([nn.LayerNorm(hidden_dim)] if output_norm else []))
            for _ in range(num_levels)
        )
        if zero_bias:
            for head in self.heads:
                nn.init.zeros_(head[0].bias)
                nn.init.zeros_(head[2].bias)

    def forward(self, class_embeddings: Tensor) -> Tensor:
        """class_embeddings: ``K x C`` (t_k). Returns ``Q_hat``: ``E x K x D``."""
        return torch.stack([head(class_embeddings) for head in self.heads], dim=0)


@fp32_loss
def diversity_loss(level_queries: Tensor) -> Tensor:
    """L_div: mean over classes k and ordered level pairs e != e' of ``cos(q_k^e, q_k^e')^2``.

    level_queries: ``E x K x D`` (or ``B x E x K x D``, averaged over the batch too). 0 for mutually
    orthogonal levels, 1 for identical levels; 0 when E == 1 (no pair). Computed in float32 with autocast
    disabled.
    """
    if level_queries.dim() == 3:
        level_queries = level_queries.unsqueeze(0)
    num_levels = level_queries.shape[1]
    if num_levels < 2:
        return level_queries.sum() * 0.0
    normed = F.normalize(level_queries.float(), dim=-1)
    # cos[b, k, e, e'] between levels e and e' of class k
    cos = torch.einsum("bekd,bfkd->bkef", normed, normed)
    off_diagonal = ~torch.eye(num_levels, dtype=torch.bool, device=cos.device)
    return cos.pow(2)[..., off_diagonal].mean()


class SemanticRelevanceEstimator(nn.Module):
    """SRE: ``s_k = sigmoid(MLP([phi(res3, res4, res5), t_k]))``.

    phi = concat of the global-average-pooled backbone features, each projected to ``D``, then
    ``Linear(3D, D)``; MLP = ``Linear(D + C, D) -> ReLU -> Linear(D, 1)``.
    """

    def __init__(self, feature_channels: List[int], text_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.level_projections = nn.ModuleList(nn.Linear(c, hidden_dim) for c in feature_channels)
        self.fuse = nn.Linear(hidden_dim * len(feature_channels), hidden_dim)
        self.mlp = nn.Sequential(nn.Linear(hidden_dim + text_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, 1))

    def forward(self, features: List[Tensor], class_embeddings: Tensor) -> Tensor:
        """features: list of ``B x C_l x H_l x W_l``; class_embeddings ``K x C``. Returns logits ``B x K``."""
        pooled = [proj(f.mean(dim=(2, 3))) for proj, f in zip(self.level_projections, features)]
        image_context = self.fuse(torch.cat(pooled, dim=1))  # B x D
        batch, num_classes = image_context.shape[0], class_embeddings.shape[0]
        joint = torch.cat([image_context[:, None, :].expand(batch, num_classes, -1),
                           class_embeddings[None].expand(batch, -1, -1).to(image_context.dtype)], dim=-1)
        return self.mlp(joint).squeeze(-1)


def clip_zero_shot_relevance(global_embedding: Tensor, class_embeddings: Tensor, temperature: float,
                             threshold: float = 0.5) -> Tensor:
    """HierVL class presence from zero-shot CLIP (HierVL v2, section 3), several classes at a time.

    Args:
        global_embedding: ``B x C`` image embedding of the FROZEN pretrained encoder E_I^0 (zero-shot CLIP;
            not the fine-tuned f_CLS).
        class_embeddings: ``K x C`` class text embeddings t_k.
        temperature: T of CLIP's zero-shot class probabilities ``p = softmax(cos / T)``.
        threshold: a class is present when its probability relative to the most likely class,
            ``r_k = p_k / max_j p_j = exp((cos_k - max_j cos_j) / T)``, is ``>= threshold``, i.e. when its
            cosine is within ``T * ln(1 / threshold)`` of the best class (0.035 at T = 0.05, threshold 0.5).

    Returns ``B x K`` presence in {0, 1}: the same kind of 0/1 gate as the ground-truth presence used on
    labeled images, so the decoder sees the same query distribution on labeled, unlabeled and test
    images. A softmax over the classes at T = 0.01 (the former rule) is near one-hot and would keep one of
    several present classes; the relative rule keeps every class CLIP finds about as likely as the best.
    """
    with torch.autocast(device_type=global_embedding.device.type, enabled=False):
        cos = F.normalize(global_embedding.float(), dim=-1) @ F.normalize(class_embeddings.float(), dim=-1).t()
        relative = torch.exp((cos - cos.max(dim=-1, keepdim=True).values) / temperature)
    return (relative >= threshold).float()


class HTQG(nn.Module):
    """HQG + SRE: produces the relevance-weighted hierarchical queries ``Q~`` (``B x E x K x D``).

    SRE modes (paper Table 6): ``soft`` (``q~ = s_k * q``), ``threshold`` (keep classes with
    ``s_k > threshold``; the hard gate passes no gradient to the SRE, which is still trained by its
    BCE), ``none`` (no SRE), ``clip_zero_shot`` (HierVL: on labeled images the ground-truth presence;
    on unlabeled AND test images the zero-shot presence :func:`clip_zero_shot_relevance` of the frozen
    pretrained encoder's image embedding, with ``sre_threshold`` on the relative class probability).

    Query sources: ``text`` (HQG on the class text embeddings, the paper) or ``learnable`` (the paper's
    Table 4 baseline row, Mask2Former-style: ``Q_hat`` is an ``E x K x D`` parameter, initialised
    N(0, 1) like Mask2Former's query embeddings, and ignores the text; needs ``num_classes`` and a fixed
    vocabulary). Everything after the queries is the same in both.
    """

    @configurable
    def __init__(self, text_dim: int, hidden_dim: int, num_levels: int, feature_channels: List[int],
                 sre_mode: str = "soft", sre_threshold: float = 0.5, sre_temperature: float = 0.05,
                 query_source: str = "text", num_classes: int = 0, query_norm: bool = True,
                 query_zero_bias: bool = True) -> None:
        """
        Args:
            text_dim: C, width of the class embeddings t_k. hidden_dim: D. num_levels: E.
            feature_channels: channels of res3, res4, res5 (the SRE's image context).
            sre_mode, sre_threshold, sre_temperature: see the class docstring.
            query_source: ``text`` or ``learnable``; num_classes: K (``learnable`` only).
            query_norm: the LayerNorm after each HQG head; query_zero_bias: HQG's biases start at zero (``text``
                only; see :class:`HierarchicalQueryGenerator`).
        """
        super().__init__()
        if sre_mode not in SRE_MODES:
            raise ValueError(f"MODEL.HVLFORMER.SRE.MODE must be one of {SRE_MODES}, got {sre_mode!r}")
        if query_source not in QUERY_SOURCES:
            raise ValueError(f"MODEL.HVLFORMER.QUERY_SOURCE must be one of {QUERY_SOURCES}, got {query_source!r}")
        self.hidden_dim = hidden_dim
        self.query_source = query_source
        if query_source == "text":
            self.hqg: Optional[HierarchicalQueryGenerator] = HierarchicalQueryGenerator(
                text_dim, hidden_dim, num_levels, output_norm=query_norm, zero_bias=query_zero_bias)
            self.learned_queries: Optional[nn.Parameter] = None
        else:
            if num_levels < 1 or num_classes < 1:
                raise ValueError(f"learnable queries need num_levels >= 1 and num_classes >= 1, got "
                                 f"{num_levels} and {num_classes}")
            self.hqg = None
            self.learned_queries = nn.Parameter(torch.randn(num_levels, num_classes, hidden_dim))
        self.sre_mode = sre_mode
        self.sre_threshold = sre_threshold
        self.sre_temperature = sre_temperature
        self.sre = (SemanticRelevanceEstimator(feature_channels, text_dim, hidden_dim)
                    if sre_mode in ("soft", "threshold") else None)

    @classmethod
    def from_config(cls, cfg, text_dim: int, feature_channels: List[int], num_classes: int) -> Dict:
        """``MODEL.HVLFORMER`` keys; the dimensions of the other modules are passed in."""
        hv = cfg.MODEL.HVLFORMER
        return {
            "text_dim": text_dim,
            "hidden_dim": hv.HIDDEN_DIM,
            "num_levels": hv.NUM_QUERY_LEVELS,
            "feature_channels": list(feature_channels),
            "sre_mode": hv.SRE.MODE,
            "sre_threshold": hv.SRE.THRESHOLD,
            "sre_temperature": hv.SRE.TEMPERATURE,
            "query_source": hv.QUERY_SOURCE,
            "num_classes": num_classes,
            "query_norm": hv.QUERY_NORM,
            "query_zero_bias": hv.QUERY_ZERO_BIAS,
        }

    def forward(self, class_embeddings: Tensor, features: List[Tensor], global_embedding: Optional[Tensor] = None,
                presence: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
        """Build the weighted queries.

        Args:
            class_embeddings: ``K x C`` normalised class text embeddings t_k.
            features: backbone features res3..res5, each ``B x C_l x H_l x W_l`` (for the SRE).
            global_embedding: ``B x C`` image embedding of the frozen pretrained encoder E_I^0 (for
                ``clip_zero_shot`` without ``presence``).
            presence: optional ``B x K`` ground-truth class presence (labeled images; ``clip_zero_shot``).
        Returns:
            (``Q~``: ``B x E x K x D``, ``Q_hat``: ``E x K x D`` unweighted, extras) where extras holds
            ``"sre_logits"`` (``B x K``) for the learned modes and ``"relevance"`` (``B x K``) always.
        """
        if self.hqg is not None:
            level_queries = self.hqg(class_embeddings)  # E x K x D
        else:
            if self.learned_queries.shape[1] != class_embeddings.shape[0]:
                raise ValueError(f"learnable queries were built for {self.learned_queries.shape[1]} classes, got "
                                 f"{class_embeddings.shape[0]} (a new vocabulary needs QUERY_SOURCE 'text')")
            level_queries = self.learned_queries
        batch = features[0].shape[0]
        extras: Dict[str, Tensor] = {}
        if self.sre is not None:
            logits = self.sre(features, class_embeddings)
            extras["sre_logits"] = logits
            scores = logits.sigmoid()
            relevance = scores if self.sre_mode == "soft" else (scores > self.sre_threshold).to(scores.dtype)
        elif self.sre_mode == "clip_zero_shot":
            if presence is not None:
                relevance = presence.to(level_queries.dtype)
            elif global_embedding is not None:
                relevance = clip_zero_shot_relevance(global_embedding, class_embeddings, self.sre_temperature,
                                                     self.sre_threshold).to(level_queries.dtype)
            else:
                raise ValueError("SRE mode clip_zero_shot needs the frozen CLIP image embedding or GT presence")
        else:
            relevance = level_queries.new_ones(batch, class_embeddings.shape[0])
        extras["relevance"] = relevance
        weighted = level_queries[None] * relevance[:, None, :, None].to(level_queries.dtype)
        return weighted, level_queries, extras
