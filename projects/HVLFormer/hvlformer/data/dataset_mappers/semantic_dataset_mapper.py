"""Dataset mapper for labeled semantic-segmentation images (``INPUT.DATASET_MAPPER_NAME: hvlformer_semantic``).

Training geometry follows the UniMatch protocol (paper Sec. 4.1):

1. :class:`ResizeLongestSide`: resize so the long side is ``INPUT.RESIZE_BASE * U(INPUT.RESIZE_RATIO_RANGE)``
   (aspect kept; bilinear image, nearest label);
2. :class:`RandomCropPad`: a random ``INPUT.CROP.SIZE`` crop with independent uniform x/y offsets (with
   the optional ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA`` constraint); when the image is smaller than the
   crop it is padded on the right/bottom with 0 (image) and the ignore label (label). detectron2's
   ``FixedSizeCrop`` is not used because it draws one random factor for both axes, so a square image is
   only ever cropped along its diagonal. Photometric distortion (``INPUT.COLOR_AUG_SSD``,
   ``ColorAugSSDTransform``) runs between the crop and the pad, so padded pixels stay exactly 0;
3. horizontal flip (p = 0.5);
4. padding to ``INPUT.SIZE_DIVISIBILITY`` (image 0, label ignore), a no-op for the usual crop sizes.

Test mode (``is_train=False``) applies no padding (the model pads internally). A built-in benchmark
(metadata ``benchmark_protocol``) keeps the paper's protocol: the original size (sliding windows, where the
config enables them, run inside the model), as does a mapper built without a dataset; any other named
dataset (your own data) is resized by :func:`inference_resize` to ``TEST.INFERENCE_SCALE`` (by default the training crop's short side, long side capped). The label is never
resized and ``"height"`` / ``"width"`` stay the original size, to which the model resizes its prediction. Both modes read with the checks of :mod:`hvlformer.data.validation`:
missing/corrupt image files, multi-channel labels, image/label size mismatches and (with
``INPUT.VALIDATE_LABELS``) label values outside ``[0, K)`` other than the ignore label are clear errors.

Output: a copy of the dataset dict with ``"image"`` (3 x H x W uint8 tensor in ``INPUT.FORMAT``),
``"sem_seg"`` (H x W int64 tensor, only when the dict has ``"sem_seg_file_name"``) and ``"height"`` /
``"width"`` (the original image size).
"""
from __future__ import annotations

import copy
import logging
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from fvcore.transforms.transform import CropTransform, NoOpTransform, PadTransform

from ..validation import check_image_label_sizes, read_image_checked, read_label_checked

__all__ = [
    "ResizeLongestSide",
    "RandomCropPad",
    "PadTo",
    "build_train_geometry_augmentations",
    "HVLFormerSemanticDatasetMapper",
    "dataset_num_classes",
    "inference_resize",
    "is_benchmark_dataset",
]

logger = logging.getLogger(__name__)


class ResizeLongestSide(T.Augmentation):
    """Resize so that the long side is ``base * U(ratio_range)``; the aspect ratio is kept."""

    def __init__(self, base: int, ratio_range: Sequence[float] = (0.5, 2.0), interp: int = Image.BILINEAR):
        super().__init__()
        lo, hi = float(ratio_range[0]), float(ratio_range[1])
        if not (0 < lo <= hi):
            raise ValueError(f"ResizeLongestSide: invalid ratio range {ratio_range!r}.")
        if base <= 0:
            raise ValueError(f"ResizeLongestSide: base must be > 0, got {base}.")
        self._init(dict(base=int(base), ratio_range=(lo, hi), interp=interp))

    def get_transform(self, image: np.ndarray):
        h, w = image.shape[:2]
        long_side = self.base * np.random.uniform(self.ratio_range[0], self.ratio_range[1])
        scale = long_side / max(h, w)
        new_h, new_w = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
        if (new_h, new_w) == (h, w):
            return NoOpTransform()
        return T.ResizeTransform(h, w, new_h, new_w, self.interp)


