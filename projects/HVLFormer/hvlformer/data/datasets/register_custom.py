"""Your own data: an image folder + mask folder (:func:`register_sem_seg_folder`), split files of a
registered dataset (:func:`register_split_files`) and a custom semi-supervised dataset
(:func:`register_custom_semi_dataset`), each also from the config (``DATASETS.SPLIT``, ``DATASETS.CUSTOM``).

Loading is lazy (the folders and lists are read by ``DatasetCatalog.get``); registering a name again
replaces it. The split-file format and its matching rules are those of :mod:`hvlformer.data.splits`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..catalog import dataset_metadata, register_dataset
from ..folder import default_class_colors, index_files, load_sem_seg_folder
from ..splits import ListSource, SplitEntry, dataset_root_of, load_split_files, read_split_list
from ..validation import check_dataset_root

__all__ = [
    "register_sem_seg_folder",
    "register_split_files",
    "register_split_files_from_cfg",
    "register_custom_semi_dataset",
    "register_custom_semi_dataset_from_cfg",
]

PathLike = Union[str, os.PathLike]


def register_sem_seg_folder(
    name: str,
    image_root: PathLike,
    label_root: Optional[PathLike],
    class_names: Sequence[str],
    ignore_label: int = 255,
    colors: Optional[Sequence[Sequence[int]]] = None,
    descriptions_name: Optional[str] = None,
    image_ext: str = ".jpg",
    label_ext: str = ".png",
) -> str:
    """Register a folder dataset in ``DatasetCatalog`` / ``MetadataCatalog`` (replacing ``name``).

    Loading is lazy (the folders are listed by ``DatasetCatalog.get``). Returns ``name``.
    """
    class_names = [str(c) for c in class_names]
    if not class_names:
        raise ValueError(f"register_sem_seg_folder({name!r}): class_names is empty.")
    if colors is None:
        colors = default_class_colors(len(class_names))
    colors = [list(map(int, c)) for c in colors]
    if len(colors) != len(class_names):
        raise ValueError(
            f"register_sem_seg_folder({name!r}): {len(colors)} colors for {len(class_names)} classes."
        )
    image_root, label_root_s = os.fspath(image_root), (os.fspath(label_root) if label_root is not None else None)
    meta: Dict[str, Any] = dict(
        stuff_classes=class_names,
        stuff_colors=colors,
        ignore_label=int(ignore_label),
        evaluator_type="sem_seg",
        image_root=image_root,
    )
    if label_root_s is not None:
        meta["sem_seg_root"] = label_root_s
    if descriptions_name is not None:
        meta["descriptions_name"] = descriptions_name
    return register_dataset(
        name, lambda: load_sem_seg_folder(image_root, label_root_s, image_ext=image_ext, label_ext=label_ext), **meta
    )


# ----------------------------------------------------------------------------------------- split files by name
def _find_list_file(path: str, dataset: str) -> str:
    """``path`` as given, else relative to the dataset root; error naming both when neither exists."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    from detectron2.data import MetadataCatalog

    try:
        alt = os.path.join(dataset_root_of(MetadataCatalog.get(dataset)), path)
    except ValueError:
        return path
    return alt if os.path.isfile(alt) else path


def register_split_files(
    dataset: str,
    labeled_file: Optional[PathLike] = None,
    unlabeled_file: Optional[PathLike] = None,
    names: Tuple[str, str] = ("split_labeled", "split_unlabeled"),
) -> List[str]:
    """Register UniMatch-format split files of the registered full-set ``dataset`` as ``names`` (lazy: the
    files are read by ``DatasetCatalog.get``). Returns the registered names."""
    registered = []
    files = (labeled_file, unlabeled_file)
    for part, (name, path) in enumerate(zip(names, files)):
        if not path:
            continue
        path = _find_list_file(os.fspath(path), dataset)

        def load(path=path, labeled=(part == 0)):
            lab, unl = load_split_files(dataset, path if labeled else None, None if labeled else path)
            return lab if labeled else unl

        registered.append(register_dataset(
            name, load, **{**dataset_metadata(dataset), "split_file": path, "full_dataset": dataset,
                           "split_part": "labeled" if part == 0 else "unlabeled"}))
    return registered


