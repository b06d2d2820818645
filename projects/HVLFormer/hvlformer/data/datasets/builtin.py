"""The machinery of the built-in real datasets (VOC, COCO-81, ADE20K, Cityscapes): the dataset table,
loading, the paper's seeded splits and their registration. Each dataset's own definition (folders,
list files, split counts) is in its ``register_<dataset>.py``.

Layout under ``$DETECTRON2_DATASETS`` (default ``datasets``), as written by ``datasets/prepare_*.py``
(``datasets/README.md`` has the commands): one folder per dataset (see its ``register_*.py``) and

    splits/<dataset>/<count>_seed<seed>/{labeled,unlabeled}.txt  seeded paper splits (UniMatch format)

Registered names (lazily: importing the package reads nothing; a missing root is a ``FileNotFoundError``
naming it at ``DatasetCatalog.get`` time):

* full sets ``{voc,coco81,ade20k,cityscapes}_{train,val}`` (``voc_train`` is train_aug);
* paper splits ``{dataset}_{count}_seed{seed}_{labeled,unlabeled}`` for the counts of
  :data:`PAPER_SPLIT_COUNTS` and seeds 0, 1, 2. Labeled images are drawn by
  :func:`hvlformer.data.splits.seeded_split` (VOC: from the 1,464 fine ``train`` images), the unlabeled
  set is the rest of the full training set. The split files under ``splits/`` are read when present,
  otherwise generated and written there (``tools/make_splits.py`` writes them ahead of time).

Metadata: ``stuff_classes``, ``stuff_colors`` (from ``classes/<dataset>.json``), ``ignore_label=255``,
``evaluator_type="sem_seg"``, ``image_root``, ``sem_seg_root``, ``dataset_root`` (what split-file paths are
relative to), ``descriptions_name`` (``datasets/descriptions/<name>.json``) and ``benchmark_protocol``.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..catalog import register_dataset
from ..folder import load_sem_seg_folder
from ..splits import parse_split_file, relative_image_key, resolve_split_entries, seeded_split, write_split_file
from ..validation import check_dataset_root

__all__ = [
    "BUILTIN_DATASETS",
    "PAPER_SPLIT_COUNTS",
    "PAPER_SPLIT_SEEDS",
    "CLASSES_DIR",
    "BuiltinDataset",
    "DatasetPart",
    "define_builtin_dataset",
    "datasets_root",
    "builtin_dataset_root",
    "load_builtin_classes",
    "builtin_class_names",
    "builtin_class_colors",
    "load_builtin_dataset",
    "paper_split_name",
    "paper_split_dir",
    "make_paper_split",
    "load_paper_split",
    "write_paper_splits",
    "register_builtin_dataset",
    "register_builtin_datasets",
]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

CLASSES_DIR = Path(__file__).resolve().parent.parent / "classes"
README_HINT = "datasets/README.md"
PAPER_SPLIT_SEEDS: Tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class DatasetPart:
    """One split (train / val) of a built-in dataset, relative to the dataset's folder."""

    image_dir: str
    mask_dir: str
    image_ext: str
    mask_ext: str
    list_file: Optional[str] = None  # ids, one per line (VOC); otherwise the folders are listed


@dataclass(frozen=True)
class BuiltinDataset:
    """A built-in dataset: its folder under ``$DETECTRON2_DATASETS``, its two parts and its paper splits."""

    name: str
    title: str
    root: str  # relative to $DETECTRON2_DATASETS
    prepare: str  # the command that prepares it
    train: DatasetPart
    val: DatasetPart
    split_counts: Tuple[int, ...]  # labeled-image counts of the paper's splits
    pool_list: Optional[str] = None  # labeled images of the paper splits are drawn from this id list


#: The built-in datasets by name, in registration order; filled by the ``register_<dataset>.py`` modules.
BUILTIN_DATASETS: Dict[str, BuiltinDataset] = {}
#: Labeled-image counts of the paper's splits per dataset (the ``split_counts`` of :data:`BUILTIN_DATASETS`).
PAPER_SPLIT_COUNTS: Dict[str, Tuple[int, ...]] = {}


