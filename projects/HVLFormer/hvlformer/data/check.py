"""Check every listed image and mask before training starts, instead of hours into the run.

Training reads a file for the first time when the sampler reaches it, so a corrupt image or a mask with a
wrong class value used to stop a long run half-way. :func:`check_datasets_from_cfg` (called by the trainers
and ``train_net.py --eval-only`` before the model is built, and by ``tools/check_dataset.py``) does, in
this order:

1. **existence** (cheap, always): ``DatasetCatalog.get`` of every dataset the run uses, so a missing or
   unprepared dataset is reported before the model (and a CLIP download) is built;
2. **contents** (``DATASETS.CHECK.ENABLED``): every image and mask is read once with the training
   readers (:func:`~hvlformer.data.validation.read_image_checked`,
   :func:`~hvlformer.data.validation.read_label_checked`), in parallel, with a progress bar: decode
   errors, unsupported modes, image/mask size mismatches and (``INPUT.VALIDATE_LABELS``) label values
   outside ``[0, K)`` other than the ignore label. All problems are collected, logged and raised together
   as one :class:`DatasetCheckError`.

Files that passed are cached by path, size and modification time (``DATASETS.CHECK.CACHE_DIR``), so a
second run with the same files checks nothing again and a changed file is checked again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .validation import check_image_label_sizes, read_image_checked, read_label_checked

__all__ = ["DatasetCheckError", "CheckReport", "check_dataset_dicts", "check_datasets_from_cfg",
           "datasets_of_cfg", "default_cache_dir"]

logger = logging.getLogger("hvlformer")
CACHE_VERSION = 1
#: Below this many entries the check runs in the calling process (starting workers costs more).
MIN_PARALLEL = 256

# (image path, mask path or None, num_classes or None (no value check), ignore label)
Job = Tuple[str, Optional[str], Optional[int], int]


class DatasetCheckError(ValueError):
    """Some listed images or masks cannot be used; the message lists them."""


@dataclass
class CheckReport:
    """Result of :func:`check_dataset_dicts`: entries checked now, taken from the cache, and the problems
    as ``(file, reason)``."""

    total: int = 0
    checked: int = 0
    cached: int = 0
    problems: List[Tuple[str, str]] = field(default_factory=list)


def default_cache_dir() -> str:
    """``$HVLFORMER_CACHE_DIR``, else ``$XDG_CACHE_HOME/hvlformer`` (``~/.cache/hvlformer``)."""
    if os.environ.get("HVLFORMER_CACHE_DIR"):
        return os.environ["HVLFORMER_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hvlformer")


def _check_one(job: Job) -> Optional[str]:
    """``None`` when the pair is usable, else the reason (the readers' messages name the files)."""
    image_path, label_path, num_classes, ignore = job
    try:
        image = read_image_checked(image_path)
        if label_path is not None:
            label = read_label_checked(label_path, num_classes, ignore)
            check_image_label_sizes(image, label, image_path, label_path)
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _check_chunk(jobs: Sequence[Job]) -> List[Optional[str]]:
    return [_check_one(job) for job in jobs]


def _signature(job: Job) -> Optional[str]:
    """``path:size:mtime`` of the files of ``job`` (``None`` when one is missing: always checked)."""
    parts = [str(job[2]), str(job[3])]
    for path in job[:2]:
        if path is None:
            continue
        try:
            stat = os.stat(path)
        except OSError:
            return None
        parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def _cache_file(cache_dir: str, jobs: Sequence[Job]) -> str:
    digest = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for job in sorted(jobs, key=lambda j: (j[0], j[1] or "")):
        digest.update(f"{job[0]}\0{job[1]}\0{job[2]}\0{job[3]}\n".encode())
    return os.path.join(cache_dir, f"dataset_check_{digest.hexdigest()[:20]}.json")


def _read_cache(path: str) -> set:
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
        return set(data.get("passed", [])) if data.get("version") == CACHE_VERSION else set()
    except (OSError, ValueError):
        return set()


def _write_cache(path: str, passed: Iterable[str]) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "passed": sorted(passed)}, f)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop training
        logger.warning("dataset check: could not write the cache %s (%s); the next run checks again", path, e)


