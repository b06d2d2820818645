"""Masked-attention transformer decoder whose object queries are textual (HVLFormer, paper Sec. 3.3).

This is Mask2Former's decoder with two changes:

* **Content queries are given, not learned.** ``forward`` receives the ``E*K`` refined textual queries
  (level-major: query ``e*K + k`` is class ``k`` of query level ``e``) and, when
  ``num_instance_queries = M > 0``, ``M`` learned instance-query features (HierVL's DQTD) are appended
  after them, so ``Q = E*K + M``.
* **Positional query embeddings are per query level, not per query.** A learned ``nn.Embedding(E, D)``
  gives one positional embedding per level that is broadcast over the ``K`` classes of that level (plus
  ``M`` learned ones for the instance queries). The class identity of a query lives in its content (the
  text embedding); the positional embedding only says which hierarchy level it belongs to. This keeps the
  parameter count independent of ``K``, so the vocabulary may change at inference time (with the
  ``"text"`` classifier).

Prediction heads are shared by all layers and applied after the final decoder ``LayerNorm``:

* ``class_embed`` -> ``K+1`` logits (the last one is "no object"). ``classifier="linear"``:
  ``nn.Linear(D, K+1)`` (paper). ``classifier="text"``: ``exp(logit_scale) * cos(Linear(D, C)(q), t_k)``
  for the K classes given in ``forward(..., class_embeddings)``, and the same with a learned no-object
  embedding for the last logit; ``logit_scale`` is learned, initialised at ``log(1/0.07)`` and clamped at
  ``log(100)`` as in CLIP. The cosine is computed in float32.
* ``mask_embed``: 3-layer MLP ``D -> D -> D -> mask_dim``; ``masks = einsum("bqc,bchw->bqhw")`` with
  the stride-4 ``mask_features``.

Attention masks (Mask2Former): the mask logits of the previous prediction are bilinearly resized to the
size of the level the next layer attends to; a pixel is masked where ``sigmoid(logit) < 0.5``; a query
whose row is fully masked is reset to attend everywhere (otherwise its softmax would be NaN).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import fvcore.nn.weight_init as weight_init
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.utils.registry import Registry

from hvlformer.modeling.pixel_decoder.position_encoding import PositionEmbeddingSine

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "HVLTransformerDecoder",
    "compute_attention_mask",
]

TRANSFORMER_DECODER_REGISTRY = Registry("HVLFORMER_TRANSFORMER_DECODER")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for HVLFormer transformer decoders. A registered class is called as
``cls(cfg, in_channels, num_classes, text_dim)``.
"""


def build_transformer_decoder(cfg, in_channels: int, num_classes: int, text_dim: int, **kwargs) -> nn.Module:
    """Build the decoder named by ``cfg.MODEL.HVLFORMER.TRANSFORMER_DECODER_NAME``.

    in_channels: channels of the multi-scale pixel-decoder features; num_classes: K of the training
    vocabulary (used by the linear classifier); text_dim: C, width of the text embeddings ``t_k``;
    ``kwargs`` override the config's arguments (HierVL's ``num_instance_queries``, ``MODEL.HIERVL``).
    """
    name = cfg.MODEL.HVLFORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, num_classes, text_dim, **kwargs)


def compute_attention_mask(mask_logits: Tensor, size, num_heads: int) -> Tensor:
    """Masked-attention mask from mask logits (Mask2Former), with fully masked rows reset.

    mask_logits: ``B x Q x H x W``; size: ``(h, w)`` of the attended level. Returns a bool tensor
    ``(B*num_heads) x Q x (h*w)`` (the layout of ``nn.MultiheadAttention``'s 3-D ``attn_mask``) where
    True means "may not attend": ``sigmoid(bilinear_resize(logits)) < 0.5``. Rows where every pixel is
    masked are set to all False (attend everywhere). Detached: no gradient flows through the mask.
    """
    with torch.no_grad():
        resized = F.interpolate(mask_logits.detach().float(), size=tuple(size), mode="bilinear",
                                align_corners=False)
        mask = resized.sigmoid().flatten(2) < 0.5  # B x Q x hw
        full = mask.all(dim=-1, keepdim=True)
        mask = mask & ~full
        mask = mask.unsqueeze(1).expand(-1, num_heads, -1, -1).flatten(0, 1)
    return mask


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


