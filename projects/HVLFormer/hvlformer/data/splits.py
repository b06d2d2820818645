"""Labeled / unlabeled splits for semi-supervised training: split files, seeded splits, custom datasets.

**Split files** use the UniMatch / SemiVL format: one image per line, ``image_path [mask_path]``, paths
relative to the dataset root (``JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png``). Blank
lines and lines starting with ``#`` are skipped; a line may also hold a bare image id (``2007_000032``).
Decisions:

* Entries are matched to a registered full-set dataset (e.g. ``voc_train``): first by the image path
  relative to the dataset root, else by the image's file name without extension when it is unique in the
  dataset. A line whose image is not in the dataset is an error naming the file and line, as is a
  duplicate line.
* **Masks come from the registered dataset**, not from the line's second column: the prepared masks carry
  the project's label convention (VOC indices from SBD + VOC, ADE20K shifted by one, Cityscapes train
  ids), while published split files point at other mask folders (UniMatch's ``SegmentationClass/``,
  SemiVL's raw ADE ``annotations/``). The column is used only when the dataset entry has no mask. A
  line's mask column is ignored for unlabeled files.
* Labeled dicts have ``file_name``, ``sem_seg_file_name`` and ``image_id``; unlabeled dicts have no mask key.

**Seeded splits** (:func:`seeded_split`): the candidate pool is sorted, permuted by a NumPy ``Generator``
seeded with ``(seed, crc32(salt))``, and the first ``count`` images are labeled; the unlabeled set is the
rest of the full training set. For one seed the labeled sets of increasing counts are nested
(92 within 183 within ...). The built-in paper splits (:mod:`hvlformer.data.datasets.builtin`) write the result as
split files, which are read back on later runs, so a run stays reproducible even if NumPy's generator
ever changed.

Registration of split files and of custom semi-supervised datasets: :mod:`hvlformer.data.datasets.register_custom`.
"""
from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..file_io import atomic_write

__all__ = [
    "SplitEntry",
    "parse_split_lines",
    "parse_split_file",
    "read_split_list",
    "dataset_root_of",
    "relative_image_key",
    "resolve_split_entries",
    "seeded_split",
    "write_split_file",
    "load_split_files",
]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
ListSource = Union[PathLike, Sequence[str]]


@dataclass(frozen=True)
class SplitEntry:
    """One line of a split file: the image path, the optional mask path and where the line came from."""

    image: str
    mask: Optional[str]
    source: str  # "file:line" for error messages


# ----------------------------------------------------------------------------------------- parsing
def parse_split_lines(lines: Iterable[str], source: str = "<list>") -> List[SplitEntry]:
    """Parse ``image [mask]`` lines (blank lines and ``#`` comments skipped); duplicates are an error."""
    entries: List[SplitEntry] = []
    seen: Dict[str, str] = {}
    for i, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        where = f"{source}:{i}"
        if len(fields) > 2:
            raise ValueError(
                f"{where}: expected 'image_path [mask_path]' (UniMatch format), got {len(fields)} fields: {line!r}"
            )
        image = fields[0].replace("\\", "/")
        if image in seen:
            raise ValueError(f"{where}: image {image!r} is listed twice (first at {seen[image]}).")
        seen[image] = where
        entries.append(SplitEntry(image, fields[1].replace("\\", "/") if len(fields) == 2 else None, where))
    return entries


