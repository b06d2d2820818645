"""The built-in real datasets: Pascal VOC 2012 (+ SBD), COCO 2017 (81 classes), ADE20K, Cityscapes.

Layout under ``$DETECTRON2_DATASETS`` (default ``datasets``), as written by ``datasets/prepare_*.py``
(``datasets/README.md`` has the commands)::

    VOC2012/JPEGImages/<id>.jpg                                  (link to the VOC archive's folder)
    VOC2012/SegmentationClassAug/<id>.png                        index PNGs, train_aug + val
    VOC2012/ImageSets/Segmentation/{train_aug,train,val}.txt     10,582 / 1,464 / 1,449 ids
    coco/images/{train2017,val2017}/<id>.jpg                     (links)
    coco/annotations_semseg81/{train2017,val2017}/<id>.png       0 background, 1..80 things, 255 crowd
    ADEChallengeData2016/images/{training,validation}/*.jpg      (link)
    ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png   0..149, 255 ignore
    cityscapes/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png  (link)
    cityscapes/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png           0..18, 255 ignore
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
relative to) and ``descriptions_name`` (``datasets/descriptions/<name>.json``).

The second half of this module holds the helpers of the prepare scripts: source discovery with clear
errors, archive extraction, linking image folders, atomic index-PNG writing and a progress bar.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .folder import load_sem_seg_folder
from .splits import (
    parse_split_file,
    relative_image_key,
    resolve_split_entries,
    seeded_split,
    write_split_file,
)
from .validation import check_dataset_root, check_image_label_sizes

__all__ = [
    "BUILTIN_DATASETS",
    "PAPER_SPLIT_COUNTS",
    "PAPER_SPLIT_SEEDS",
    "CLASSES_DIR",
    "datasets_root",
    "builtin_dataset_root",
    "load_builtin_classes",
    "builtin_class_names",
    "builtin_class_colors",
    "cityscapes_id_to_train_id_lut",
    "load_builtin_dataset",
    "paper_split_name",
    "paper_split_dir",
    "make_paper_split",
    "load_paper_split",
    "write_paper_splits",
    "register_builtin_datasets",
]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

CLASSES_DIR = Path(__file__).resolve().parent / "classes"
README_HINT = "datasets/README.md"

#: Labeled-image counts of the paper's splits (VOC from the 1,464 fine images; COCO 1/512..1/32 of
#: 118,287; ADE20K 1/128..1/8 of 20,210; Cityscapes 1/30..1/2 of 2,975).
PAPER_SPLIT_COUNTS: Dict[str, Tuple[int, ...]] = {
    "voc": (92, 183, 366, 732, 1464),
    "coco81": (232, 463, 925, 1849, 3697),
    "ade20k": (158, 316, 632, 1263, 2526),
    "cityscapes": (100, 186, 372, 744, 1488),
}
PAPER_SPLIT_SEEDS: Tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class _Part:
    image_dir: str
    mask_dir: str
    image_ext: str
    mask_ext: str
    list_file: Optional[str] = None  # ids, one per line (VOC); otherwise the folders are listed


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    title: str
    root: str  # relative to $DETECTRON2_DATASETS
    prepare: str  # the command that prepares it
    train: _Part
    val: _Part
    pool_list: Optional[str] = None  # labeled images of the paper splits are drawn from this id list


BUILTIN_DATASETS: Dict[str, BuiltinDataset] = {
    "voc": BuiltinDataset(
        "voc", "Pascal VOC 2012 + SBD", "VOC2012", "python datasets/prepare_voc.py --src DOWNLOADS",
        _Part("JPEGImages", "SegmentationClassAug", ".jpg", ".png", "ImageSets/Segmentation/train_aug.txt"),
        _Part("JPEGImages", "SegmentationClassAug", ".jpg", ".png", "ImageSets/Segmentation/val.txt"),
        pool_list="ImageSets/Segmentation/train.txt",
    ),
    "coco81": BuiltinDataset(
        "coco81", "COCO 2017 (81 classes)", "coco", "python datasets/prepare_coco.py --src DOWNLOADS",
        _Part("images/train2017", "annotations_semseg81/train2017", ".jpg", ".png"),
        _Part("images/val2017", "annotations_semseg81/val2017", ".jpg", ".png"),
    ),
    "ade20k": BuiltinDataset(
        "ade20k", "ADE20K SceneParsing", "ADEChallengeData2016", "python datasets/prepare_ade20k.py --src DOWNLOADS",
        _Part("images/training", "annotations_detectron2/training", ".jpg", ".png"),
        _Part("images/validation", "annotations_detectron2/validation", ".jpg", ".png"),
    ),
    "cityscapes": BuiltinDataset(
        "cityscapes", "Cityscapes (gtFine)", "cityscapes", "python datasets/prepare_cityscapes.py --src DOWNLOADS",
        _Part("leftImg8bit/train", "gtFine/train", "_leftImg8bit.png", "_gtFine_labelTrainIds.png"),
        _Part("leftImg8bit/val", "gtFine/val", "_leftImg8bit.png", "_gtFine_labelTrainIds.png"),
    ),
}


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


def cityscapes_id_to_train_id_lut() -> np.ndarray:
    """A 256-entry int16 table: Cityscapes label id -> train id (255 ignore), -1 for ids that do not exist.

    Id -1 (license plate) is stored as 255 (its uint8 form)."""
    lut = np.full(256, -1, dtype=np.int16)
    for row in load_builtin_classes("cityscapes")["label_ids"]:
        lut[row["id"] % 256] = row["train_id"]
    return lut


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
    part: _Part = getattr(spec, split)
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
    counts = tuple(counts) if counts else PAPER_SPLIT_COUNTS[dataset]
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
def _register(name: str, loader: Callable[[], List[Dict[str, Any]]], **meta: Any) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**meta)


def register_builtin_datasets(
    root: Optional[PathLike] = None,
    datasets: Optional[Sequence[str]] = None,
    split_counts: Optional[Dict[str, Sequence[int]]] = None,
    seeds: Sequence[int] = PAPER_SPLIT_SEEDS,
) -> List[str]:
    """Register the full sets and paper splits (see the module docstring) under ``root`` (default
    ``$DETECTRON2_DATASETS``, resolved now). Nothing is read until ``DatasetCatalog.get``.

    ``split_counts`` replaces the paper counts of some datasets (e.g. ``{"voc": [20]}``). Returns the names.
    """
    root_s = os.fspath(root) if root is not None else datasets_root()
    names: List[str] = []
    for dataset in datasets or BUILTIN_DATASETS:
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
        for split in ("train", "val"):
            part: _Part = getattr(spec, split)
            name = f"{dataset}_{split}"
            _register(
                name, functools.partial(load_builtin_dataset, dataset, split, root_s),
                image_root=os.path.join(droot, part.image_dir), sem_seg_root=os.path.join(droot, part.mask_dir),
                **base_meta,
            )
            names.append(name)
        counts = (split_counts or {}).get(dataset, PAPER_SPLIT_COUNTS[dataset])
        for count in counts:
            for seed in seeds:
                for part_name in ("labeled", "unlabeled"):
                    name = paper_split_name(dataset, count, seed, part_name)
                    _register(
                        name, functools.partial(load_paper_split, dataset, int(count), int(seed), part_name, root_s),
                        image_root=os.path.join(droot, spec.train.image_dir),
                        sem_seg_root=os.path.join(droot, spec.train.mask_dir),
                        split_file=os.path.join(paper_split_dir(dataset, count, seed, root_s), f"{part_name}.txt"),
                        full_dataset=f"{dataset}_train",
                        split_part=part_name,
                        **base_meta,
                    )
                    names.append(name)
    return names


# ========================================================================================= prepare helpers
def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, unit: str = "img"):
    """A tqdm progress bar (stderr)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, mininterval=0.5)


