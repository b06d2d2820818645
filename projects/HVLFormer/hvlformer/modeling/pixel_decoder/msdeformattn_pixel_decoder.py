"""Mask2Former's multi-scale deformable-attention pixel decoder (paper Sec. 3 and Sec. 4.1,
M = 6 layers), re-implemented.

Data flow (default config, ``D = conv_dim = 256``)::

    res3, res4, res5 --1x1 conv + GN--> D-channel maps (coarse to fine: res5, res4, res3)
        + sine position + learned level embedding
        -> M x [MSDeformAttn self-attention (+res, LN) -> (HierVL: text cross-attention, +res, LN)
                -> FFN (ReLU) (+res, LN)]
        -> z^1, z^2, z^3 (strides 32, 16, 8)
    res2 --lateral 1x1 conv--> + upsample(z^3) --3x3 conv--> stride 4 map --1x1 conv--> mask_features

Decisions the paper leaves open:

* No padding masks: like Mask2Former, the batch is padded by the caller and padding is treated as image
  content, so every reference point is the pixel centre of its token (valid ratio 1 on every level).
* Inputs are not cast to float32 as Mask2Former does (its CUDA kernel needed that); the deformable
  sampling itself is kept in float32 inside :func:`ms_deform_attn`, the rest follows autocast.
* HierVL text cross-attention (``text_cross_attention=True``) sits between the deformable self-attention
  and the FFN of each layer (HierVL: "interleaved after each D.Attn layer"), post-norm like the rest of
  the layer. Pixel tokens are the queries *without* the positional embedding (HierVL's ``Q_z`` is a
  projection of the pixel features only), the K text cluster centres are keys and values. ``text_centers``
  may be ``B x K x D`` (shared by all levels) or ``B x L x K x D`` (one set per transformer level, coarse to
  fine, as in HierVL's per-level centres ``c_t^(l)``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import fvcore.nn.weight_init as weight_init
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .ms_deform_attn import MS_DEFORM_ATTN_IMPLS, MSDeformAttn
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnTransformerEncoderLayer",
    "TextCrossAttentionLayer",
    "build_pixel_decoder",
]


class TextCrossAttentionLayer(nn.Module):
    """HierVL text-to-pixel attention: ``z <- LN(z + Dropout(MHA(q=z, k=c, v=c)))``.

    Args:
        d_model: pixel token / text centre width ``D``.
        n_heads: attention heads.
        dropout: dropout on the attention weights and on the residual branch.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, text_centers: Tensor) -> Tensor:
        """src: ``B x S x D`` pixel tokens; text_centers: ``B x K x D``. Returns ``B x S x D``."""
        attended = self.attn(src, text_centers, text_centers, need_weights=False)[0]
        return self.norm(src + self.dropout(attended))


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """One post-norm deformable encoder layer: self-attention, optional text cross-attention, FFN.

    Args:
        d_model: token width ``D``.
        d_ffn: FFN hidden width.
        dropout: dropout of the residual branches and FFN.
        n_levels, n_heads, n_points: MSDeformAttn shape.
        text_cross_attention: add a :class:`TextCrossAttentionLayer` after the self-attention.
        impl: MSDeformAttn core implementation.
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, text_cross_attention: bool = False,
                 impl: str = "auto") -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.text_attn = TextCrossAttentionLayer(d_model, n_heads, dropout) if text_cross_attention else None
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Optional[Tensor] = None,
                text_centers: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            src: ``B x S x D`` flattened tokens of all levels; pos: ``B x S x D`` position + level embedding.
            reference_points: ``B x S x L x 2``; spatial_shapes ``L x 2``; level_start_index ``L``.
            padding_mask: optional ``B x S`` bool (True = padding).
            text_centers: ``B x K x D`` or ``B x L x K x D``; required iff the layer has text attention.

        Returns:
            ``B x S x D``.
        """
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        if self.text_attn is not None:
            if text_centers is None:
                raise ValueError("text_cross_attention is on but no text_centers were given")
            src = self._text_attention(src, text_centers, spatial_shapes)
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))

    def _text_attention(self, src: Tensor, text_centers: Tensor, spatial_shapes: Tensor) -> Tensor:
        if text_centers.dim() == 3:
            return self.text_attn(src, text_centers)
        # Per-level centres: the tokens of level l attend to centre set l only.
        sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
        if text_centers.shape[1] != len(sizes):
            raise ValueError(
                f"per-level text_centers must be B x L x K x D with L = {len(sizes)}, got "
                f"{tuple(text_centers.shape)}"
            )
        chunks = src.split(sizes, dim=1)
        return torch.cat([self.text_attn(c, text_centers[:, lvl]) for lvl, c in enumerate(chunks)], dim=1)


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Deformable-DETR encoder over a list of maps: input projection is done by the caller.

    Args:
        d_model, nhead, num_encoder_layers, dim_feedforward, dropout: encoder shape.
        num_feature_levels: number of levels ``L``; enc_n_points: sampling points ``P``.
        text_cross_attention: HierVL text cross-attention in every layer.
        impl: MSDeformAttn core implementation.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, num_feature_levels: int = 4,
                 enc_n_points: int = 4, text_cross_attention: bool = False, impl: str = "auto") -> None:
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.text_cross_attention = text_cross_attention
        self.layers = nn.ModuleList([
            MSDeformAttnTransformerEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead,
                                                enc_n_points, text_cross_attention, impl)
            for _ in range(num_encoder_layers)
        ])
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Mask2Former/Deformable-DETR: Xavier on every matrix, then MSDeformAttn's own scheme on top, and a
        # normal level embedding. (The text MultiheadAttention matrices get Xavier too, as in nn.MHA.)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_reference_points(spatial_shapes: List[Tuple[int, int]], batch_size: int, device: torch.device,
                             dtype: torch.dtype = torch.float32) -> Tensor:
        """Pixel centres of every token, normalised ``(x, y)``: ``B x S x L x 2`` (same on all levels)."""
        points = []
        for h, w in spatial_shapes:
            ys, xs = torch.meshgrid(
                (torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
                (torch.arange(w, device=device, dtype=dtype) + 0.5) / w,
                indexing="ij",
            )
            points.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
        ref = torch.cat(points, 0)  # S x 2
        return ref[None, :, None, :].expand(batch_size, -1, len(spatial_shapes), -1)

    def forward(self, srcs: List[Tensor], pos_embeds: List[Tensor],
                text_centers: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            srcs: L maps ``B x D x H_l x W_l``; pos_embeds: L position encodings of the same shapes.
            text_centers: see :class:`MSDeformAttnTransformerEncoderLayer`.

        Returns:
            ``(memory B x S x D, spatial_shapes L x 2 long, level_start_index L long)``.
        """
        if len(srcs) != len(pos_embeds) or len(srcs) != self.level_embed.shape[0]:
            raise ValueError(f"expected {self.level_embed.shape[0]} levels, got {len(srcs)} maps and "
                             f"{len(pos_embeds)} position encodings")
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        src_flatten = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos_flatten = torch.cat([
            p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
            for lvl, p in enumerate(pos_embeds)
        ], 1)
        device = src_flatten.device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        sizes = spatial_shapes.prod(1)
        level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
        reference_points = self.get_reference_points(shapes, src_flatten.shape[0], device)

        output = src_flatten
        for layer in self.layers:
            output = layer(output, pos_flatten, reference_points, spatial_shapes, level_start_index,
                           None, text_centers)
        return output, spatial_shapes, level_start_index


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former pixel decoder: deformable encoder on the coarse levels + FPN to stride ``common_stride``.

    Args:
        input_shape: backbone feature shapes (e.g. res2..res5), any order; sorted by stride here.
        transformer_dropout: dropout of the encoder layers.
        transformer_nheads: heads of MSDeformAttn (and of the text cross-attention).
        transformer_dim_feedforward: FFN hidden width.
        transformer_enc_layers: number of encoder layers ``M``.
        transformer_n_points: sampling points per head and level.
        conv_dim: width ``D`` of the encoder and FPN (divisible by 32: GroupNorm(32)).
        mask_dim: channels of ``mask_features``.
        norm: detectron2 norm name for the FPN convs ("GN", "BN", "" ...).
        transformer_in_features: backbone features fed to the encoder (e.g. res3, res4, res5).
        common_stride: stride of ``mask_features`` (4).
        text_cross_attention: HierVL text-to-pixel attention after every deformable layer.
        msdeform_attn_impl: "auto", "pytorch" or "triton" (see :func:`ms_deform_attn`).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        transformer_n_points: int,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]],
        transformer_in_features: List[str],
        common_stride: int,
        text_cross_attention: bool = False,
        msdeform_attn_impl: str = "auto",
    ) -> None:
        super().__init__()
        if msdeform_attn_impl not in MS_DEFORM_ATTN_IMPLS:
            raise ValueError(f"Unknown MSDEFORM_ATTN_IMPL {msdeform_attn_impl!r}; "
                             f"expected one of {MS_DEFORM_ATTN_IMPLS}")
        if conv_dim % 32 != 0:
            raise ValueError(f"conv_dim ({conv_dim}) must be divisible by 32 (GroupNorm(32) input projections)")
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ValueError(f"transformer_in_features {missing} are not in the input features "
                             f"{sorted(input_shape)}")

        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)  # fine to coarse
        self.in_features = [k for k, _ in shapes]
        self.feature_strides = [v.stride for _, v in shapes]
        self.feature_channels = [v.channels for _, v in shapes]

        transformer_shapes = [(k, v) for k, v in shapes if k in transformer_in_features]
        self.transformer_in_features = [k for k, _ in transformer_shapes]  # fine to coarse
        transformer_in_channels = [v.channels for _, v in transformer_shapes]
        self.transformer_feature_strides = [v.stride for _, v in transformer_shapes]
        self.transformer_num_feature_levels = len(self.transformer_in_features)
        self.text_cross_attention = text_cross_attention

        # Input projections, coarse to fine (the encoder's level order).
        self.input_proj = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for c in transformer_in_channels[::-1]
        ])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            nhead=transformer_nheads,
            num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward,
            dropout=transformer_dropout,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=transformer_n_points,
            text_cross_attention=text_cross_attention,
            impl=msdeform_attn_impl,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        weight_init.c2_xavier_fill(self.mask_features)

        self.common_stride = common_stride
        # FPN levels: every backbone level finer than the finest encoder level, down to common_stride.
        stride = min(self.transformer_feature_strides)
        self.num_fpn_levels = max(int(np.log2(stride) - np.log2(common_stride)), 0)
        if self.num_fpn_levels > self.in_features.index(self.transformer_in_features[0]):
            raise ValueError(
                f"common_stride {common_stride} needs {self.num_fpn_levels} backbone levels finer than "
                f"stride {stride}, input_shape has {self.in_features}"
            )

        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral_conv = Conv2d(in_channels, conv_dim, kernel_size=1, bias=use_bias,
                                  norm=get_norm(norm, conv_dim))
            output_conv = Conv2d(conv_dim, conv_dim, kernel_size=3, stride=1, padding=1, bias=use_bias,
                                 norm=get_norm(norm, conv_dim), activation=F.relu)
            weight_init.c2_xavier_fill(lateral_conv)
            weight_init.c2_xavier_fill(output_conv)
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # Coarse to fine, the order they are applied in (plain lists: the modules are registered above,
        # with Mask2Former's names, so checkpoints keep the same keys).
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict[str, Any]:
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "transformer_dropout": head.TRANSFORMER_ENC_DROPOUT,
            "transformer_nheads": head.TRANSFORMER_ENC_NHEADS,
            "transformer_dim_feedforward": head.TRANSFORMER_ENC_DIM_FEEDFORWARD,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_n_points": head.TRANSFORMER_ENC_POINTS,
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_in_features": list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "common_stride": head.COMMON_STRIDE,
            "msdeform_attn_impl": head.MSDEFORM_ATTN_IMPL,
        }

    def forward_features(self, features: Dict[str, Tensor], text_centers: Optional[Tensor] = None,
                         level_hook: Optional[Callable[[List[Tensor]], List[Tensor]]] = None
                         ) -> Tuple[Tensor, List[Tensor]]:
        """
        Args:
            features: backbone maps ``B x C_f x H/s_f x W/s_f`` for every name in ``input_shape``.
            text_centers: HierVL textual cluster centres ``B x K x conv_dim`` (or ``B x L x K x conv_dim``
                per transformer level, coarse to fine). Required when ``text_cross_attention`` is on,
                ignored otherwise.
            level_hook: optional function applied to the encoder outputs ``[z^1, z^2, z^3]`` before the FPN
                (it returns the list, some levels replaced; same shapes), so that a refined level (the
                thesis's CAA) feeds both the decoder and, through the FPN, the mask features.

        Returns:
            ``(mask_features, multi_scale_features)``: ``mask_features`` is ``B x mask_dim x H/4 x W/4``
            (stride ``common_stride``); ``multi_scale_features`` are the encoder outputs
            ``[z^1, z^2, z^3]``, each ``B x conv_dim x h x w``, coarse to fine (strides 32, 16, 8).
        """
        if self.text_cross_attention:
            if text_centers is None:
                raise ValueError("MSDeformAttnPixelDecoder was built with text_cross_attention=True: "
                                 "forward_features needs text_centers (B x K x conv_dim)")
            if text_centers.dim() not in (3, 4) or text_centers.shape[-1] != self.transformer.d_model:
                raise ValueError(f"text_centers must be B x K x {self.transformer.d_model} or "
                                 f"B x L x K x {self.transformer.d_model}, got {tuple(text_centers.shape)}")
        else:
            text_centers = None

        srcs, pos = [], []
        for idx, name in enumerate(self.transformer_in_features[::-1]):  # coarse to fine
            x = features[name]
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))
        memory, spatial_shapes, _ = self.transformer(srcs, pos, text_centers)

        bs = memory.shape[0]
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        out = [
            z.transpose(1, 2).reshape(bs, -1, h, w)
            for z, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        if level_hook is not None:
            out = list(level_hook(out))
        multi_scale_features = list(out)

        # FPN: finer backbone levels, coarse to fine; bilinear upsampling by target size, so odd sizes work.
        y = out[-1]
        for idx, name in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            cur = self.lateral_convs[idx](features[name])
            y = cur + F.interpolate(y, size=cur.shape[-2:], mode="bilinear", align_corners=False)
            y = self.output_convs[idx](y)
        return self.mask_features(y), multi_scale_features

    def forward(self, features: Dict[str, Tensor],
                text_centers: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor]]:
        """Same as :meth:`forward_features` (so module hooks see the call)."""
        return self.forward_features(features, text_centers)


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec], **kwargs) -> nn.Module:
    """Build ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME`` from ``SEM_SEG_HEADS_REGISTRY``.

    The decoder must provide ``forward_features(features, text_centers=None)``. ``kwargs`` override the
    config's arguments (HierVL's ``text_cross_attention=True``, ``MODEL.HIERVL.TEXT_CROSS_ATTENTION``).
    """
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape, **kwargs)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(f"pixel decoder {name!r} has no forward_features method; it cannot be used here")
    return model
