"""Data: the synthetic shapes dataset, folder datasets, checked readers and the semantic dataset mapper.

Importing this package registers the default shapes datasets (``shapes_train`` / ``shapes_val``,
6 classes, 128 px, 400 + 50 images, seed 0; generated lazily on the first ``DatasetCatalog.get``).
Call :func:`register_shapes` / :func:`register_shapes_from_cfg` to replace them with other parameters.

It also registers the real datasets of :mod:`.builtin` (VOC, COCO-81, ADE20K, Cityscapes: full sets and
the paper's seeded splits) under ``$DETECTRON2_DATASETS``, lazily: nothing is read at import time and
absent data only fail at ``DatasetCatalog.get`` (with the path and ``datasets/README.md``). Split files and
custom semi-supervised datasets: :mod:`.splits`.
"""
import warnings

# ``python -m hvlformer.data.shapes`` imports this package (and so ``shapes``) before running the module
# as __main__; runpy then warns about the already-imported module. The CLI only generates files, so the
# double import is harmless: silence exactly that message.
warnings.filterwarnings(
    "ignore",
    message=r"'hvlformer\.data\.shapes' found in sys\.modules after import of package 'hvlformer\.data'",
    category=RuntimeWarning,
)

from .dataset_mapper import (  # noqa: E402
    HVLFormerSemanticDatasetMapper,
    PadTo,
    RandomCropPad,
    ResizeLongestSide,
    build_train_geometry_augmentations,
    dataset_num_classes,
    inference_resize,
    is_benchmark_dataset,
)
from .builtin import (  # noqa: E402
    BUILTIN_DATASETS,
    PAPER_SPLIT_COUNTS,
    PAPER_SPLIT_SEEDS,
    builtin_class_colors,
    builtin_class_names,
    builtin_dataset_root,
    datasets_root,
    load_builtin_dataset,
    load_paper_split,
    make_paper_split,
    paper_split_dir,
    paper_split_name,
    register_builtin_datasets,
    write_paper_splits,
)
from .folder import default_class_colors, load_sem_seg_folder, register_sem_seg_folder  # noqa: E402
from .shapes import (  # noqa: E402
    SHAPES_CLASSES_FILE,
    generate_shapes_split,
    register_shapes,
    register_shapes_from_cfg,
    shapes_class_colors,
    shapes_class_names,
    shapes_root,
)
from .splits import (  # noqa: E402
    load_split_files,
    parse_split_file,
    register_custom_semi_dataset,
    register_custom_semi_dataset_from_cfg,
    register_split_files,
    register_split_files_from_cfg,
    seeded_split,
)
from .validation import (  # noqa: E402
    check_dataset_root,
    check_image_label_sizes,
    check_label_values,
    read_image_checked,
    read_label_checked,
)

register_shapes()
register_builtin_datasets()  # lazy: nothing is read until DatasetCatalog.get

__all__ = [
    "HVLFormerSemanticDatasetMapper",
    "PadTo",
    "RandomCropPad",
    "ResizeLongestSide",
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
    "shapes_class_colors",
    "shapes_class_names",
    "shapes_root",
    "check_dataset_root",
    "check_image_label_sizes",
    "check_label_values",
    "read_image_checked",
    "read_label_checked",
]
