"""CutMix of the strong unlabeled view (paper Sec. 4.1, UniMatch V2 protocol): box sampling, the image mix
and the label mix in one place.

The three steps run in three places of a semi-supervised step: the unlabeled dataset mapper draws one box
per image (:func:`sample_cutmix_box`, with the mapper's ``np.random``), the training step pastes inside it
the pixels of another image of the batch (:func:`apply_cutmix`, by default the batch reversed), and CMCR
gives the pasted region the pseudo-labels of the image it came from (:func:`mix_spatial`, the same
operation on label maps at any resolution). Keeping them together keeps the box convention (True = pasted)
and the source order in one definition. This module sits outside ``data/`` and ``modeling/`` so that
neither depends on the other for it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["sample_cutmix_box", "reversed_order", "mix_spatial", "apply_cutmix"]


def _uniform(low: float, high: float) -> float:
    return float(np.random.uniform(low, high))


def sample_cutmix_box(height: int, width: int, prob: float = 0.5, area: Sequence[float] = (0.02, 0.4),
                      aspect: Sequence[float] = (0.3, 1 / 0.3)) -> Tensor:
    """``H x W`` bool box mask: with probability ``prob`` a box of ``U(area)`` of the image with aspect
    ratio (h / w) ``U(aspect)`` at a uniform position (clipped to the image); else all False.

    Draws from ``np.random`` (seeded per data-loader worker by detectron2)."""
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


def reversed_order(batch_size: int, device: Optional[torch.device] = None) -> Tensor:
    """The default source of every box: image ``B - 1 - i`` for image ``i`` (``B`` long)."""
    return torch.arange(batch_size - 1, -1, -1, device=device)


def mix_spatial(tensor: Tensor, box: Tensor, order: Tensor) -> Tensor:
    """``tensor[i]`` outside ``box[i]``, ``tensor[order[i]]`` inside.

    tensor: ``B x ... x h x w`` (images, label maps, confidences); box: ``B x h x w`` bool, already at the
    tensor's resolution; order: ``B`` long, the image each box's content comes from."""
    box = box.reshape(box.shape[0], *([1] * (tensor.dim() - 3)), *box.shape[-2:])
    return torch.where(box, tensor[order], tensor)


def apply_cutmix(images: Tensor, boxes: Tensor, order: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Paste, inside ``boxes[i]``, the pixels of image ``order[i]`` (default :func:`reversed_order`).

    images: ``B x C x H x W``; boxes: ``B x H x W`` bool (moved to the images' device). Returns
    ``(mixed images, order)``; pass ``order`` to :func:`mix_spatial` to mix the matching labels."""
    if order is None:
        order = reversed_order(images.shape[0], images.device)
    return mix_spatial(images, boxes.to(images.device), order), order
