"""HVLFormer transformer decoders (masked attention over textual queries)."""
from .hvl_transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    HVLTransformerDecoder,
    build_transformer_decoder,
    compute_attention_mask,
)

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "HVLTransformerDecoder",
    "build_transformer_decoder",
    "compute_attention_mask",
]
