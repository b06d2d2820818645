"""Label-map helpers shared by the thesis modules (CAA's affinity targets, ECAC's class centres)."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["downsample_labels"]


def downsample_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of ``B x H x W`` integer labels to ``size`` = ``(h, w)``: ``B x h x w`` long.

    Nearest (not a majority vote): the thesis downsamples the ground truth before the one-hot encoding
    (chapter 3, Fig. 3.5; chapter 4, eq. 4.1), and an ignore pixel stays ignored.
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
