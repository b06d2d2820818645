"""HVLFormer's modules; importing registers them in detectron2's registries."""
from .backbone import CLIPViTBackbone
from .clip_loader import build_clip_model
from .criterion import HVLSetCriterion, semantic_to_targets
from .htqg import HTQG
from .losses import HVLFormerLoss
from .matcher import HungarianMatcher
from .meta_arch import HierVL, HVLFormer
from .outputs import HVLFormerOutput, semantic_scores
from .pixel_decoder import MSDeformAttnPixelDecoder, build_pixel_decoder
from .ptrm import PTRM
from .text import CLIPTextEncoder
from .transformer_decoder import HVLTransformerDecoder, build_transformer_decoder

__all__ = [
    "CLIPViTBackbone", "build_clip_model", "HVLSetCriterion", "semantic_to_targets", "HTQG", "HungarianMatcher",
    "MSDeformAttnPixelDecoder", "build_pixel_decoder", "PTRM", "CLIPTextEncoder", "HVLTransformerDecoder",
    "build_transformer_decoder", "HVLFormer", "HierVL", "HVLFormerLoss", "HVLFormerOutput", "semantic_scores",
]
