"""HVLFormer: semi-supervised semantic segmentation with language anchors, as a detectron2 project.

Importing the package registers everything with detectron2: the ``HVLFormer`` and ``HierVL`` meta-architectures, the
``CLIPViTBackbone``, the ``MSDeformAttnPixelDecoder``, the transformer decoder, and the synthetic
``shapes`` datasets.
"""
from . import data  # noqa: F401  (registers datasets)
from . import modeling  # noqa: F401  (registers backbone, pixel decoder, transformer decoder)
from .config import add_hvlformer_config
from .engine.setup import build_trainer_class, setup_cfg
from .modeling.meta_arch import HierVL, HVLFormer
from .predictor import HVLFormerPredictor

__all__ = ["HVLFormer", "HierVL", "HVLFormerPredictor", "add_hvlformer_config", "build_trainer_class", "setup_cfg"]
__version__ = "0.1.0"
