"""Semi-supervised data (paper Sec. 3.4 and Sec. 4.1, UniMatch V2 views): three views of every unlabeled
image, CutMix boxes, rare-class sampling and the repetition of the labeled list.

Views (UniMatch V2 protocol): one geometry per unlabeled image (random resize, crop, pad, flip) is shared
by all three views, so they are pixel-aligned; then

- original ``I``: no photometric change;
- weak ``I_w``: brightness and contrast jitter (+-0.1), Gaussian blur with p = 0.5, sigma U(0.1, 0.5);
- strong ``I_s``: ColorJitter(0.5, 0.5, 0.5, 0.25) with p = 0.8, grayscale p = 0.2, Gaussian blur
  p = 0.5 with sigma U(0.1, 2.0), and a CutMix box (p = 0.5, 2-40 % of the crop, aspect 0.3-3.3) whose
  pixels the trainer replaces by another unlabeled image of the batch (:func:`apply_cutmix`).

Randomness comes from ``np.random`` / ``torch``'s global generators, which detectron2 seeds per worker.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.utils import comm
from torch import Tensor
from torch.utils.data import Sampler

from .dataset_mapper import PadTo, build_train_geometry_augmentations
from .validation import read_label_checked, read_image_checked

logger = logging.getLogger(__name__)

__all__ = [
    "weak_photometric", "strong_photometric", "sample_cutmix_box", "apply_cutmix", "UnlabeledViewsMapper",
    "repeat_to_length", "class_pixel_counts", "rare_class_probabilities", "RareClassSampler",
]


def _uniform(low: float, high: float) -> float:
    return float(np.random.uniform(low, high))


def _gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    kernel = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(image, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


def weak_photometric(image: Tensor, brightness: float = 0.1, contrast: float = 0.1, blur_prob: float = 0.5,
                     blur_sigma: Sequence[float] = (0.1, 0.5)) -> Tensor:
    """Mild photometric change of a ``3 x H x W`` uint8 RGB image (brightness, contrast, blur)."""
    image = TF.adjust_brightness(image, _uniform(1 - brightness, 1 + brightness))
    image = TF.adjust_contrast(image, _uniform(1 - contrast, 1 + contrast))
    if np.random.rand() < blur_prob:
        image = _gaussian_blur(image, _uniform(*blur_sigma))
    return image


def strong_photometric(image: Tensor, color_jitter: Sequence[float] = (0.5, 0.5, 0.5, 0.25),
                       jitter_prob: float = 0.8, grayscale_prob: float = 0.2, blur_prob: float = 0.5,
                       blur_sigma: Sequence[float] = (0.1, 2.0)) -> Tensor:
    """Strong photometric change of a ``3 x H x W`` uint8 RGB image (ColorJitter in random order, grayscale, blur)."""
    if np.random.rand() < jitter_prob:
        brightness, contrast, saturation, hue = color_jitter
        ops = [
            lambda x: TF.adjust_brightness(x, _uniform(max(0.0, 1 - brightness), 1 + brightness)),
            lambda x: TF.adjust_contrast(x, _uniform(max(0.0, 1 - contrast), 1 + contrast)),
            lambda x: TF.adjust_saturation(x, _uniform(max(0.0, 1 - saturation), 1 + saturation)),
            lambda x: TF.adjust_hue(x, _uniform(-hue, hue)),
        ]
        for index in np.random.permutation(len(ops)):
            image = ops[index](image)
    if np.random.rand() < grayscale_prob:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if np.random.rand() < blur_prob:
        image = _gaussian_blur(image, _uniform(*blur_sigma))
    return image


def sample_cutmix_box(height: int, width: int, prob: float = 0.5, area: Sequence[float] = (0.02, 0.4),
                      aspect: Sequence[float] = (0.3, 1 / 0.3)) -> Tensor:
    """``H x W`` bool box mask: with probability ``prob`` a box of ``U(area)`` of the image with aspect
    ratio (h / w) ``U(aspect)`` at a uniform position (clipped to the image); else all False."""
    box = torch.zeros(height, width, dtype=torch.bool)
    if np.random.rand() >= prob:
        return box
    size = _uniform(*area) * height * width
    ratio = _uniform(*aspect)
    box_w = int(round(math.sqrt(size / ratio)))
    box_h = int(round(math.sqrt(size * ratio)))
    box_w, box_h = max(1, min(box_w, width)), max(1, min(box_h, height))
    top = np.random.randint(0, height - box_h + 1)
    left = np.random.randint(0, width - box_w + 1)
    box[top: top + box_h, left: left + box_w] = True
    return box


def apply_cutmix(images: Tensor, boxes: Tensor, order: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Paste, inside ``boxes[i]``, the pixels of image ``order[i]`` (default: the batch reversed).

    images: ``B x C x H x W``; boxes: ``B x H x W`` bool. Returns (mixed images, order).
    """
    if order is None:
        order = torch.arange(images.shape[0] - 1, -1, -1, device=images.device)
    mixed = torch.where(boxes[:, None].to(images.device), images[order], images)
    return mixed, order