def register_split_files_from_cfg(cfg) -> List[str]:
    """Register ``cfg.DATASETS.SPLIT.LABELED_FILE`` / ``UNLABELED_FILE`` (paths relative to the root of
    ``cfg.DATASETS.SPLIT.DATASET``) as ``split_labeled`` / ``split_unlabeled``. No-op when both are empty."""
    s = cfg.DATASETS.SPLIT
    if not s.LABELED_FILE and not s.UNLABELED_FILE:
        return []
    if not s.DATASET:
        raise ValueError(
            "DATASETS.SPLIT.LABELED_FILE / UNLABELED_FILE are set but DATASETS.SPLIT.DATASET is empty: name the "
            "registered full training set whose root the split paths are relative to (e.g. 'voc_train')."
        )
    return register_split_files(s.DATASET, s.LABELED_FILE or None, s.UNLABELED_FILE or None)


# ----------------------------------------------------------------------------------------- custom datasets
def _custom_dicts(
    entries: Sequence[SplitEntry], image_root: str, mask_root: Optional[str], image_ext: str, mask_ext: str,
) -> List[Dict[str, Any]]:
    out, missing = [], []
    for e in entries:
        img_rel = e.image if "." in e.image.rsplit("/", 1)[-1] else e.image + image_ext
        rec: Dict[str, Any] = {"file_name": os.path.join(image_root, img_rel), "image_id": img_rel.rsplit(".", 1)[0]}
        if not os.path.isfile(rec["file_name"]):
            missing.append(f"{rec['file_name']} ({e.source})")
        if mask_root is not None:
            mask_rel = e.mask or img_rel.rsplit(".", 1)[0] + mask_ext
            rec["sem_seg_file_name"] = os.path.join(mask_root, mask_rel)
            if not os.path.isfile(rec["sem_seg_file_name"]):
                missing.append(f"{rec['sem_seg_file_name']} ({e.source})")
        out.append(rec)
    if missing:
        shown = "; ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} listed files do not exist: {shown}")
    return out