_JOB_FN: Optional[Callable[[Any], Any]] = None  # inherited by forked workers (no pickling of ``fn``)


def _call_job(job: Any) -> Any:
    return _JOB_FN(job)


def run_jobs(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int, desc: str) -> List[Any]:
    """``[fn(j) for j in jobs]`` with a progress bar, in ``workers`` forked processes when > 1 (where the
    platform can fork; otherwise in this process). Jobs must be picklable, ``fn`` need not be.
    Exceptions in a job propagate (naming the file)."""
    global _JOB_FN
    jobs = list(jobs)
    if workers <= 1 or len(jobs) < 2 or "fork" not in _mp_methods():
        return [fn(j) for j in progress(jobs, desc, total=len(jobs))]
    import multiprocessing as mp

    _JOB_FN = fn
    try:
        with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            chunk = max(1, min(64, len(jobs) // (8 * workers)))
            return list(progress(pool.imap(_call_job, jobs, chunksize=chunk), desc, total=len(jobs)))
    finally:
        _JOB_FN = None


def convert_splits(convert_one: Callable[[Any], str], plans: Dict[str, List[Any]], workers: int, dataset: str,
                   expected: Dict[str, int]) -> None:
    """Run every split's mask conversions (``convert_one`` returns "written" or "kept") and print a
    summary per split, noting counts that differ from the official archive's."""
    for split, jobs in plans.items():
        results = run_jobs(convert_one, jobs, workers, f"{dataset} {split}")
        note = "" if len(jobs) == expected[split] else f"  (the official archive has {expected[split]:,})"
        print(f"{split}: {len(jobs):,} images, {results.count('written'):,} masks written, "
              f"{results.count('kept'):,} already there{note}")


def folder_split_jobs(images: PathLike, labels: PathLike, image_ext: str, label_ext: str, out_dir: PathLike,
                      out_suffix: str, overwrite: bool) -> List[Tuple[str, str, str, bool]]:
    """The conversion jobs ``(image, source mask, output mask, overwrite)`` of one split stored as an
    image folder plus a mask folder (paired by file stem, see ``load_sem_seg_folder``); each output is
    ``out_dir/<image_id><out_suffix>``. The job tuple is what the prepare scripts' ``convert_one`` takes."""
    pairs = load_sem_seg_folder(images, labels, image_ext=image_ext, label_ext=label_ext)
    return [(d["file_name"], d["sem_seg_file_name"], str(Path(out_dir) / (d["image_id"] + out_suffix)), overwrite)
            for d in pairs]


def _mp_methods() -> List[str]:
    import multiprocessing as mp

    return mp.get_all_start_methods()


def missing_source_error(what: str, looked_for: Sequence[PathLike], hint: str = "") -> FileNotFoundError:
    paths = "; ".join(str(p) for p in looked_for)
    return FileNotFoundError(
        f"{what} not found. Looked for: {paths}.{(' ' + hint) if hint else ''} See {README_HINT} for the "
        f"official downloads and where to put them."
    )


def require_dir(path: PathLike, what: str) -> Path:
    """``path`` as a ``Path`` if it is a folder, else ``FileNotFoundError`` naming it."""
    p = Path(path)
    if not p.is_dir():
        raise missing_source_error(f"{what} folder", [p])
    return p


def require_file(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise missing_source_error(f"{what} file", [p])
    return p


def _marker(archive: Path) -> Path:
    """Exists while an extraction of ``archive`` is in progress (or was interrupted)."""
    return archive.parent / f".{archive.name}.extracting"


def extract_archive(archive: PathLike, dest: PathLike) -> Path:
    """Extract a ``.tar[.gz|.tgz]`` or ``.zip`` archive into ``dest`` with a progress bar. A marker file
    next to the archive exists during the extraction, so an interrupted one is detected. Returns ``dest``."""
    archive, dest = Path(archive), Path(dest)
    marker = _marker(archive)
    dest.mkdir(parents=True, exist_ok=True)
    marker.write_text("extraction started; remove the extracted files and this marker if it was interrupted\n",
                      encoding="utf-8")
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for member in progress(zf.infolist(), f"extract {archive.name}", unit="file"):
                    zf.extract(member, dest)
        elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                for member in progress(members, f"extract {archive.name}", unit="file"):
                    tf.extract(member, dest, **kwargs)
        else:
            raise ValueError(f"Unsupported archive type: {archive} (expected .zip, .tar, .tar.gz or .tgz).")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"Archive {archive} is corrupt or incomplete ({type(e).__name__}: {e}); download it again.") from e
    marker.unlink()
    return dest


def locate_source(
    src: PathLike,
    candidates: Sequence[str],
    required: Sequence[str],
    archives: Sequence[str],
    what: str,
) -> Path:
    """Find an extracted official folder inside ``src`` (or extract its archive there).

    ``candidates``: folders relative to ``src`` to try (``""`` = ``src`` itself); a candidate qualifies when
    all ``required`` entries (relative to it) exist. Otherwise the first of ``archives`` present in ``src``
    is extracted into ``src`` and the candidates are tried again; an extraction that was interrupted is
    redone. Raises ``FileNotFoundError`` listing what was looked for.
    """
    src = Path(src)
    if not src.is_dir():
        raise missing_source_error(f"Source folder for {what}", [src])

    def find() -> Optional[Path]:
        for c in candidates:
            d = src / c if c else src
            if all((d / r).exists() for r in required):
                return d
        return None

    archive = next((src / a for a in archives if (src / a).is_file()), None)
    found = find()
    if found is not None and (archive is None or not _marker(archive).is_file()):
        return found
    if archive is not None:
        extract_archive(archive, src)
        found = find()
        if found is not None:
            return found
        raise missing_source_error(
            what, [src / c / r for c in candidates for r in required],
            f"The archive {archive} was extracted but does not have the expected layout.",
        )
    for c in candidates:  # a folder with part of the layout: name exactly what is missing
        d = src / c if c else src
        present = [r for r in required if (d / r).exists()]
        if d.is_dir() and present:
            raise missing_source_error(
                f"{what}: part of the official layout", [d / r for r in required if r not in present],
                f"{d} has {', '.join(present)} but not the rest.",
            )
    raise missing_source_error(
        what, [(src / c if c else src) for c in candidates] + [src / a for a in archives],
        f"Expected a folder containing {', '.join(required)} or one of the archives {', '.join(archives)}.",
    )


def link_dir(src: PathLike, dst: PathLike, copy: bool = False) -> str:
    """Make ``dst`` show the folder ``src``: nothing when ``dst`` already exists (or is ``src``), else a
    symbolic link (``copy=True`` or no symlink support: a copy). Returns what was done."""
    src, dst = Path(src).resolve(), Path(dst)
    if dst.exists() or dst.is_symlink():
        if dst.is_symlink() and not dst.exists():
            raise FileNotFoundError(f"{dst} is a broken symbolic link (to {os.readlink(dst)}); remove it and re-run.")
        return "kept"
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not copy:
        try:
            os.symlink(src, dst, target_is_directory=True)
            return "linked"
        except OSError as e:  # e.g. no symlink permission
            logger.warning(f"Could not link {dst} -> {src} ({e}); copying instead.")
    tmp = dst.with_name(dst.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)
    return "copied"


def write_label_png(path: PathLike, label: np.ndarray) -> None:
    """Write a single-channel uint8 index PNG atomically (parent folders created)."""
    from PIL import Image

    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"write_label_png({path}): expected an H x W uint8 array, got {label.shape} {label.dtype}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        Image.fromarray(label).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def image_size(path: PathLike) -> Tuple[int, int]:
    """``(height, width)`` of an image from its header (not decoded); errors name the file."""
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"Image file {path} is corrupt or unreadable: {type(e).__name__}: {e}") from e
    return h, w


def check_label_matches_image(label: np.ndarray, image_path: PathLike, label_path: PathLike) -> None:
    """``ValueError`` naming both files when the label's size differs from the image's (header only)."""
    h, w = image_size(image_path)
    check_image_label_sizes(np.broadcast_to(np.uint8(0), (h, w)), label, image_path, label_path)