class UnlabeledViewsMapper:
    """Reads an unlabeled image (no mask file needed) and returns its three pixel-aligned views.

    Output dict: ``"image"`` (original), ``"image_weak"``, ``"image_strong"`` (each ``3 x H x W`` uint8),
    ``"padding"`` (``H x W`` bool, True where the crop was padded; ignored by the losses),
    ``"cutmix_box"`` (``H x W`` bool), ``"height"``/``"width"`` (original size).
    """

    @configurable
    def __init__(self, *, augmentations: List[Any], image_format: str, size_divisibility: int, weak: Dict[str, Any],
                 strong: Dict[str, Any], cutmix: Dict[str, Any]) -> None:
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.size_divisibility = size_divisibility
        self.weak = weak
        self.strong = strong
        self.cutmix = cutmix

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        from detectron2.projects.point_rend import ColorAugSSDTransform

        # the labeled geometry without its optional colour distortion (the views bring their own)
        geometry = [a for a in build_train_geometry_augmentations(cfg, ignore_label=255)
                    if not isinstance(a, ColorAugSSDTransform)]
        weak, strong = cfg.SEMI.WEAK, cfg.SEMI.STRONG
        return {
            "augmentations": geometry,
            "image_format": cfg.INPUT.FORMAT,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "weak": {"brightness": weak.BRIGHTNESS, "contrast": weak.CONTRAST, "blur_prob": weak.BLUR_PROB,
                     "blur_sigma": tuple(weak.BLUR_SIGMA)},
            "strong": {"color_jitter": tuple(strong.COLOR_JITTER), "jitter_prob": strong.JITTER_PROB,
                       "grayscale_prob": strong.GRAYSCALE_PROB, "blur_prob": strong.BLUR_PROB,
                       "blur_sigma": tuple(strong.BLUR_SIGMA)},
            "cutmix": {"prob": strong.CUTMIX_PROB, "area": tuple(strong.CUTMIX_AREA),
                       "aspect": tuple(strong.CUTMIX_ASPECT)},
        }

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict["file_name"], format=self.image_format)
        height, width = image.shape[:2]
        # a constant "label" tracks where the geometry pads (255 there)
        aug_input = T.AugInput(image, sem_seg=np.zeros((height, width), dtype=np.uint8))
        self.augmentations(aug_input)
        image, marker = aug_input.image, aug_input.sem_seg
        if self.size_divisibility > 0:
            tfm = PadTo(size_divisibility=self.size_divisibility, seg_pad_value=255).get_transform(image)
            image, marker = tfm.apply_image(image), tfm.apply_segmentation(marker)
        original = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        rgb = original if self.image_format == "RGB" else original.flip(0)
        weak = weak_photometric(rgb, **self.weak)
        strong = strong_photometric(rgb, **self.strong)
        if self.image_format != "RGB":
            weak, strong = weak.flip(0), strong.flip(0)
        dataset_dict.update({
            "image": original,
            "image_weak": weak,
            "image_strong": strong,
            "padding": torch.as_tensor(marker == 255),
            "cutmix_box": sample_cutmix_box(original.shape[1], original.shape[2], **self.cutmix),
            "height": height,
            "width": width,
        })
        return dataset_dict


def repeat_to_length(dataset_dicts: List[Dict], length: int) -> List[Dict]:
    """The labeled list repeated (whole copies) and cut to ``length`` (the unlabeled length), so one
    epoch is one pass over the unlabeled set. Shorter targets than the list keep the whole list."""
    if not dataset_dicts:
        raise ValueError("the labeled dataset is empty")
    if length <= len(dataset_dicts):
        return list(dataset_dicts)
    repeats = math.ceil(length / len(dataset_dicts))
    return (list(dataset_dicts) * repeats)[:length]


