"""Checked readers for images and label maps, with errors that name the offending file.

* :func:`read_image_checked`: missing file -> ``FileNotFoundError``; unreadable, corrupt or truncated
  file -> ``ValueError`` ("... is corrupt ..."). EXIF orientation is applied, as detectron2's
  ``read_image`` does. Truncated files are errors unless the user has set Pillow's global
  ``ImageFile.LOAD_TRUNCATED_IMAGES``.
* Bit depths and modes: 8-bit grey, palette, RGB(A), CMYK, YCbCr, ... are converted to RGB as Pillow does;
  16-bit images (grey ``I;16``, and 16-bit RGB, which Pillow reads as 8-bit RGB) are scaled to 8 bit
  (``v * 255 / 65535``), not clipped (which made a 16-bit photo almost all white); 32-bit integer (``I``)
  images are 16-bit data when a value exceeds 255, else 8-bit; floating-point (``F``) images must lie in
  [0, 1] or [0, 255]. Anything else is a ``ValueError`` naming the file and its mode.
* :func:`read_label_checked`: label maps are class indices. Palette PNGs (PIL mode ``"P"``, e.g. Pascal
  VOC) are read as their indices, never converted to colours or luminance. Multi-channel labels are an
  error (colour-coded masks must be converted to indices first). Values ``>= num_classes`` (or negative)
  that are not the ignore label are an error listing the values.
* :func:`check_image_label_sizes`, :func:`check_dataset_root`: size and dataset-root checks.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "read_image_checked",
    "read_label_checked",
    "check_label_values",
    "check_image_label_sizes",
    "check_dataset_root",
    "image_to_rgb8",
    "array_to_rgb8",
]

PathLike = Union[str, os.PathLike]
# Pillow raises these for unidentifiable, truncated or otherwise broken files.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_MULTI_CHANNEL_MODES = {"RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "LA", "La", "PA", "RGBa"}


def _check_file(path: PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{what} is not a regular file: {path}")
    return path


def _open_loaded(path: str, what: str) -> Image.Image:
    """Open and fully decode an image; decoding problems become ``ValueError`` naming the file."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except _DECODE_ERRORS as e:
        raise ValueError(
            f"{what} {path} is corrupt or unreadable (truncated or not a valid image file): "
            f"{type(e).__name__}: {e}"
        ) from e
    return img


def _scale16(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 (rounded), as uint8."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def array_to_rgb8(array: np.ndarray, what: str = "image") -> np.ndarray:
    """``H x W``, ``H x W x 1``, ``H x W x 3`` or ``H x W x 4`` (alpha dropped) array of any common depth ->
    ``H x W x 3`` uint8, channel order kept.

    uint8 as is; bool -> 0 / 255; uint16 (and other integers above 255, up to 65535) scaled by 255 / 65535;
    other integers in 0..255 as is; floats in [0, 1] times 255, in [0, 255] as is. Raises ``ValueError``
    (naming ``what``) for other shapes, negative or larger values, NaN or infinity.
    """
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3) or array.size == 0:
        raise ValueError(f"{what}: expected an H x W x 3 image (or H x W grey), got an array of shape {array.shape}")
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        out = array
    elif kind == "b":
        out = array.astype(np.uint8) * 255
    elif kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise ValueError(f"{what}: {array.dtype} values {low}..{high} are outside 0..65535; convert the image "
                             f"to 8 or 16 bit per channel first")
        out = _scale16(array) if (array.dtype == np.uint16 or high > 255) else array.astype(np.uint8)
    elif kind == "f":
        if not np.isfinite(array).all():
            raise ValueError(f"{what}: floating-point image with NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 255:
            raise ValueError(f"{what}: floating-point values {low:g}..{high:g} are neither in [0, 1] nor in "
                             f"[0, 255]; rescale the image first")
        out = np.rint(array * 255.0 if high <= 1.0 else array).astype(np.uint8)
    else:
        raise ValueError(f"{what}: unsupported array type {array.dtype}")
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out)