def parse_split_file(path: PathLike) -> List[SplitEntry]:
    """Parse a split file (see :func:`parse_split_lines`); a missing file is a ``FileNotFoundError``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Split file not found: {path} (absolute: {os.path.abspath(path)}).")
    with open(path, "r", encoding="utf-8") as f:
        return parse_split_lines(f, source=path)


def read_split_list(source: ListSource, what: str) -> List[SplitEntry]:
    """Entries of a split file path or of a list of ``image [mask]`` strings (``what`` names it in errors)."""
    if isinstance(source, (str, os.PathLike)):
        return parse_split_file(source)
    if isinstance(source, Sequence):
        return parse_split_lines(source, source=f"<{what}>")
    raise TypeError(f"{what}: expected a file path or a sequence of 'image [mask]' strings, got {type(source)}.")


# ----------------------------------------------------------------------------------------- matching
def dataset_root_of(metadata: Any) -> str:
    """The folder that split-file paths of a dataset are relative to: metadata ``dataset_root``, else the
    common parent of ``image_root`` and ``sem_seg_root``."""
    root = getattr(metadata, "dataset_root", None)
    if root:
        return os.fspath(root)
    image_root = getattr(metadata, "image_root", None)
    if not image_root:
        raise ValueError(f"Dataset {getattr(metadata, 'name', '?')!r} has no 'dataset_root' or 'image_root' metadata.")
    mask_root = getattr(metadata, "sem_seg_root", None)
    if mask_root:
        return os.path.commonpath([os.path.abspath(image_root), os.path.abspath(mask_root)])
    return os.fspath(image_root)


def relative_image_key(file_name: str, root: str) -> str:
    """``file_name`` relative to ``root``, normalised, with ``/`` separators."""
    return os.path.normpath(os.path.relpath(file_name, root)).replace(os.sep, "/")


def _stem(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base else base


def resolve_split_entries(
    entries: Sequence[SplitEntry],
    dataset_dicts: Sequence[Dict[str, Any]],
    dataset_root: str,
    labeled: bool,
    dataset_name: str = "the dataset",
) -> List[Dict[str, Any]]:
    """Turn split-file entries into dataset dicts of ``dataset_dicts`` (see the module docstring)."""
    by_key: Dict[str, Dict[str, Any]] = {}
    by_stem: Dict[str, Optional[Dict[str, Any]]] = {}
    for d in dataset_dicts:
        key = relative_image_key(d["file_name"], dataset_root)
        by_key[key] = d
        stem = _stem(key)
        by_stem[stem] = None if stem in by_stem else d  # None marks an ambiguous stem
    out: List[Dict[str, Any]] = []
    used: Dict[str, str] = {}
    differing_masks = 0
    for e in entries:
        d = by_key.get(os.path.normpath(e.image).replace(os.sep, "/"))
        if d is None:
            stem = _stem(e.image)
            if stem in by_stem and by_stem[stem] is None:
                raise ValueError(
                    f"{e.source}: image {e.image!r} matches several images of {dataset_name} by name; "
                    f"give its path relative to {dataset_root}."
                )
            d = by_stem.get(stem)
        if d is None:
            raise ValueError(
                f"{e.source}: image {e.image!r} is not in {dataset_name} (paths are relative to the "
                f"dataset root {dataset_root}; {len(by_key)} images in the dataset)."
            )
        if d["file_name"] in used:
            raise ValueError(f"{e.source}: image {e.image!r} is the same image as {used[d['file_name']]}.")
        used[d["file_name"]] = e.source
        rec: Dict[str, Any] = {"file_name": d["file_name"], "image_id": d.get("image_id", _stem(e.image))}
        if labeled:
            mask = d.get("sem_seg_file_name")
            line_mask = os.path.join(dataset_root, e.mask) if e.mask else None
            if mask is None:
                if line_mask is None or not os.path.isfile(line_mask):
                    raise ValueError(
                        f"{e.source}: labeled image {e.image!r} has no mask in {dataset_name}"
                        + (f" and the listed mask {line_mask} does not exist." if line_mask else
                           " and the line gives no mask path.")
                    )
                mask = line_mask
            elif line_mask is not None and os.path.abspath(line_mask) != os.path.abspath(mask):
                differing_masks += 1
            rec["sem_seg_file_name"] = mask
        out.append(rec)
    if differing_masks:
        logger.info(
            f"{differing_masks} mask paths of {entries[0].source.rsplit(':', 1)[0]} differ from the prepared masks of "
            f"{dataset_name}; the prepared masks are used (they carry the project's label convention)."
        )
    return out


# ----------------------------------------------------------------------------------------- seeded splits
def seeded_split(
    keys: Sequence[str], count: int, seed: int, salt: str, pool: Optional[Sequence[str]] = None
) -> Tuple[List[str], List[str]]:
    """``(labeled, unlabeled)`` key lists: ``count`` keys drawn from ``pool`` (default: all ``keys``), the
    rest of ``keys`` unlabeled; both sorted. Deterministic in ``(seed, salt)``; nested over ``count``."""
    all_keys = sorted(set(keys))
    candidates = sorted(set(pool)) if pool is not None else all_keys
    missing = set(candidates) - set(all_keys)
    if missing:
        raise ValueError(f"seeded_split({salt!r}): {len(missing)} pool images are not in the key set, e.g. {sorted(missing)[:3]}.")
    if not 0 < int(count) <= len(candidates):
        raise ValueError(
            f"seeded_split({salt!r}): cannot draw {count} labeled images from a pool of {len(candidates)}."
        )
    rng = np.random.default_rng([int(seed), zlib.crc32(salt.encode("utf-8"))])
    order = rng.permutation(len(candidates))
    labeled = sorted(candidates[i] for i in order[: int(count)])
    chosen = set(labeled)
    return labeled, [k for k in all_keys if k not in chosen]


def write_split_file(path: PathLike, dicts: Sequence[Dict[str, Any]], dataset_root: str) -> None:
    """Write ``image_path [mask_path]`` lines relative to ``dataset_root`` (atomically)."""
    lines = []
    for d in dicts:
        line = relative_image_key(d["file_name"], dataset_root)
        if d.get("sem_seg_file_name"):
            line += " " + relative_image_key(d["sem_seg_file_name"], dataset_root)
        lines.append(line + "\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.writelines(lines))


# ----------------------------------------------------------------------------------------- split files by name
def _dataset(name: str) -> Tuple[List[Dict[str, Any]], Any]:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        raise KeyError(
            f"Dataset {name!r} (the dataset that split-file paths are relative to) is not registered. "
            f"Built-in full sets: voc_train, coco81_train, ade20k_train, cityscapes_train."
        )
    return DatasetCatalog.get(name), MetadataCatalog.get(name)


def _warn_overlap(labeled: Sequence[Dict[str, Any]], unlabeled: Sequence[Dict[str, Any]], what: str) -> None:
    both = {d["file_name"] for d in labeled} & {d["file_name"] for d in unlabeled}
    if both:
        logger.warning(f"{what}: {len(both)} images are both labeled and unlabeled, e.g. {sorted(both)[0]}.")


def load_split_files(
    dataset: str, labeled_file: Optional[PathLike], unlabeled_file: Optional[PathLike]
) -> Tuple[Optional[List[Dict[str, Any]]], Optional[List[Dict[str, Any]]]]:
    """Read UniMatch-format split files against the registered dataset ``dataset``."""
    dicts, meta = _dataset(dataset)
    root = dataset_root_of(meta)
    lab = (resolve_split_entries(parse_split_file(labeled_file), dicts, root, True, repr(dataset))
           if labeled_file else None)
    unl = (resolve_split_entries(parse_split_file(unlabeled_file), dicts, root, False, repr(dataset))
           if unlabeled_file else None)
    if lab is not None and unl is not None:
        _warn_overlap(lab, unl, f"{labeled_file} / {unlabeled_file}")
    return lab, unl
