"""Dataset mappers: a dataset dict in, the model's input dict out (read, validate, augment)."""
from .semantic_dataset_mapper import (
    HVLFormerSemanticDatasetMapper,
    PadTo,
    RandomCropPad,
    ResizeLongestSide,
    build_train_geometry_augmentations,
    dataset_num_classes,
    inference_resize,
    inference_scale,
    is_benchmark_dataset,
)
from .unlabeled_views_mapper import UnlabeledViewsMapper, strong_photometric, weak_photometric

__all__ = [
    "HVLFormerSemanticDatasetMapper",
    "PadTo",
    "RandomCropPad",
    "ResizeLongestSide",
    "build_train_geometry_augmentations",
    "dataset_num_classes",
    "inference_resize",
    "inference_scale",
    "is_benchmark_dataset",
    "UnlabeledViewsMapper",
    "weak_photometric",
    "strong_photometric",
]