class _SelfAttentionLayer(nn.Module):
    """Query self-attention with residual + LayerNorm (post-norm default, pre-norm option). Batch first."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, pre_norm: bool = False) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        _xavier_reset(self)

    def forward(self, tgt: Tensor, query_pos: Optional[Tensor] = None) -> Tensor:
        """tgt: ``B x Q x D``; query_pos: ``B x Q x D``. Returns ``B x Q x D``."""
        if self.pre_norm:
            t = self.norm(tgt)
            q = k = _with_pos(t, query_pos)
            t2 = self.self_attn(q, k, value=t, need_weights=False)[0]
            return tgt + self.dropout(t2)
        q = k = _with_pos(tgt, query_pos)
        t2 = self.self_attn(q, k, value=tgt, need_weights=False)[0]
        return self.norm(tgt + self.dropout(t2))


class _CrossAttentionLayer(nn.Module):
    """Masked cross-attention of the queries to the pixels of one level; also returns the weights."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, pre_norm: bool = False) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        _xavier_reset(self)

    def forward(self, tgt: Tensor, memory: Tensor, attn_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None):
        """tgt: ``B x Q x D``; memory, pos: ``B x S x D``; attn_mask: ``(B*heads) x Q x S`` bool.

        Returns ``(B x Q x D, B x Q x S)``: the updated queries and the head-averaged attention weights.
        """
        t = self.norm(tgt) if self.pre_norm else tgt
        t2, weights = self.multihead_attn(query=_with_pos(t, query_pos), key=_with_pos(memory, pos),
                                          value=memory, attn_mask=attn_mask, need_weights=True,
                                          average_attn_weights=True)
        out = tgt + self.dropout(t2)
        if not self.pre_norm:
            out = self.norm(out)
        return out, weights


