"""A generic "image folder + mask folder" semantic-segmentation dataset.

Images and masks are paired by their path relative to the root without the extension
(``image_root/a/b.jpg`` <-> ``label_root/a/b.png``), so nested folders work. Every image needs a mask
(a clear error lists the ones without); masks without an image are ignored with a warning.
``label_root=None`` gives unlabeled entries (no ``sem_seg_file_name``), for the unlabeled split of
semi-supervised training. Registration: :func:`hvlformer.data.datasets.register_custom.register_sem_seg_folder`.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Union

from .validation import check_dataset_root

__all__ = ["load_sem_seg_folder", "default_class_colors", "index_files"]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]


def _index_files(root: str, ext: str) -> Dict[str, str]:
    """Map "relative/path/stem" -> absolute file path for all files under ``root`` ending in ``ext``."""
    ext_l = ext.lower()
    out: Dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for fn in filenames:
            if fn.startswith(".") or not fn.lower().endswith(ext_l):
                continue
            full = os.path.join(dirpath, fn)
            key = os.path.relpath(full, root)[: -len(ext)].replace(os.sep, "/")
            out[key] = full
    return out


def index_files(root: PathLike, ext: str) -> Dict[str, str]:
    """Map ``"relative/path/stem"`` -> file path for the files under ``root`` whose names end in ``ext``
    (any suffix: ``".jpg"``, ``"_leftImg8bit.png"``); hidden files are skipped, links followed."""
    return _index_files(os.fspath(root), ext)


def load_sem_seg_folder(
    image_root: PathLike,
    label_root: Optional[PathLike],
    image_ext: str = ".jpg",
    label_ext: str = ".png",
) -> List[Dict[str, Any]]:
    """Dataset dicts ``{"file_name", "sem_seg_file_name", "image_id"}`` sorted by relative path."""
    image_root = check_dataset_root(image_root, "Image folder")
    images = _index_files(image_root, image_ext)
    if not images:
        raise FileNotFoundError(f"No images with extension {image_ext!r} found under {image_root}.")
    if label_root is None:
        return [{"file_name": images[k], "image_id": k} for k in sorted(images)]

    label_root = check_dataset_root(label_root, "Label (mask) folder")
    labels = _index_files(label_root, label_ext)
    missing = sorted(k for k in images if k not in labels)
    if missing:
        shown = ", ".join(images[k] for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"{len(missing)} of {len(images)} images under {image_root} have no mask '<same name>{label_ext}' "
            f"under {label_root}: {shown}"
        )
    extra = len(set(labels) - set(images))
    if extra:
        logger.warning(f"{extra} masks under {label_root} have no image with extension {image_ext!r}; ignored.")
    return [
        {"file_name": images[k], "sem_seg_file_name": labels[k], "image_id": k} for k in sorted(images)
    ]


def default_class_colors(num_classes: int) -> List[List[int]]:
    """A deterministic, well-spread RGB palette (the Pascal VOC bit-interleaving scheme)."""
    colors = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append([r, g, b])
    return colors
