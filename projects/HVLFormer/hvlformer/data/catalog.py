"""The one registration primitive: a dataset loader and its metadata, replacing any earlier entry.

detectron2's ``DatasetCatalog.register`` refuses a name that exists and ``MetadataCatalog.get(name).set``
refuses to change a value, yet the project re-registers names on purpose (``shapes_train`` with the
config's image size, the built-in sets under another root in tests, a custom dataset edited between
runs). Every ``register_*`` function of :mod:`hvlformer.data.datasets` goes through
:func:`register_dataset`, so "the last registration wins" holds for the loader and the metadata alike.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

__all__ = ["register_dataset", "dataset_metadata"]


def register_dataset(name: str, loader: Callable[[], List[Dict[str, Any]]], **metadata: Any) -> str:
    """Register ``loader`` (called lazily by ``DatasetCatalog.get``) and ``metadata`` under ``name``,
    replacing an earlier registration of the name (dataset and metadata). Returns ``name``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
    return name


def dataset_metadata(name: str) -> Dict[str, Any]:
    """A copy of the metadata of ``name`` without its ``name`` field, to register a subset of it (a split)
    with the same classes, colours and roots."""
    from detectron2.data import MetadataCatalog

    metadata = MetadataCatalog.get(name).as_dict()
    metadata.pop("name", None)
    return metadata