def class_pixel_counts(dataset_dicts: List[Dict], num_classes: int, ignore_label: int = 255,
                       cache_file: Optional[str] = None) -> np.ndarray:
    """``N x K`` pixel count of every class in every labeled image (cached as JSON when a path is given)."""
    if cache_file and Path(cache_file).is_file():
        cached = json.loads(Path(cache_file).read_text())
        if cached.get("files") == [d["sem_seg_file_name"] for d in dataset_dicts] and cached["num_classes"] == num_classes:
            return np.asarray(cached["counts"], dtype=np.int64)
    counts = np.zeros((len(dataset_dicts), num_classes), dtype=np.int64)
    for index, record in enumerate(dataset_dicts):
        label = read_label_checked(record["sem_seg_file_name"], num_classes, ignore_label)
        valid = label[label != ignore_label]
        counts[index] = np.bincount(valid.ravel(), minlength=num_classes)[:num_classes]
    if cache_file:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        Path(cache_file).write_text(json.dumps({"num_classes": num_classes, "counts": counts.tolist(),
                                                "files": [d["sem_seg_file_name"] for d in dataset_dicts]}))
    return counts


def rare_class_probabilities(counts: np.ndarray, temperature: float = 0.01, min_pixels: int = 3000
                             ) -> Tuple[np.ndarray, List[np.ndarray]]:
    """DAFormer's rare-class sampling: ``P(c) = softmax((1 - f_c) / T)`` over the classes that have at
    least one image with ``>= min_pixels`` pixels of them (``f_c``: the class's share of all labeled
    pixels); returns (``K`` probabilities, per class the indices of its eligible images)."""
    frequency = counts.sum(axis=0) / max(int(counts.sum()), 1)
    eligible = [np.flatnonzero(counts[:, c] >= min_pixels) for c in range(counts.shape[1])]
    logits = (1.0 - frequency) / temperature
    logits = np.where([len(e) > 0 for e in eligible], logits, -np.inf)
    if not np.isfinite(logits).any():
        raise ValueError(f"rare-class sampling: no image has {min_pixels} pixels of any class; lower "
                         "SEMI.RARE_CLASS_SAMPLING.MIN_PIXELS")
    logits = logits - logits[np.isfinite(logits)].max()
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(), eligible


class RareClassSampler(Sampler):
    """Infinite sampler: draw a class with :func:`rare_class_probabilities`, then a uniform image that
    contains it. Every process draws the same stream and keeps every ``world_size``-th index."""

    def __init__(self, counts: np.ndarray, temperature: float = 0.01, min_pixels: int = 3000,
                 seed: Optional[int] = None) -> None:
        self.probabilities, self.eligible = rare_class_probabilities(counts, temperature, min_pixels)
        self.seed = int(comm.shared_random_seed()) if seed is None else int(seed)
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seed)
        position = 0
        while True:
            cls = rng.choice(len(self.probabilities), p=self.probabilities)
            index = int(rng.choice(self.eligible[cls]))
            if position % self.world_size == self.rank:
                yield index
            position += 1


def register_shapes_semi_split(cfg) -> Optional[Tuple[str, str]]:
    """With ``DATASETS.SHAPES.NUM_LABELED > 0``: register ``shapes_labeled`` (that many images of
    ``shapes_train``, drawn with ``DATASETS.SHAPES.SEED``) and ``shapes_unlabeled`` (the rest, no masks)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from .shapes import register_shapes_from_cfg

    num_labeled = cfg.DATASETS.SHAPES.NUM_LABELED
    if num_labeled <= 0:
        return None
    train_name, _ = register_shapes_from_cfg(cfg)
    seed = cfg.DATASETS.SHAPES.SEED

    def split(labeled: bool) -> List[Dict]:
        records = DatasetCatalog.get(train_name)
        if not 0 < num_labeled < len(records):
            raise ValueError(f"DATASETS.SHAPES.NUM_LABELED={num_labeled} must be between 1 and {len(records) - 1}")
        chosen = set(np.random.default_rng(seed).permutation(len(records))[:num_labeled].tolist())
        if labeled:
            return [r for i, r in enumerate(records) if i in chosen]
        return [{k: v for k, v in r.items() if k != "sem_seg_file_name"} for i, r in enumerate(records)
                if i not in chosen]

    metadata = MetadataCatalog.get(train_name).as_dict()
    metadata.pop("name", None)
    for name, labeled in (("shapes_labeled", True), ("shapes_unlabeled", False)):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda labeled=labeled: split(labeled))
        MetadataCatalog.get(name).set(**metadata)
    return "shapes_labeled", "shapes_unlabeled"