def image_to_rgb8(img: Image.Image, what: str = "image") -> np.ndarray:
    """A PIL image of any common mode and bit depth as a writable ``H x W x 3`` uint8 RGB array (see the
    module docstring for the 16-bit, 32-bit and floating-point rules)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return array_to_rgb8(np.asarray(img), f"{what} (PIL mode {img.mode!r})")
    try:
        return np.array(img.convert("RGB"))  # a copy: writable
    except _DECODE_ERRORS as e:
        raise ValueError(f"{what} has an unsupported mode {img.mode!r}: {e}") from e


def read_image_checked(path: PathLike, format: str = "RGB") -> np.ndarray:
    """Read an image of any common mode and bit depth as a writable ``H x W x 3`` uint8 array in ``format``
    ("RGB" or "BGR"); 16-bit images are scaled to 8 bit (module docstring)."""
    if format not in ("RGB", "BGR"):
        raise ValueError(f"read_image_checked: format must be 'RGB' or 'BGR', got {format!r}.")
    path = _check_file(path, "Image file")
    img = _open_loaded(path, "Image file")
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF blocks must not make a decodable image unusable
        pass
    arr = image_to_rgb8(img, f"Image file {path}")
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise ValueError(f"Image file {path} decoded to an unexpected shape {arr.shape}.")
    if format == "BGR":
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


def check_label_values(label: np.ndarray, num_classes: int, ignore_label: Optional[int], path: PathLike) -> None:
    """Raise ``ValueError`` naming ``path`` when ``label`` holds values outside ``[0, K)`` + ignore."""
    if label.dtype == np.uint8:
        counts = np.bincount(label.ravel(), minlength=256)
        values = np.nonzero(counts)[0]
    else:
        values = np.unique(label)
    bad = values[(values < 0) | (values >= num_classes)]
    if ignore_label is not None:
        bad = bad[bad != ignore_label]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:20]) + (" ..." if bad.size > 20 else "")
        raise ValueError(
            f"Label file {os.fspath(path)} contains values [{shown}] outside the valid class range "
            f"[0, {num_classes - 1}] (num_classes={num_classes}) that are not the ignore label "
            f"{ignore_label}. Check the number of classes of the dataset / MODEL.SEM_SEG_HEAD.NUM_CLASSES, "
            f"or map these values to the ignore label when preparing the dataset."
        )


def read_label_checked(path: PathLike, num_classes: Optional[int], ignore_label: Optional[int] = 255) -> np.ndarray:
    """Read a single-channel label map of class indices as ``H x W`` int64.

    ``num_classes=None`` skips the value check.
    """
    path = _check_file(path, "Label file")
    img = _open_loaded(path, "Label file")
    if img.mode in _MULTI_CHANNEL_MODES or len(img.getbands()) != 1:
        raise ValueError(
            f"Label file {path} has {len(img.getbands())} channels (PIL mode {img.mode!r}); expected a "
            f"single-channel map of class indices (an 8-bit grey 'L' or palette 'P' PNG). Colour-coded "
            f"masks must be converted to class indices first."
        )
    if img.mode == "F":
        raise ValueError(f"Label file {path} holds floating-point values (PIL mode 'F'); expected integer class indices.")
    # Mode "P": np.asarray returns the palette indices (no colour / luminance conversion).
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"Label file {path} decoded to shape {arr.shape}; expected a 2-D index map.")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if num_classes is not None:
        check_label_values(arr, int(num_classes), ignore_label, path)
    return arr.astype(np.int64)


def check_image_label_sizes(image: np.ndarray, label: np.ndarray, image_path: PathLike, label_path: PathLike) -> None:
    """Raise ``ValueError`` naming both files when image and label sizes differ."""
    ih, iw = image.shape[:2]
    lh, lw = label.shape[:2]
    if (ih, iw) != (lh, lw):
        raise ValueError(
            f"Image and label sizes differ: image {os.fspath(image_path)} is {iw}x{ih} (W x H) but "
            f"label {os.fspath(label_path)} is {lw}x{lh}."
        )


def check_dataset_root(path: PathLike, what: str = "Dataset root") -> str:
    """Return ``path`` (str) if it is a directory, else raise ``FileNotFoundError`` with a hint."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        env = os.environ.get("DETECTRON2_DATASETS")
        env_txt = f"currently {env!r}" if env is not None else "not set, so the default 'datasets' is used"
        raise FileNotFoundError(
            f"{what} not found: {path} (absolute: {os.path.abspath(path)}). Datasets are looked up under "
            f"$DETECTRON2_DATASETS ({env_txt}); set DETECTRON2_DATASETS to the directory holding the "
            f"prepared datasets, or prepare them with datasets/prepare_*.py."
        )
    return path