def _run_jobs(jobs: List[Job], workers: int, progress: bool, desc: str) -> List[Optional[str]]:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), disable=not progress, desc=desc, unit="file", file=sys.stderr,
               mininterval=1.0)
    try:
        if workers <= 1 or len(jobs) < MIN_PARALLEL:
            results = []
            for job in jobs:
                results.append(_check_one(job))
                bar.update(1)
            return results
        chunk = max(16, min(256, len(jobs) // (workers * 8) or 16))
        chunks = [jobs[i: i + chunk] for i in range(0, len(jobs), chunk)]
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        results = []
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for part in pool.map(_check_chunk, chunks):
                results.extend(part)
                bar.update(len(part))
        return results
    finally:
        bar.close()


def check_dataset_dicts(dicts: Sequence[Dict[str, Any]], num_classes: Optional[int], ignore_label: int, *,
                        workers: int = 0, progress: bool = True, cache_dir: Optional[str] = "",
                        desc: str = "checking dataset") -> CheckReport:
    """Read every ``file_name`` (and ``sem_seg_file_name``) of ``dicts`` once.

    Args:
        dicts: detectron2 dataset dicts.
        num_classes: label values must be in ``[0, num_classes)`` or ``ignore_label``; ``None`` = no value check.
        workers: processes; 0 = all CPU cores.
        cache_dir: where passing files are remembered ("" = :func:`default_cache_dir`; ``None`` = no cache).
    Returns:
        a :class:`CheckReport` (problems are returned, not raised).
    """
    jobs: List[Job] = [(d["file_name"], d.get("sem_seg_file_name"), num_classes, int(ignore_label)) for d in dicts]
    report = CheckReport(total=len(jobs))
    cache_path = _cache_file(cache_dir or default_cache_dir(), jobs) if cache_dir is not None else None
    passed = _read_cache(cache_path) if cache_path else set()
    signatures = [_signature(job) for job in jobs]
    todo = [i for i, s in enumerate(signatures) if s is None or s not in passed]
    report.cached = len(jobs) - len(todo)
    report.checked = len(todo)
    if todo:
        workers = workers if workers > 0 else (os.cpu_count() or 1)
        results = _run_jobs([jobs[i] for i in todo], workers, progress, desc)
        for i, reason in zip(todo, results):
            if reason is None:
                if signatures[i] is not None:
                    passed.add(signatures[i])
            else:
                report.problems.append((jobs[i][1] if jobs[i][1] and jobs[i][1] in reason else jobs[i][0], reason))
        if cache_path:
            current = {s for s in signatures if s is not None}
            _write_cache(cache_path, passed & current)
    return report


def datasets_of_cfg(cfg, training: bool = True) -> List[str]:
    """Datasets a run reads: the training sets (``DATASETS.TRAIN``, or ``TRAIN_LABELED`` + ``TRAIN_UNLABELED``
    for semi-supervised runs) when ``training``, and the evaluated ``DATASETS.TEST``."""
    names: List[str] = []
    if training:
        names += list(cfg.DATASETS.TRAIN_LABELED) + list(cfg.DATASETS.TRAIN_UNLABELED) if cfg.DATASETS.TRAIN_UNLABELED \
            else list(cfg.DATASETS.TRAIN)
    names += list(cfg.DATASETS.TEST)
    return list(dict.fromkeys(names))


def check_datasets_from_cfg(cfg, training: bool = True, progress: Optional[bool] = None,
                            contents: Optional[bool] = None) -> Dict[str, CheckReport]:
    """Existence, then (``DATASETS.CHECK.ENABLED`` or ``contents``) contents of the run's datasets.

    Registers the config-defined datasets first. Raises ``FileNotFoundError`` / ``KeyError`` for a missing
    or unknown dataset and :class:`DatasetCheckError` listing every unusable file.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from .dataset_mappers import dataset_num_classes
    from .datasets import register_datasets_from_cfg

    register_datasets_from_cfg(cfg)
    names = datasets_of_cfg(cfg, training)
    unknown = [n for n in names if n not in DatasetCatalog.list()]
    if unknown:
        raise KeyError(f"dataset(s) {unknown} are not registered; registered: {sorted(DatasetCatalog.list())}. "
                       f"See datasets/README.md for the names.")
    dicts = {name: DatasetCatalog.get(name) for name in names}  # missing data fail here, before the model
    for name, entries in dicts.items():
        if not entries:
            raise ValueError(f"dataset {name!r} is empty: it lists no image")
    enabled = cfg.DATASETS.CHECK.ENABLED if contents is None else contents
    if not enabled:
        return {}
    if progress is None:
        progress = sys.stderr.isatty()
    default_k, default_ignore = dataset_num_classes(cfg, is_train=training)
    reports: Dict[str, CheckReport] = {}
    problems: List[Tuple[str, str, str]] = []
    for name, entries in dicts.items():
        meta = MetadataCatalog.get(name)
        classes = getattr(meta, "stuff_classes", None)
        k = len(classes) if classes else default_k
        ignore = int(getattr(meta, "ignore_label", default_ignore))
        report = check_dataset_dicts(
            entries, k if (cfg.INPUT.VALIDATE_LABELS and k > 0) else None, ignore,
            workers=cfg.DATASETS.CHECK.NUM_WORKERS, progress=progress,
            cache_dir=cfg.DATASETS.CHECK.CACHE_DIR, desc=f"checking {name}")
        reports[name] = report
        logger.info("dataset check %s: %d entries, %d read now, %d unchanged since they passed, %d problem(s)",
                    name, report.total, report.checked, report.cached, len(report.problems))
        problems += [(name, path, reason) for path, reason in report.problems]
    if problems:
        for name, path, reason in problems:
            logger.error("dataset check %s: %s", name, reason)
        shown = "\n".join(f"  [{name}] {reason}" for name, _, reason in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more (all are in the log above)" if len(problems) > 10 else ""
        raise DatasetCheckError(
            f"{len(problems)} image/mask file(s) of {', '.join(dicts)} cannot be used:\n{shown}{more}\n"
            f"Fix or re-create these files (or remove them from the dataset lists), then start again; nothing "
            f"was trained yet. `python tools/check_dataset.py --config-file ...` runs this check alone; "
            f"DATASETS.CHECK.ENABLED False skips it (training then stops when it reaches a bad file).")
    return reports
