"""Dataset registration, one module per dataset family (Mask2Former's layout).

Importing this package registers, lazily (nothing is read or generated until ``DatasetCatalog.get``):

* :mod:`.register_shapes`: the synthetic ``shapes_train`` / ``shapes_val`` (defaults; the config's sizes and
  the semi-supervised split are registered by the trainer);
* :mod:`.register_voc`, :mod:`.register_coco`, :mod:`.register_ade20k`, :mod:`.register_cityscapes`: the
  full sets and the paper's seeded splits under ``$DETECTRON2_DATASETS`` (machinery in :mod:`.builtin`);
* :mod:`.register_custom` registers nothing by itself: your folders, split files and custom
  semi-supervised datasets (``DATASETS.SPLIT``, ``DATASETS.CUSTOM``).

Every registration goes through :func:`hvlformer.data.catalog.register_dataset`. The functions are
imported from the modules (or from :mod:`hvlformer.data`), e.g.
``from hvlformer.data.datasets.register_shapes import register_shapes``.
"""
from . import builtin, register_custom, register_shapes  # noqa: F401  (register_shapes registers shapes_*)
from . import register_voc, register_coco, register_ade20k, register_cityscapes  # noqa: F401  (in this order)


def register_datasets_from_cfg(cfg) -> None:
    """Register the datasets whose definition depends on the config: the shapes sizes
    (``DATASETS.SHAPES``) and their labeled split, split files (``DATASETS.SPLIT``) and a custom
    semi-supervised dataset (``DATASETS.CUSTOM``). Lazy; called before anything reads the catalog."""
    register_shapes.register_shapes_from_cfg(cfg)
    register_shapes.register_shapes_semi_split(cfg)
    register_custom.register_split_files_from_cfg(cfg)
    register_custom.register_custom_semi_dataset_from_cfg(cfg)


__all__ = ["register_datasets_from_cfg"]
