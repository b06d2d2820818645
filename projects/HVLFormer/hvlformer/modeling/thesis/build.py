"""How the meta-architecture builds the thesis modules from the config and maps a vocabulary to ECAC's memory
(docs/THESIS_MODULES.md, "Integration")."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .caa import ClassAwareAffinity
from .category_filter import CategoryFilter
from .class_refinement import ClassLinearAttentionRefinement
from .ecac import ExtendedContextAwareClassifier
from .feature_fusion import VisualFeatureFusion

__all__ = ["build_thesis_modules", "ecac_vocabulary_index"]


def build_thesis_modules(cfg, text_dim: int, num_classes: int, shapes: Dict[str, Any]) -> Dict[str, Any]:
    """The enabled thesis modules, as the meta-architecture's keyword arguments (``caa``, ``caa_level``,
    ``ecac``, ``ecac_inference_weight``, ``category_filter``, ``class_refinement``, ``fusion``; None = off).

    Called after the network is built, so that the paper model's random initialisation is the same with
    them off (a disabled module is not built); the order below is the order of their initialisation.

    Args:
        text_dim: C, the text embedding width. num_classes: K.
        shapes: the backbone's ``output_shape()`` (the fusion's input channels).
    """
    hv = cfg.MODEL.HVLFORMER
    lsm = hv.LSMSEG
    if hv.CAA.ENABLED and not 0 <= hv.CAA.LEVEL <= 2:
        raise ValueError(f"MODEL.HVLFORMER.CAA.LEVEL must be 0, 1 or 2 (strides 32, 16, 8), got {hv.CAA.LEVEL}")
    return {
        "caa": ClassAwareAffinity(cfg, text_dim=text_dim) if hv.CAA.ENABLED else None,
        "caa_level": hv.CAA.LEVEL,
        "ecac": (ExtendedContextAwareClassifier(cfg, text_dim=text_dim, num_classes=num_classes)
                 if hv.ECAC.ENABLED else None),
        "ecac_inference_weight": hv.ECAC.INFERENCE_WEIGHT,
        "category_filter": CategoryFilter(cfg) if lsm.CATEGORY_FILTER else None,
        "class_refinement": ClassLinearAttentionRefinement(cfg) if lsm.CLASS_REFINEMENT else None,
        "fusion": (VisualFeatureFusion(cfg, in_channels={name: spec.channels for name, spec in shapes.items()})
                   if lsm.FUSION else None),
    }


def ecac_vocabulary_index(training_class_names: Sequence[str], class_names: Sequence[str],
                          class_index: Optional[Tensor] = None,
                          device: Optional[torch.device] = None) -> Optional[Tensor]:
    """ECAC's ``vocabulary_index`` for the vocabulary ``class_names`` (or its classes ``class_index``): the
    memory row of each class (ECAC's rows belong to ``training_class_names``), -1 for a name the training
    vocabulary does not have; None = the training vocabulary itself."""
    training: List[str] = list(training_class_names)
    if class_index is None and list(class_names) == training:
        return None
    index = torch.tensor([training.index(n) if n in training else -1 for n in class_names], device=device)
    return index if class_index is None else index[class_index]
