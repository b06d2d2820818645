"""Helpers shared by the ``prepare_*.py`` scripts of this folder (not a command itself): the common
command line, source discovery with clear errors, archive extraction, linking image folders, parallel
mask conversion with a progress bar and atomic index-PNG writing.

The scripts run as ``python datasets/prepare_<name>.py``, so this folder is on ``sys.path`` and they import
it as ``prepare_common``. It imports ``hvlformer`` only inside the functions that need it, so that
``--help`` and the argument errors come without loading torch.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
README_HINT = "datasets/README.md"


def prepare_parser(description: str, src_help: str, copy_what: str, src_required: bool = True,
                   overwrite_what: str = "masks") -> argparse.ArgumentParser:
    """The options every prepare script has: ``--src`` (the downloads), ``--root`` (the output root,
    ``$DETECTRON2_DATASETS``), ``--workers``, ``--overwrite`` and ``--copy-images``. Scripts add their own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--src", required=src_required, default=None, help=src_help)
    p.add_argument("--root", default=os.environ.get("DETECTRON2_DATASETS", "datasets"),
                   help="output root ($DETECTRON2_DATASETS)")
    p.add_argument("--workers", type=int, default=None, help="conversion processes (default: min(8, CPUs))")
    p.add_argument("--overwrite", action="store_true", help=f"rewrite {overwrite_what} that already exist")
    p.add_argument("--copy-images", action="store_true", help=f"copy {copy_what} instead of linking")
    return p


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
    from hvlformer.data.folder import load_sem_seg_folder

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
    from hvlformer.data.validation import check_image_label_sizes

    h, w = image_size(image_path)
    check_image_label_sizes(np.broadcast_to(np.uint8(0), (h, w)), label, image_path, label_path)
