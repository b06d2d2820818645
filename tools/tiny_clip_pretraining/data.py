"""Image-caption batches of the tiny CLIP's pretraining and evaluation: ``shapes`` images of all 10 kinds drawn in
memory exactly as the dataset files would be (same generator, same JPEG encoding), their generated captions and
tags, name-swapped hard-negative captions, and the region tags of ``cell x cell`` squares."""
from __future__ import annotations

import copy
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hvlformer.data.captions import caption_shapes_image, visible_classes
from hvlformer.data.shapes import _image_rng, load_shapes_classes, render_shapes_image

PLAIN_TEMPLATE = "a photo of a {}."
ALL_KINDS = 11  # background + the 10 shape kinds of classes/shapes.json
SEG_CLASSES = 6  # the segmentation dataset: background + the first 5 kinds
JPEG_QUALITY = 95  # as the shapes dataset files


def vocabulary() -> List[str]:
    """``["background", <the 10 shape names>]`` (index = label id of an 11-class shapes image)."""
    spec = load_shapes_classes()
    return [spec["background"]["name"]] + [c["name"] for c in spec["classes"]]


def jpeg_roundtrip(image: np.ndarray) -> np.ndarray:
    """RGB uint8 -> the same image after the dataset's JPEG encoding (what reading its file gives)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG image")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def colour_twins() -> Dict[int, int]:
    """Kind id (1-10) -> the other kind whose hue family is nearest (circular distance in degrees): the kind
    that only shape and texture tell apart from it (:file:`classes/shapes.json`)."""
    hues = [c["color"]["hue"] for c in load_shapes_classes()["classes"]]

    def distance(a: float, b: float) -> float:
        d = abs(a - b) % 360.0
        return min(d, 360.0 - d)

    return {i + 1: 1 + min((j for j in range(len(hues)) if j != i), key=lambda j: distance(hues[i], hues[j]))
            for i in range(len(hues))}


def swapped_caption(record: Dict[str, Any], image_size: int, caption_rng_state: Dict[str, Any],
                    rng: np.random.Generator, twins: Dict[int, int]) -> str:
    """The caption of ``record`` with one visible kind (chosen by ``rng``) renamed to its colour twin, written
    with the template, order and attribute choices of the true caption (``caption_rng_state``: the state of
    its generator before it was captioned). An image with no visible kind keeps its caption."""
    visible = sorted(visible_classes(record, image_size))
    swapped = copy.deepcopy(record)
    if visible:
        kind = visible[int(rng.integers(len(visible)))]
        for inst in swapped["instances"]:
            if int(inst["class"]) == kind:
                inst["class"] = twins[kind]
    caption_rng = np.random.default_rng()
    caption_rng.bit_generator.state = caption_rng_state
    return caption_shapes_image(swapped, image_size, caption_rng)[0]


def draw_batch(indices: Sequence[int], split: str, seed: int, image_size: int, num_classes: int,
               random_hue_probability: float = 0.0, negatives: Optional[List[str]] = None,
               classes_file: Optional[str] = None) -> Tuple[Tensor, Tensor, List[str], Tensor]:
    """Images ``indices`` of a shapes split, drawn in memory exactly as the dataset files would be (with
    ``random_hue_probability`` > 0, the pretraining images: instances recoloured at random, see
    :func:`render_shapes_image`).

    Returns ``(images B x 3 x H x W uint8, labels B x H x W uint8, captions, tags B x ALL_KINDS float)``;
    ``tags[:, 0]`` (background) is 1, ``tags[:, k]`` is 1 when the caption names kind ``k``. When a list is
    given as ``negatives``, one name-swapped caption per image (:func:`swapped_caption`) is appended to it;
    the returned values do not depend on it. ``classes_file``: another class table of the generator (the same
    layouts and labels drawn with, e.g., other textures; evaluation only).
    """
    names = vocabulary()
    twins = colour_twins() if negatives is not None else {}
    images, labels, captions, tags = [], [], [], torch.zeros(len(indices), ALL_KINDS)
    for row, i in enumerate(indices):
        record: Dict[str, Any] = {}
        image, label = render_shapes_image(_image_rng(seed, split, i), image_size, num_classes,
                                           guaranteed_class=1 + i % (num_classes - 1), record=record,
                                           random_hue_probability=random_hue_probability,
                                           classes_file=classes_file)
        caption_rng = np.random.default_rng([seed, zlib.crc32(f"{split}/caption".encode()), i])
        state = copy.deepcopy(caption_rng.bit_generator.state)
        caption, caption_tags = caption_shapes_image(record, image_size, caption_rng)
        if negatives is not None:
            swap_rng = np.random.default_rng([seed, zlib.crc32(f"{split}/swap".encode()), i])
            negatives.append(swapped_caption(record, image_size, state, swap_rng, twins))
        images.append(torch.from_numpy(jpeg_roundtrip(image)).permute(2, 0, 1))
        labels.append(torch.from_numpy(label))
        captions.append(caption)
        tags[row, 0] = 1.0
        for name in caption_tags:
            tags[row, names.index(name)] = 1.0
    return torch.stack(images), torch.stack(labels), captions, tags


def region_tags(labels: Tensor, cell: int, min_fraction: float) -> Tensor:
    """Which kinds are visible in each ``cell x cell`` pixel square of the image (region tags).

    labels: ``B x H x W`` class ids (0 background, 1-10 the kinds; H, W multiples of ``cell``). Returns
    ``B x H/cell x W/cell x ALL_KINDS`` float: 1 where the kind covers at least ``min_fraction`` of the cell.
    These are the tags a caption of the cell would carry (as region captions, e.g. Visual Genome's, give a
    real vision-language model), not a pixel mask: they say what is in a 32 px square, not where.
    """
    one_hot = F.one_hot(labels.long(), ALL_KINDS).permute(0, 3, 1, 2).float()  # B x K x H x W
    fractions = F.avg_pool2d(one_hot, cell)  # B x K x H/cell x W/cell
    return (fractions >= min_fraction).float().permute(0, 2, 3, 1)