class RandomCropPad(T.Augmentation):
    """Random ``crop_size`` crop (independent uniform offsets), then optional right/bottom padding.

    With ``pad=False`` only the crop is returned (crop window ``min(size, crop)``); use :class:`PadTo`
    afterwards. ``single_category_max_area < 1`` retries the crop (up to 10 times) until no single class
    covers more than that fraction of the labeled crop pixels (Mask2Former's category-area constraint).
    """

    def __init__(
        self,
        crop_size: Tuple[int, int],
        pad: bool = True,
        pad_value: float = 0.0,
        seg_pad_value: int = 255,
        single_category_max_area: float = 1.0,
        ignore_label: int = 255,
    ):
        super().__init__()
        ch, cw = int(crop_size[0]), int(crop_size[1])
        if ch <= 0 or cw <= 0:
            raise ValueError(f"RandomCropPad: invalid crop size {crop_size!r}.")
        self._init(
            dict(
                crop_size=(ch, cw),
                pad=pad,
                pad_value=pad_value,
                seg_pad_value=seg_pad_value,
                single_category_max_area=float(single_category_max_area),
                ignore_label=ignore_label,
            )
        )

    def _random_crop(self, h: int, w: int) -> Tuple[int, int, int, int]:
        ch, cw = min(h, self.crop_size[0]), min(w, self.crop_size[1])
        y0 = int(np.random.randint(0, h - ch + 1))
        x0 = int(np.random.randint(0, w - cw + 1))
        return x0, y0, cw, ch

    def get_transform(self, image: np.ndarray, sem_seg: Optional[np.ndarray] = None):
        h, w = image.shape[:2]
        x0, y0, cw, ch = self._random_crop(h, w)
        if self.single_category_max_area < 1.0 and sem_seg is not None:
            for _ in range(10):
                crop = sem_seg[y0 : y0 + ch, x0 : x0 + cw]
                values, counts = np.unique(crop, return_counts=True)
                counts = counts[values != self.ignore_label]
                if len(counts) > 1 and counts.max() < self.single_category_max_area * counts.sum():
                    break
                x0, y0, cw, ch = self._random_crop(h, w)
        transforms = [CropTransform(x0, y0, cw, ch, w, h)]
        if self.pad:
            transforms.append(_pad_transform(ch, cw, self.crop_size[0], self.crop_size[1], self.pad_value, self.seg_pad_value))
        return T.TransformList(transforms)


def _pad_transform(h: int, w: int, target_h: int, target_w: int, pad_value: float, seg_pad_value: int):
    ph, pw = max(0, target_h - h), max(0, target_w - w)
    if ph == 0 and pw == 0:
        return NoOpTransform()
    return PadTransform(0, 0, pw, ph, w, h, pad_value, seg_pad_value)