def register_custom_semi_dataset(
    name: str,
    image_root: PathLike,
    mask_root: PathLike,
    class_names: Sequence[str],
    labeled_list: ListSource,
    unlabeled_list: Optional[ListSource] = None,
    val_list: Optional[ListSource] = None,
    *,
    colors: Optional[Sequence[Sequence[int]]] = None,
    ignore_label: int = 255,
    descriptions_name: Optional[str] = None,
    image_ext: str = ".jpg",
    mask_ext: str = ".png",
) -> List[str]:
    """Register a custom semi-supervised dataset as ``{name}_labeled``, ``{name}_unlabeled`` and, with
    ``val_list``, ``{name}_val``. Returns the names.

    Args:
        image_root, mask_root: the image folder and the mask folder. Masks are single-channel PNGs of class
            indices ``0..K-1`` (255 = ignore); palette PNGs are read as their indices.
        class_names: the K class names, in label order.
        labeled_list, val_list: a text file or a list of strings, one ``image [mask]`` per line; the image
            is relative to ``image_root``, the mask to ``mask_root``; without a mask column the mask is the
            image's relative path with ``mask_ext`` (``a/b.jpg`` -> ``a/b.png``). An image without an
            extension gets ``image_ext``.
        unlabeled_list: same format (a mask column is ignored); ``None`` = every image under ``image_root``
            (with ``image_ext``) that is in neither the labeled nor the val list.
        descriptions_name: ``datasets/descriptions/<descriptions_name>.json`` holds the class descriptions
            (otherwise the model uses "a photo of a {class}.").

    Loading is lazy; a missing folder or a listed file that does not exist is an error naming it at
    ``DatasetCatalog.get`` time. Label values and image/mask sizes are checked when the mapper reads them.
    """
    class_names = [str(c) for c in class_names]
    if not class_names:
        raise ValueError(f"register_custom_semi_dataset({name!r}): class_names is empty.")
    colors = [list(map(int, c)) for c in (colors if colors is not None else default_class_colors(len(class_names)))]
    if len(colors) != len(class_names):
        raise ValueError(f"register_custom_semi_dataset({name!r}): {len(colors)} colors for {len(class_names)} classes.")
    image_root_s, mask_root_s = os.fspath(image_root), os.fspath(mask_root)

    def entries(source: ListSource, what: str) -> List[SplitEntry]:
        check_dataset_root(image_root_s, f"Image folder of {name!r}")
        return read_split_list(source, what)

    def load_labeled(source: ListSource, what: str) -> List[Dict[str, Any]]:
        check_dataset_root(mask_root_s, f"Mask folder of {name!r}")
        return _custom_dicts(entries(source, what), image_root_s, mask_root_s, image_ext, mask_ext)

    def load_unlabeled() -> List[Dict[str, Any]]:
        if unlabeled_list is not None:
            return _custom_dicts(entries(unlabeled_list, "unlabeled_list"), image_root_s, None, image_ext, mask_ext)
        check_dataset_root(image_root_s, f"Image folder of {name!r}")
        taken = {d["file_name"] for d in _custom_dicts(read_split_list(labeled_list, "labeled_list"), image_root_s, None, image_ext, mask_ext)}
        if val_list is not None:
            taken |= {d["file_name"] for d in _custom_dicts(read_split_list(val_list, "val_list"), image_root_s, None, image_ext, mask_ext)}
        files = index_files(image_root_s, image_ext)
        return [{"file_name": files[k], "image_id": k} for k in sorted(files) if files[k] not in taken]

    meta = dict(
        stuff_classes=class_names,
        stuff_colors=colors,
        ignore_label=int(ignore_label),
        evaluator_type="sem_seg",
        image_root=image_root_s,
        sem_seg_root=mask_root_s,
        dataset_root=os.path.commonpath([os.path.abspath(image_root_s), os.path.abspath(mask_root_s)]),
    )
    if descriptions_name is not None:
        meta["descriptions_name"] = descriptions_name
    parts: List[Tuple[str, Any]] = [
        (f"{name}_labeled", lambda: load_labeled(labeled_list, "labeled_list")),
        (f"{name}_unlabeled", load_unlabeled),
    ]
    if val_list is not None:
        parts.append((f"{name}_val", lambda: load_labeled(val_list, "val_list")))
    return [register_dataset(dname, fn, **meta) for dname, fn in parts]


def register_custom_semi_dataset_from_cfg(cfg) -> Optional[List[str]]:
    """:func:`register_custom_semi_dataset` from ``cfg.DATASETS.CUSTOM`` (no-op when ``NAME`` is empty)."""
    custom = cfg.DATASETS.CUSTOM
    if not custom.NAME:
        return None
    for key in ("IMAGE_ROOT", "MASK_ROOT", "CLASSES_FILE", "LABELED_LIST"):
        if not custom[key]:
            raise ValueError(f"DATASETS.CUSTOM.NAME is set, so DATASETS.CUSTOM.{key} must be given too")
    classes_file = Path(custom.CLASSES_FILE)
    if not classes_file.is_file():
        raise FileNotFoundError(f"DATASETS.CUSTOM.CLASSES_FILE {classes_file} does not exist")
    class_names = json.loads(classes_file.read_text())
    if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names):
        raise ValueError(f"{classes_file} must hold a JSON list of class names")
    return register_custom_semi_dataset(
        custom.NAME, custom.IMAGE_ROOT, custom.MASK_ROOT, class_names, custom.LABELED_LIST,
        custom.UNLABELED_LIST or None, custom.VAL_LIST or None, descriptions_name=custom.NAME)
