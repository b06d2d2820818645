"""Text side: the frozen CLIP text encoder with learnable context, and the class descriptions."""
from .descriptions import (
    ClassDescriptions,
    load_class_descriptions,
    reference_prompts,
    resolve_descriptions_path,
)
from .text_encoder import CLIPTextEncoder

__all__ = [
    "CLIPTextEncoder",
    "ClassDescriptions",
    "load_class_descriptions",
    "reference_prompts",
    "resolve_descriptions_path",
]
