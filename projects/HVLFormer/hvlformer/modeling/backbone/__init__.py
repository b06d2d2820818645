"""CLIP vision backbones (importing this package registers ``CLIPViTBackbone`` in BACKBONE_REGISTRY)."""
from .build import build_clip_backbone
from .clip_vit import NOMINAL_STRIDE, CLIPViTBackbone, interpolate_pos_embed

__all__ = ["CLIPViTBackbone", "interpolate_pos_embed", "NOMINAL_STRIDE", "build_clip_backbone"]
