"""Data: dataset registration (:mod:`.datasets`), dataset mappers (:mod:`.dataset_mappers`), the synthetic
shapes generator, folder datasets, split files, checked readers and the labeled-set samplers.

Importing this package registers the default shapes datasets (``shapes_train`` / ``shapes_val``,
6 classes, 128 px, 400 + 50 images, seed 0; generated lazily on the first ``DatasetCatalog.get``) and the
real datasets (VOC, COCO-81, ADE20K, Cityscapes: full sets and the paper's seeded splits) under
``$DETECTRON2_DATASETS``, lazily: nothing is read at import time and absent data only fail at
``DatasetCatalog.get`` (with the path and ``datasets/README.md``). Call :func:`register_shapes_from_cfg`,
:func:`register_sem_seg_folder`, :func:`register_split_files_from_cfg` or
:func:`register_custom_semi_dataset` for other data. Every name below is importable from here.
"""
from . import datasets  # noqa: F401  (registers the datasets)
from .catalog import dataset_metadata, register_dataset
from .dataset_mappers import (
    HVLFormerSemanticDatasetMapper,
    PadTo,
    RandomCropPad,
    ResizeLongestSide,
    UnlabeledViewsMapper,
    build_train_geometry_augmentations,
    dataset_num_classes,
    inference_resize,
    is_benchmark_dataset,
)
from .datasets import register_datasets_from_cfg
from .datasets.builtin import (
    BUILTIN_DATASETS,
    PAPER_SPLIT_COUNTS,
    PAPER_SPLIT_SEEDS,
    builtin_class_colors,
    builtin_class_names,
    builtin_dataset_root,
    datasets_root,
    load_builtin_classes,
    load_builtin_dataset,
    load_paper_split,
    make_paper_split,
    paper_split_dir,
    paper_split_name,
    register_builtin_datasets,
    write_paper_splits,
)
from .datasets.register_custom import (
    register_custom_semi_dataset,
    register_custom_semi_dataset_from_cfg,
    register_sem_seg_folder,
    register_split_files,
    register_split_files_from_cfg,
)
from .datasets.register_shapes import register_shapes, register_shapes_from_cfg, register_shapes_semi_split, shapes_root
from .folder import default_class_colors, load_sem_seg_folder
from .samplers import RareClassSampler, class_pixel_counts, rare_class_probabilities, repeat_to_length
from .shapes import SHAPES_CLASSES_FILE, generate_shapes_split, shapes_class_colors, shapes_class_names
from .splits import load_split_files, parse_split_file, seeded_split
from .validation import (
    check_dataset_root,
    check_image_label_sizes,
    check_label_values,
    read_image_checked,
    read_label_checked,
)

__all__ = [
    "register_dataset",
    "dataset_metadata",
    "HVLFormerSemanticDatasetMapper",
    "PadTo",
    "RandomCropPad",
    "ResizeLongestSide",
    "UnlabeledViewsMapper",
    "build_train_geometry_augmentations",
    "dataset_num_classes",
    "inference_resize",
    "is_benchmark_dataset",
    "BUILTIN_DATASETS",
    "PAPER_SPLIT_COUNTS",
    "PAPER_SPLIT_SEEDS",
    "builtin_class_colors",
    "builtin_class_names",
    "builtin_dataset_root",
    "datasets_root",
    "load_builtin_classes",
    "load_builtin_dataset",
    "load_paper_split",
    "make_paper_split",
    "paper_split_dir",
    "paper_split_name",
    "register_builtin_datasets",
    "write_paper_splits",
    "load_split_files",
    "parse_split_file",
    "register_custom_semi_dataset",
    "register_custom_semi_dataset_from_cfg",
    "register_datasets_from_cfg",
    "register_split_files",
    "register_split_files_from_cfg",
    "seeded_split",
    "default_class_colors",
    "load_sem_seg_folder",
    "register_sem_seg_folder",
    "SHAPES_CLASSES_FILE",
    "generate_shapes_split",
    "register_shapes",
    "register_shapes_from_cfg",
    "register_shapes_semi_split",
    "shapes_class_colors",
    "shapes_class_names",
    "shapes_root",
    "RareClassSampler",
    "class_pixel_counts",
    "rare_class_probabilities",
    "repeat_to_length",
    "check_dataset_root",
    "check_image_label_sizes",
    "check_label_values",
    "read_image_checked",
    "read_label_checked",
]
