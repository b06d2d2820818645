"""Meta-architectures registered in detectron2's ``META_ARCH_REGISTRY``: ``HVLFormer`` and its variant ``HierVL``."""
from .hiervl import HierVL
from .hvlformer import HVLFormer

__all__ = ["HVLFormer", "HierVL"]