class PadTo(T.Augmentation):
    """Pad right/bottom to at least ``size`` (H, W) and/or to a multiple of ``size_divisibility``."""

    def __init__(
        self,
        size: Optional[Tuple[int, int]] = None,
        size_divisibility: int = 0,
        pad_value: float = 0.0,
        seg_pad_value: int = 255,
    ):
        super().__init__()
        self._init(dict(size=size, size_divisibility=int(size_divisibility), pad_value=pad_value, seg_pad_value=seg_pad_value))

    def get_transform(self, image: np.ndarray):
        h, w = image.shape[:2]
        th, tw = (h, w) if self.size is None else (max(h, int(self.size[0])), max(w, int(self.size[1])))
        d = self.size_divisibility
        if d > 0:
            th, tw = -(-th // d) * d, -(-tw // d) * d
        return _pad_transform(h, w, th, tw, self.pad_value, self.seg_pad_value)


def build_train_geometry_augmentations(cfg, ignore_label: int = 255, image_format: Optional[str] = None) -> List[Any]:
    """Training augmentations from ``cfg.INPUT`` (resize, crop, [colour], pad, flip).

    Reusable by the semi-supervised views, which share the same geometry. ``image_format`` defaults to
    ``cfg.INPUT.FORMAT`` and is needed by the colour augmentation.
    """
    crop = tuple(int(x) for x in cfg.INPUT.CROP.SIZE)
    if len(crop) == 1:
        crop = (crop[0], crop[0])
    augs: List[Any] = [
        ResizeLongestSide(cfg.INPUT.RESIZE_BASE, cfg.INPUT.RESIZE_RATIO_RANGE),
        RandomCropPad(
            crop,
            pad=False,
            single_category_max_area=cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
            ignore_label=ignore_label,
        ),
    ]
    if cfg.INPUT.COLOR_AUG_SSD:
        from detectron2.projects.point_rend import ColorAugSSDTransform

        augs.append(ColorAugSSDTransform(img_format=image_format or cfg.INPUT.FORMAT))
    augs.append(PadTo(size=crop, pad_value=0.0, seg_pad_value=ignore_label))
    augs.append(T.RandomFlip(prob=0.5, horizontal=True, vertical=False))
    return augs


def _metadata_value(dataset_name: Optional[str], key: str):
    if not dataset_name:
        return None
    if dataset_name not in MetadataCatalog.list():
        return None
    return getattr(MetadataCatalog.get(dataset_name), key, None)


def is_benchmark_dataset(dataset_name: Optional[str]) -> bool:
    """Whether ``dataset_name`` is a built-in benchmark (metadata ``benchmark_protocol``), evaluated with the
    paper's protocol rather than ``TEST.INFERENCE_SCALE``."""
    return bool(_metadata_value(dataset_name, "benchmark_protocol"))


def inference_scale(cfg) -> Tuple[int, int]:
    """``(short side, long-side cap)`` of ``TEST.INFERENCE_SCALE`` with the ``-1`` defaults resolved
    (``(0, 0)``: original size; a cap of 0: none)."""
    scale = cfg.TEST.INFERENCE_SCALE
    short = int(scale.MIN_SIZE)
    cap = int(scale.MAX_SIZE)
    if short < 0:
        short = int(min(cfg.INPUT.CROP.SIZE))
    if cap < 0:
        cap = int(round(cfg.INPUT.RESIZE_BASE * max(cfg.INPUT.RESIZE_RATIO_RANGE)))
    return short, cap


def inference_resize(cfg) -> Optional[T.ResizeShortestEdge]:
    """The resize of ``TEST.INFERENCE_SCALE`` (the demo, the predictor, your own datasets); ``None`` =
    original size. The built-in benchmarks do not use it: they are evaluated at the original size (with
    ``TEST.SLIDING_WINDOW`` where the config enables it), the paper's protocol."""
    short, cap = inference_scale(cfg)
    if short <= 0:
        return None
    return T.ResizeShortestEdge([short, short], cap if cap > 0 else sys.maxsize)


def dataset_num_classes(cfg, is_train: bool = True) -> Tuple[int, int]:
    """``(num_classes, ignore_label)``: the dataset metadata first, else ``MODEL.SEM_SEG_HEAD``."""
    names = list(cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST) or list(
        cfg.DATASETS.TEST if is_train else cfg.DATASETS.TRAIN
    )
    name = names[0] if names else None
    classes = _metadata_value(name, "stuff_classes")
    ignore = _metadata_value(name, "ignore_label")
    head_k = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    ignore = int(ignore) if ignore is not None else int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
    if classes is not None:
        if head_k > 0 and len(classes) != head_k:  # 0 = "take it from the dataset"
            logger.warning(
                f"Dataset {name!r} has {len(classes)} classes but MODEL.SEM_SEG_HEAD.NUM_CLASSES = {head_k}; "
                f"the mapper validates labels against the dataset's {len(classes)} classes."
            )
        return len(classes), ignore
    return head_k, ignore


class HVLFormerSemanticDatasetMapper:
    """Read, validate and (in training) augment one labeled semantic-segmentation sample."""

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: Sequence[Union[T.Augmentation, T.Transform]],
        image_format: str,
        ignore_label: int,
        size_divisibility: int,
        num_classes: int,
        validate_labels: bool = True,
    ):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.ignore_label = int(ignore_label)
        self.size_divisibility = int(size_divisibility)
        self.num_classes = int(num_classes)
        self.validate_labels = bool(validate_labels)
        mode = "training" if is_train else "inference"
        logger.info(f"[HVLFormerSemanticDatasetMapper] augmentations used in {mode}: {self.augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_name: Optional[str] = None) -> Dict[str, Any]:
        """``dataset_name``: the evaluated dataset (test mode), which decides the test-time resize."""
        num_classes, ignore_label = dataset_num_classes(cfg, is_train)
        if is_train:
            augs = build_train_geometry_augmentations(cfg, ignore_label, cfg.INPUT.FORMAT)
        else:
            if dataset_name is None:  # the first test dataset of the config
                dataset_name = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
            # a named dataset that is not a built-in benchmark is the user's own data: TEST.INFERENCE_SCALE;
            # the benchmarks (and a mapper without a dataset) keep the original size, the paper's protocol
            user_data = dataset_name is not None and not is_benchmark_dataset(dataset_name)
            resize = inference_resize(cfg) if user_data else None
            augs = [resize] if resize is not None else []
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": ignore_label,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "num_classes": num_classes,
            "validate_labels": cfg.INPUT.VALIDATE_LABELS,
        }

    def _label_for_transforms(self, label: np.ndarray) -> np.ndarray:
        # uint8 labels take detectron2's PIL nearest path; larger values go through float32 (exact < 2^24).
        if label.size and label.min() >= 0 and label.max() <= 255:
            return label.astype(np.uint8)
        return label.astype(np.float32)

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        image = read_image_checked(file_name, format=self.image_format)
        orig_h, orig_w = image.shape[:2]
        if "height" in dataset_dict and "width" in dataset_dict:
            expected = (int(dataset_dict["height"]), int(dataset_dict["width"]))
            if expected != (orig_h, orig_w):
                raise ValueError(
                    f"Image {file_name} is {orig_w}x{orig_h} (W x H) but its dataset entry says "
                    f"{expected[1]}x{expected[0]}."
                )

        label = None
        label_path = dataset_dict.get("sem_seg_file_name")
        if label_path is not None:
            label = read_label_checked(
                label_path, self.num_classes if self.validate_labels else None, self.ignore_label
            )
            check_image_label_sizes(image, label, file_name, label_path)

        if self.is_train:
            seg = self._label_for_transforms(label) if label is not None else None
            aug_input = T.AugInput(image, sem_seg=seg)
            self.augmentations(aug_input)
            image, seg = aug_input.image, aug_input.sem_seg
            if self.size_divisibility > 0:
                pad = PadTo(size_divisibility=self.size_divisibility, seg_pad_value=self.ignore_label)
                tfm = pad.get_transform(image)
                image = tfm.apply_image(image)
                if seg is not None:
                    seg = tfm.apply_segmentation(seg)
            if seg is not None:
                label = np.rint(seg).astype(np.int64) if seg.dtype.kind == "f" else seg.astype(np.int64)
        elif self.augmentations.augs:  # the test-time resize: the image only, the label stays at full size
            aug_input = T.AugInput(image)
            self.augmentations(aug_input)
            image = aug_input.image

        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if label is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(np.ascontiguousarray(label), dtype=torch.long)
        dataset_dict["height"], dataset_dict["width"] = orig_h, orig_w
        return dataset_dict