class _FFNLayer(nn.Module):
    """Linear -> ReLU -> Linear with residual + LayerNorm."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0,
                 pre_norm: bool = False) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier_reset(self)

    def forward(self, tgt: Tensor) -> Tensor:
        t = self.norm(tgt) if self.pre_norm else tgt
        t2 = self.linear2(self.dropout(F.relu(self.linear1(t))))
        out = tgt + self.dropout(t2)
        return out if self.pre_norm else self.norm(out)


def _xavier_reset(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class _MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (no activation after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class _TextClassifier(nn.Module):
    """Cosine classifier against the class text embeddings plus a learned no-object embedding.

    ``logits = exp(logit_scale) * [cos(P q, t_1), ..., cos(P q, t_K), cos(P q, t_none)]`` with
    ``P = Linear(D, C)``. Computed in float32 (autocast disabled) for stability.
    """

    def __init__(self, hidden_dim: int, text_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_dim, text_dim)
        # nn.Embedding so that SOLVER.WEIGHT_DECAY_EMBED applies to it.
        self.no_object_embed = nn.Embedding(1, text_dim)
        nn.init.normal_(self.no_object_embed.weight, std=text_dim ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / 0.07)))
        self.max_logit_scale = math.log(100.0)

    def forward(self, q: Tensor, class_embeddings: Tensor) -> Tensor:
        """q: ``B x Q x D``; class_embeddings: ``K x C`` or ``B x K x C``. Returns ``B x Q x (K+1)``."""
        with torch.autocast(device_type=q.device.type, enabled=False):
            x = F.normalize(self.proj(q.float()), dim=-1)
            t = class_embeddings.float()
            if t.dim() == 2:
                t = t.unsqueeze(0).expand(q.shape[0], -1, -1)
            none = self.no_object_embed.weight.float().unsqueeze(0).expand(t.shape[0], -1, -1)
            t = F.normalize(torch.cat([t, none], dim=1), dim=-1)  # B x (K+1) x C
            scale = self.logit_scale.float().clamp(max=self.max_logit_scale).exp()
            return scale * torch.einsum("bqc,bkc->bqk", x, t)


@TRANSFORMER_DECODER_REGISTRY.register()
class HVLTransformerDecoder(nn.Module):
    """Mask2Former masked-attention decoder with textual content queries (see the module docstring).

    Shapes: ``B`` batch, ``E`` query levels, ``K`` classes, ``M`` instance queries, ``Q = E*K + M``,
    ``D`` hidden dim, ``C`` text dim, ``N`` decoder layers.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        hidden_dim: int,
        num_query_levels: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        classifier: str = "linear",
        text_dim: int = 512,
        dropout: float = 0.0,
        num_feature_levels: int = 3,
        num_instance_queries: int = 0,
    ) -> None:
        """
        Args:
            in_channels: channels of the multi-scale features (pixel-decoder width).
            num_classes: K of the linear classifier (ignored by the text classifier, whose K comes from
                ``class_embeddings``).
            hidden_dim: D. num_query_levels: E. num_instance_queries: M (0 = none).
            nheads, dim_feedforward, dec_layers (N), pre_norm, dropout: transformer layer settings.
            mask_dim: channels of ``mask_features``.
            enforce_input_project: use a 1x1 input projection even when ``in_channels == hidden_dim``.
            classifier: ``"linear"`` or ``"text"``. text_dim: C (text classifier only).
            num_feature_levels: levels the layers cycle over (3, strides 32/16/8).
        """
        super().__init__()
        if classifier not in ("linear", "text"):
            raise ValueError(f"classifier must be 'linear' or 'text', got {classifier!r}")
        if num_query_levels < 1 or num_instance_queries < 0 or dec_layers < 1:
            raise ValueError("need num_query_levels >= 1, num_instance_queries >= 0, dec_layers >= 1")
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_query_levels = num_query_levels
        self.num_instance_queries = num_instance_queries
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.num_feature_levels = num_feature_levels
        self.classifier = classifier
        self.text_dim = text_dim

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(dec_layers):
            self.transformer_cross_attention_layers.append(
                _CrossAttentionLayer(hidden_dim, nheads, dropout=dropout, pre_norm=pre_norm))
            self.transformer_self_attention_layers.append(
                _SelfAttentionLayer(hidden_dim, nheads, dropout=dropout, pre_norm=pre_norm))
            self.transformer_ffn_layers.append(
                _FFNLayer(hidden_dim, dim_feedforward, dropout=dropout, pre_norm=pre_norm))
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        # Positional query embeddings: one per query level (broadcast over the K classes) + M instance ones.
        self.query_level_pos = nn.Embedding(num_query_levels, hidden_dim)
        if num_instance_queries > 0:
            self.instance_query_feat = nn.Embedding(num_instance_queries, hidden_dim)
            self.instance_query_pos = nn.Embedding(num_instance_queries, hidden_dim)
        else:
            self.instance_query_feat = None
            self.instance_query_pos = None

        # Feature-level embedding and input projections.
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                conv = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(conv)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())

        if classifier == "linear":
            self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        else:
            self.class_embed = _TextClassifier(hidden_dim, text_dim)
        self.mask_embed = _MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int, num_classes: int, text_dim: int) -> Dict:
        h = cfg.MODEL.HVLFORMER
        return {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "hidden_dim": h.HIDDEN_DIM,
            "num_query_levels": h.NUM_QUERY_LEVELS,
            "nheads": h.NHEADS,
            "dim_feedforward": h.DIM_FEEDFORWARD,
            "dec_layers": h.DEC_LAYERS,
            "pre_norm": h.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": h.ENFORCE_INPUT_PROJ,
            "classifier": h.CLASSIFIER,
            "text_dim": text_dim,
            "dropout": h.DROPOUT,
        }

    # ------------------------------------------------------------------ helpers
    def _num_classes_for(self, text_queries: Tensor, class_embeddings: Optional[Tensor]) -> int:
        if self.classifier == "text":
            if class_embeddings is None:
                raise ValueError("the 'text' classifier needs class_embeddings (K x C or B x K x C)")
            if class_embeddings.shape[-1] != self.text_dim:
                raise ValueError(f"class_embeddings width {class_embeddings.shape[-1]} != text_dim {self.text_dim}")
            k = class_embeddings.shape[-2]
        else:
            k = self.num_classes
        if text_queries.shape[-2] != self.num_query_levels * k:
            raise ValueError(
                f"text_queries has {text_queries.shape[-2]} queries, expected E*K = "
                f"{self.num_query_levels}*{k} (level-major)")
        return k

    def forward_prediction_heads(self, output: Tensor, mask_features: Tensor,
                                 class_embeddings: Optional[Tensor]):
        """output: ``B x Q x D`` -> (``B x Q x (K+1)`` logits, ``B x Q x H4 x W4`` mask logits)."""
        decoder_output = self.decoder_norm(output)
        if self.classifier == "linear":
            outputs_class = self.class_embed(decoder_output)
        else:
            outputs_class = self.class_embed(decoder_output, class_embeddings)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        return outputs_class, outputs_mask

    # ------------------------------------------------------------------ forward
    def forward(self, multi_scale_features: List[Tensor], mask_features: Tensor, text_queries: Tensor,
                class_embeddings: Optional[Tensor] = None) -> Dict:
        """
        Args:
            multi_scale_features: ``num_feature_levels`` maps ``B x in_channels x h_l x w_l``, coarse to
                fine (strides 32, 16, 8). Layer ``n`` (0-based) attends to level ``n % num_feature_levels``.
            mask_features: ``B x mask_dim x H4 x W4`` (stride 4).
            text_queries: ``B x E*K x D`` (or ``E*K x D``, shared by the batch), level-major: index
                ``e*K + k`` is class ``k`` at query level ``e``.
            class_embeddings: ``K x C`` or ``B x K x C`` text embeddings ``t_k`` (required by the text
                classifier, ignored by the linear one).

        Returns a dict:
            ``pred_logits``: ``B x Q x (K+1)``; ``pred_masks``: ``B x Q x H4 x W4`` (logits);
            ``attn_maps``: ``B x Q x (h*w)``, the head-averaged cross-attention weights of the last layer
            over that layer's level (rows sum to 1);
            ``aux_outputs``: list of N dicts with the same three keys for the predictions before the last
            one: index 0 from the initial queries (``attn_maps`` None), index n after layer n. The outputs
            of the N layers are therefore ``aux_outputs[1:] + [final]``.
        ``Q = E*K + M``.
        """
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(multi_scale_features)}")
        bs = mask_features.shape[0]
        if text_queries.dim() == 2:
            text_queries = text_queries.unsqueeze(0).expand(bs, -1, -1)
        k = self._num_classes_for(text_queries, class_embeddings)

        src, pos, size_list = [], [], []
        for i, x in enumerate(multi_scale_features):
            size_list.append(x.shape[-2:])
            pos.append(self.pe_layer(x).flatten(2).transpose(1, 2))  # B x hw x D
            s = self.input_proj[i](x).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(s.transpose(1, 2))  # B x hw x D

        query_pos = self.query_level_pos.weight.repeat_interleave(k, dim=0)  # E*K x D
        output = text_queries
        if self.num_instance_queries > 0:
            query_pos = torch.cat([query_pos, self.instance_query_pos.weight], dim=0)
            inst = self.instance_query_feat.weight.unsqueeze(0).expand(bs, -1, -1).to(text_queries.dtype)
            output = torch.cat([output, inst], dim=1)
        query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)

        predictions = []
        outputs_class, outputs_mask = self.forward_prediction_heads(output, mask_features, class_embeddings)
        predictions.append({"pred_logits": outputs_class, "pred_masks": outputs_mask, "attn_maps": None})
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            attn_mask = compute_attention_mask(outputs_mask, size_list[level], self.num_heads)
            output, attn = self.transformer_cross_attention_layers[i](
                output, src[level], attn_mask=attn_mask, pos=pos[level], query_pos=query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos=query_pos)
            output = self.transformer_ffn_layers[i](output)
            outputs_class, outputs_mask = self.forward_prediction_heads(output, mask_features, class_embeddings)
            predictions.append({"pred_logits": outputs_class, "pred_masks": outputs_mask, "attn_maps": attn})

        out = dict(predictions[-1])
        out["aux_outputs"] = predictions[:-1]
        return out
