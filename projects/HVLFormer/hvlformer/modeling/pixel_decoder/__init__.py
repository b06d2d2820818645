"""Pixel decoder: multi-scale deformable attention (MSDeformAttn) encoder + FPN (Mask2Former), paper Sec. 4.1."""
from .ms_deform_attn import (
    MS_DEFORM_ATTN_IMPLS,
    MSDeformAttn,
    get_fast_kernel,
    ms_deform_attn,
    ms_deform_attn_core_pytorch,
    register_fast_kernel,
)
from .msdeformattn_pixel_decoder import (
    MSDeformAttnPixelDecoder,
    MSDeformAttnTransformerEncoderLayer,
    MSDeformAttnTransformerEncoderOnly,
    TextCrossAttentionLayer,
    build_pixel_decoder,
)
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "MS_DEFORM_ATTN_IMPLS",
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoderLayer",
    "MSDeformAttnTransformerEncoderOnly",
    "PositionEmbeddingSine",
    "TextCrossAttentionLayer",
    "build_pixel_decoder",
    "get_fast_kernel",
    "ms_deform_attn",
    "ms_deform_attn_core_pytorch",
    "register_fast_kernel",
]
