"""Building the image backbone by name (``MODEL.BACKBONE.NAME``) on a CLIP vision tower that is already loaded."""
from __future__ import annotations

from detectron2.modeling import BACKBONE_REGISTRY
from torch import nn

from .clip_vit import CLIPViTBackbone

__all__ = ["build_clip_backbone"]


def build_clip_backbone(cfg, visual: nn.Module) -> CLIPViTBackbone:
    """``MODEL.BACKBONE.NAME`` from detectron2's ``BACKBONE_REGISTRY``, on the already loaded CLIP tower
    ``visual`` (the meta-architecture loads the CLIP model once for both towers)."""
    name = cfg.MODEL.BACKBONE.NAME
    backbone_class = BACKBONE_REGISTRY.get(name)
    if not (isinstance(backbone_class, type) and issubclass(backbone_class, CLIPViTBackbone)):
        raise ValueError(f"MODEL.BACKBONE.NAME must name CLIPViTBackbone or a subclass (the model needs the CLIP "
                         f"image embeddings and the frozen reference encoder), got {name!r}")
    return backbone_class(cfg, visual=visual)