def define_builtin_dataset(spec: BuiltinDataset) -> BuiltinDataset:
    """Add ``spec`` to :data:`BUILTIN_DATASETS` / :data:`PAPER_SPLIT_COUNTS` (nothing is registered yet)."""
    BUILTIN_DATASETS[spec.name] = spec
    PAPER_SPLIT_COUNTS[spec.name] = tuple(spec.split_counts)
    return spec


# ----------------------------------------------------------------------------------------- classes
def datasets_root() -> str:
    """``$DETECTRON2_DATASETS``, default ``datasets``."""
    return os.environ.get("DETECTRON2_DATASETS", "datasets")


def builtin_dataset_root(dataset: str, root: Optional[PathLike] = None) -> str:
    """The folder of ``dataset`` (``voc`` ...) under ``root`` (default :func:`datasets_root`)."""
    return os.path.join(os.fspath(root) if root is not None else datasets_root(), _spec(dataset).root)


def _spec(dataset: str) -> BuiltinDataset:
    if dataset not in BUILTIN_DATASETS:
        raise KeyError(f"Unknown built-in dataset {dataset!r}; choose from {sorted(BUILTIN_DATASETS)}.")
    return BUILTIN_DATASETS[dataset]


@functools.lru_cache(maxsize=None)
def load_builtin_classes(dataset: str) -> Dict[str, Any]:
    """The parsed ``classes/<dataset>.json`` (``classes``, ``colors`` and dataset-specific tables)."""
    path = CLASSES_DIR / f"{dataset}.json"
    with open(path, "r", encoding="utf-8") as f:
        spec = json.load(f)
    if len(spec["classes"]) != len(spec["colors"]) or len(set(spec["classes"])) != len(spec["classes"]):
        raise ValueError(f"{path}: class names must be unique and have one colour each.")
    return spec


def builtin_class_names(dataset: str) -> List[str]:
    return list(load_builtin_classes(dataset)["classes"])


def builtin_class_colors(dataset: str) -> List[List[int]]:
    return [list(c) for c in load_builtin_classes(dataset)["colors"]]


# ----------------------------------------------------------------------------------------- loading
def _check_root(spec: BuiltinDataset, path: str, what: str) -> str:
    try:
        return check_dataset_root(path, what)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e} {spec.title} is prepared by `{spec.prepare}`; see {README_HINT} for the downloads and the layout."
        ) from None


def _read_id_list(path: str, spec: BuiltinDataset) -> List[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{spec.title}: image list {path} not found. Run `{spec.prepare}` (see {README_HINT})."
        )
    with open(path, "r", encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def load_builtin_dataset(dataset: str, split: str, root: Optional[PathLike] = None) -> List[Dict[str, Any]]:
    """Dataset dicts of ``dataset`` (``voc`` ...) ``split`` (``train`` / ``val``) under ``root``."""
    spec = _spec(dataset)
    part: DatasetPart = getattr(spec, split)
    droot = _check_root(spec, builtin_dataset_root(dataset, root), f"{spec.title} root")
    image_dir = _check_root(spec, os.path.join(droot, part.image_dir), f"{spec.title} image folder")
    mask_dir = _check_root(spec, os.path.join(droot, part.mask_dir), f"{spec.title} mask folder")
    if part.list_file is None:
        return load_sem_seg_folder(image_dir, mask_dir, image_ext=part.image_ext, label_ext=part.mask_ext)
    dicts, missing = [], []
    for i in _read_id_list(os.path.join(droot, part.list_file), spec):
        d = {
            "file_name": os.path.join(image_dir, i + part.image_ext),
            "sem_seg_file_name": os.path.join(mask_dir, i + part.mask_ext),
            "image_id": i,
        }
        missing += [p for p in (d["file_name"], d["sem_seg_file_name"]) if not os.path.isfile(p)]
        dicts.append(d)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"{spec.title}: {len(missing)} files listed in {part.list_file} are missing: {shown}. "
            f"Re-run `{spec.prepare}` (see {README_HINT})."
        )
    return dicts


# ----------------------------------------------------------------------------------------- paper splits
def paper_split_name(dataset: str, count: int, seed: int, part: str) -> str:
    """``{dataset}_{count}_seed{seed}_{part}``, e.g. ``voc_92_seed0_labeled``."""
    return f"{dataset}_{int(count)}_seed{int(seed)}_{part}"


