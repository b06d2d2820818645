"""Label maps at a prediction's resolution."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor

__all__ = ["downsample_labels"]


def downsample_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """``B x H x W`` integer labels -> ``B x h x w`` long: the label at the centre of each cell.

    A prediction at stride ``s`` holds cell ``i`` for the pixels ``[s*i, s*(i+1))``: Mask2Former's point sampling
    and the bilinear upsampling of inference (``align_corners=False``) put its value at the cell's centre. So
    the target of the cell is the label there (``mode="nearest-exact"``, pixel ``floor((i + 0.5) * s)``), not the
    label of its first pixel (``mode="nearest"``, pixel ``s*i``), which moves every target ``(s - 1) / 2`` pixels
    towards the top-left of the prediction (1.5 px at stride 4, 7.5 px at stride 16). One label per cell, not a
    majority vote: an ignore label (255) stays ignored, and the thesis downsamples its ground truth this way
    before the one-hot encoding (chapter 3, Fig. 3.5; chapter 4, eq. 4.1).
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0].long()
