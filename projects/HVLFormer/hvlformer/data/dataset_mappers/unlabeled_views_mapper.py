"""The unlabeled dataset mapper of semi-supervised training (paper Sec. 3.4 and Sec. 4.1, UniMatch V2
views): three pixel-aligned views of every unlabeled image and its CutMix box.

Views (UniMatch V2 protocol): one geometry per unlabeled image (random resize, crop, pad, flip) is shared
by all three views, so they are pixel-aligned; then

- original ``I``: no photometric change;
- weak ``I_w``: brightness and contrast jitter (+-0.1), Gaussian blur with p = 0.5, sigma U(0.1, 0.5);
- strong ``I_s``: ColorJitter(0.5, 0.5, 0.5, 0.25) with p = 0.8, grayscale p = 0.2, Gaussian blur
  p = 0.5 with sigma U(0.1, 2.0), and a CutMix box (p = 0.5, 2-40 % of the crop, aspect 0.3-3.3) whose
  pixels the training step replaces by another unlabeled image of the batch (:mod:`hvlformer.cutmix`).

Randomness comes from ``np.random`` / ``torch``'s global generators, which detectron2 seeds per worker.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from detectron2.config import configurable
from detectron2.data import transforms as T
from torch import Tensor

from ...cutmix import sample_cutmix_box
from ..validation import check_image_label_sizes, read_image_checked, read_label_checked
from .semantic_dataset_mapper import PadTo, build_train_geometry_augmentations

logger = logging.getLogger(__name__)

__all__ = ["weak_photometric", "strong_photometric", "UnlabeledViewsMapper"]


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


class UnlabeledViewsMapper:
    """Reads an unlabeled image (no mask file needed) and returns its three pixel-aligned views.

    Output dict: ``"image"`` (original), ``"image_weak"``, ``"image_strong"`` (each ``3 x H x W`` uint8),
    ``"padding"`` (``H x W`` bool, True where the crop was padded; ignored by the losses),
    ``"cutmix_box"`` (``H x W`` bool), ``"height"``/``"width"`` (original size); with ``oracle_labels``
    (``SEMI.ORACLE_LABELS``, a diagnostic) also ``"oracle_sem_seg"`` (``H x W`` long, the image's hidden label
    map under the same geometry, 255 on padding and ignored pixels), read from ``hidden_sem_seg_file_name``.
    """

    @configurable
    def __init__(self, *, augmentations: List[Any], image_format: str, size_divisibility: int, weak: Dict[str, Any],
                 strong: Dict[str, Any], cutmix: Dict[str, Any], oracle_labels: bool = False,
                 ignore_label: int = 255) -> None:
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.size_divisibility = size_divisibility
        self.weak = weak
        self.strong = strong
        self.cutmix = cutmix
        self.oracle_labels = oracle_labels
        self.ignore_label = ignore_label

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
            "oracle_labels": cfg.SEMI.ORACLE_LABELS,
            "ignore_label": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict["file_name"], format=self.image_format)
        height, width = image.shape[:2]
        oracle = self._hidden_label(dataset_dict, image) if self.oracle_labels else None
        # a constant "label" tracks where the geometry pads (255 there)
        aug_input = T.AugInput(image, sem_seg=np.zeros((height, width), dtype=np.uint8))
        transforms = self.augmentations(aug_input)
        image, marker = aug_input.image, aug_input.sem_seg
        if oracle is not None:
            oracle = transforms.apply_segmentation(oracle)
        if self.size_divisibility > 0:
            tfm = PadTo(size_divisibility=self.size_divisibility, seg_pad_value=255).get_transform(image)
            image, marker = tfm.apply_image(image), tfm.apply_segmentation(marker)
            if oracle is not None:
                oracle = tfm.apply_segmentation(oracle)
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
        if oracle is not None:
            oracle = torch.as_tensor(oracle.astype(np.int64))
            dataset_dict["oracle_sem_seg"] = oracle.masked_fill(torch.as_tensor(marker == 255), self.ignore_label)
        return dataset_dict

    def _hidden_label(self, dataset_dict: Dict[str, Any], image: np.ndarray) -> np.ndarray:
        """The hidden ``H x W`` label map of the unlabeled ``image`` (``H x W x 3``), as uint8 for the geometry's
        nearest resampling."""
        path = dataset_dict.get("hidden_sem_seg_file_name")
        if not path:
            raise ValueError(f"SEMI.ORACLE_LABELS reads each unlabeled image's hidden label map, and "
                             f"{dataset_dict['file_name']} names none ('hidden_sem_seg_file_name'; the `shapes` "
                             f"split keeps them, real datasets' unlabeled splits do not)")
        label = read_label_checked(path, num_classes=None)
        check_image_label_sizes(image, label, dataset_dict["file_name"], path)
        if label.min() < 0 or label.max() > 255:
            raise ValueError(f"Hidden label {path} holds values outside 0-255")
        return label.astype(np.uint8)