def paper_split_dir(dataset: str, count: int, seed: int, root: Optional[PathLike] = None) -> str:
    """``<root>/splits/<dataset>/<count>_seed<seed>``."""
    base = os.fspath(root) if root is not None else datasets_root()
    return os.path.join(base, "splits", dataset, f"{int(count)}_seed{int(seed)}")


def _split_files(out_dir: str) -> Tuple[str, str]:
    return os.path.join(out_dir, "labeled.txt"), os.path.join(out_dir, "unlabeled.txt")


def _write_split_pair(files: Tuple[str, str], labeled: List[Dict[str, Any]], unlabeled: List[Dict[str, Any]],
                      full: List[Dict[str, Any]], droot: str) -> None:
    """Both files in the UniMatch format: the unlabeled lines also name the masks (readers ignore them)."""
    by_file = {d["file_name"]: d for d in full}
    write_split_file(files[0], labeled, droot)
    write_split_file(files[1], [by_file[d["file_name"]] for d in unlabeled], droot)


def make_paper_split(
    dataset: str, count: int, seed: int, root: Optional[PathLike] = None,
    full: Optional[List[Dict[str, Any]]] = None,
) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Generate the seeded split (no files read or written): ``(labeled dicts, unlabeled dicts)``."""
    spec = _spec(dataset)
    droot = builtin_dataset_root(dataset, root)
    full = full if full is not None else load_builtin_dataset(dataset, "train", root)
    by_key = {relative_image_key(d["file_name"], droot): d for d in full}
    pool = None
    if spec.pool_list is not None:
        ids = set(_read_id_list(os.path.join(droot, spec.pool_list), spec))
        pool = [k for k, d in by_key.items() if d["image_id"] in ids]
        if len(pool) != len(ids):
            raise ValueError(
                f"{spec.title}: {len(ids) - len(pool)} images of {spec.pool_list} are not in the training set "
                f"{spec.train.list_file}; re-run `{spec.prepare}`."
            )
    lab_keys, unl_keys = seeded_split(list(by_key), count, seed, salt=dataset, pool=pool)
    labeled = [dict(by_key[k]) for k in lab_keys]
    unlabeled = [{"file_name": by_key[k]["file_name"], "image_id": by_key[k]["image_id"]} for k in unl_keys]
    return labeled, unlabeled


def load_paper_split(
    dataset: str, count: int, seed: int, part: str, root: Optional[PathLike] = None
) -> List[Dict[str, Any]]:
    """The ``part`` (``labeled`` / ``unlabeled``) of a paper split: read from its split files when they
    exist, else generated by :func:`make_paper_split` and written there."""
    if part not in ("labeled", "unlabeled"):
        raise ValueError(f"part must be 'labeled' or 'unlabeled', got {part!r}.")
    spec = _spec(dataset)
    droot = builtin_dataset_root(dataset, root)
    full = load_builtin_dataset(dataset, "train", root)
    files = _split_files(paper_split_dir(dataset, count, seed, root))
    what = f"'{dataset}_train'"
    if all(os.path.isfile(f) for f in files):
        path = files[0] if part == "labeled" else files[1]
        return resolve_split_entries(parse_split_file(path), full, droot, part == "labeled", what)
    labeled, unlabeled = make_paper_split(dataset, count, seed, root, full=full)
    try:
        _write_split_pair(files, labeled, unlabeled, full, droot)
    except OSError as e:
        logger.warning(
            f"{spec.title}: could not write the split files {files[0]} / {files[1]} ({e}); the split is "
            f"regenerated identically on every run. tools/make_splits.py --out DIR writes them elsewhere."
        )
    return labeled if part == "labeled" else unlabeled


def write_paper_splits(
    dataset: str,
    counts: Optional[Sequence[int]] = None,
    seeds: Sequence[int] = PAPER_SPLIT_SEEDS,
    root: Optional[PathLike] = None,
    out: Optional[PathLike] = None,
    force: bool = False,
) -> List[Tuple[str, int, int, str]]:
    """Write the split files of ``dataset`` for ``counts`` x ``seeds`` to ``<out>/<dataset>/<count>_seed<seed>``
    (``out`` default ``<root>/splits``). Existing files are kept unless ``force``.
    Returns ``(directory, #labeled, #unlabeled, "written" | "kept")`` per split."""
    counts = tuple(counts) if counts else _spec(dataset).split_counts
    droot = builtin_dataset_root(dataset, root)
    full = load_builtin_dataset(dataset, "train", root)
    report = []
    for count in counts:
        for seed in seeds:
            d = (os.path.join(os.fspath(out), dataset, f"{int(count)}_seed{int(seed)}") if out is not None
                 else paper_split_dir(dataset, count, seed, root))
            files = _split_files(d)
            if not force and all(os.path.isfile(f) for f in files):
                n = [len(parse_split_file(f)) for f in files]
                report.append((d, n[0], n[1], "kept"))
                continue
            labeled, unlabeled = make_paper_split(dataset, count, seed, root, full=full)
            _write_split_pair(files, labeled, unlabeled, full, droot)
            report.append((d, len(labeled), len(unlabeled), "written"))
    return report


# ----------------------------------------------------------------------------------------- registration
def register_builtin_dataset(
    dataset: str,
    root: Optional[PathLike] = None,
    split_counts: Optional[Sequence[int]] = None,
    seeds: Sequence[int] = PAPER_SPLIT_SEEDS,
) -> List[str]:
    """Register ``{dataset}_{train,val}`` and the paper splits of ``dataset`` under ``root`` (default
    ``$DETECTRON2_DATASETS``, resolved now); ``split_counts`` replaces the paper counts. Nothing is read
    until ``DatasetCatalog.get``. Returns the names."""
    root_s = os.fspath(root) if root is not None else datasets_root()
    spec = _spec(dataset)
    droot = builtin_dataset_root(dataset, root_s)
    base_meta = dict(
        stuff_classes=builtin_class_names(dataset),
        stuff_colors=builtin_class_colors(dataset),
        ignore_label=255,
        evaluator_type="sem_seg",
        dataset_root=droot,
        descriptions_name=dataset,
        benchmark_protocol=True,  # evaluated at INPUT.MIN_SIZE_TEST / sliding window, as in the paper
    )
    names: List[str] = []
    for split in ("train", "val"):
        part: DatasetPart = getattr(spec, split)
        names.append(register_dataset(
            f"{dataset}_{split}", functools.partial(load_builtin_dataset, dataset, split, root_s),
            image_root=os.path.join(droot, part.image_dir), sem_seg_root=os.path.join(droot, part.mask_dir),
            **base_meta,
        ))
    for count in (split_counts if split_counts is not None else spec.split_counts):
        for seed in seeds:
            for part_name in ("labeled", "unlabeled"):
                names.append(register_dataset(
                    paper_split_name(dataset, count, seed, part_name),
                    functools.partial(load_paper_split, dataset, int(count), int(seed), part_name, root_s),
                    image_root=os.path.join(droot, spec.train.image_dir),
                    sem_seg_root=os.path.join(droot, spec.train.mask_dir),
                    split_file=os.path.join(paper_split_dir(dataset, count, seed, root_s), f"{part_name}.txt"),
                    full_dataset=f"{dataset}_train",
                    split_part=part_name,
                    **base_meta,
                ))
    return names


def register_builtin_datasets(
    root: Optional[PathLike] = None,
    datasets: Optional[Sequence[str]] = None,
    split_counts: Optional[Dict[str, Sequence[int]]] = None,
    seeds: Sequence[int] = PAPER_SPLIT_SEEDS,
) -> List[str]:
    """:func:`register_builtin_dataset` for ``datasets`` (default: all of :data:`BUILTIN_DATASETS`) under
    ``root``; ``split_counts`` replaces the paper counts of some datasets (e.g. ``{"voc": [20]}``).
    Returns the names."""
    names: List[str] = []
    for dataset in datasets or list(BUILTIN_DATASETS):
        names += register_builtin_dataset(dataset, root, (split_counts or {}).get(dataset), seeds)
    return names
