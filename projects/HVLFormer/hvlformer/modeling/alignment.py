"""Pixel-text alignment of the HVLFormer supplement (section A.5, eq. 10): its computation.

    S = 1/(E K) sum_e sum_k 1/(H W) sum_p cos(q_k^e, Z_pixel^p)

``q_k^e`` are the textual queries after PTRM (the ones the transformer decoder receives, ``B x E x K x D``)
and ``Z_pixel`` the per-pixel embedding (the pixel decoder's ``mask_features``, ``B x D x H/4 x W/4``).
The model computes it at inference (``TEST.PIXEL_TEXT_ALIGNMENT``) from the same forward pass as the class
scores; :class:`hvlformer.evaluation.alignment.PixelTextAlignmentEvaluator` averages it over a dataset.

Decisions:

- The score is reported **per query level** ``e`` (level 1 is the coarsest, the one PTRM pairs with the
  stride-32 pixel features); the evaluator adds their mean (eq. 10's ``S``).
- Only the pixels of the image count: the cells of ``Z_pixel`` that lie in the batch padding are left out
  (:func:`valid_cells`). In sliding-window inference the score is computed per window (again without
  padding) and the windows of an image are averaged with equal weights.
- Zero queries (SRE ``threshold`` mode drops absent classes) have cosine 0 with every pixel and stay in the
  mean over ``k``, as in eq. 10.
- Because the mean of cosines is linear in the normalised vectors, ``S_e = <mean_k q^_k^e, mean_p Z^_p>``:
  the cost is ``O((K + HW) D)``, not ``O(K HW D)``.
- ``MODEL.SEM_SEG_HEAD.MASK_DIM`` must equal ``MODEL.HVLFORMER.HIDDEN_DIM`` (both 256 in the paper);
  otherwise the cosine is undefined and a ``ValueError`` says so.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pixel_text_alignment", "valid_cells", "ALIGNMENT_KEY"]

#: Key of the per-image alignment (``E`` values) in the model's inference outputs.
ALIGNMENT_KEY = "pixel_text_alignment"


def valid_cells(valid_size: Tuple[float, float], input_size: Tuple[int, int], feature_size: Tuple[int, int]) -> Tuple[int, int]:
    """Rows and columns of a ``feature_size`` map (of a padded ``input_size`` input) that cover ``valid_size``."""
    rows = min(feature_size[0], max(1, math.ceil(valid_size[0] * feature_size[0] / input_size[0])))
    cols = min(feature_size[1], max(1, math.ceil(valid_size[1] * feature_size[1] / input_size[1])))
    return rows, cols


def pixel_text_alignment(queries: Tensor, pixel_embeddings: Tensor,
                         valid_sizes: Optional[Sequence[Tuple[int, int]]] = None) -> Tensor:
    """Eq. 10 per image and query level.

    Args:
        queries: ``B x E x K x D`` textual queries (PTRM output).
        pixel_embeddings: ``B x D x h x w`` per-pixel embeddings (``mask_features``).
        valid_sizes: per image, the ``(rows, cols)`` of the embedding map that belong to the image (the
            rest is batch padding); ``None`` uses the whole map.
    Returns:
        ``B x E`` mean cosine similarities (float32).
    """
    if queries.dim() != 4 or pixel_embeddings.dim() != 4:
        raise ValueError(f"expected queries B x E x K x D and pixel embeddings B x D x h x w, got "
                         f"{tuple(queries.shape)} and {tuple(pixel_embeddings.shape)}")
    if queries.shape[-1] != pixel_embeddings.shape[1]:
        raise ValueError(
            f"pixel-text alignment needs queries and pixel embeddings of the same width, got D = "
            f"{queries.shape[-1]} (MODEL.HVLFORMER.HIDDEN_DIM) and {pixel_embeddings.shape[1]} "
            f"(MODEL.SEM_SEG_HEAD.MASK_DIM); set them equal to use TEST.PIXEL_TEXT_ALIGNMENT")
    if queries.shape[0] != pixel_embeddings.shape[0]:
        raise ValueError(f"batch sizes differ: {queries.shape[0]} queries, {pixel_embeddings.shape[0]} pixel maps")
    q = F.normalize(queries.float(), dim=-1).mean(dim=2)  # B x E x D: mean over classes of unit queries
    z = F.normalize(pixel_embeddings.float(), dim=1)  # B x D x h x w
    scores = []
    for i in range(z.shape[0]):
        zi = z[i]
        if valid_sizes is not None:
            rows, cols = valid_sizes[i]
            zi = zi[:, : max(int(rows), 1), : max(int(cols), 1)]
        scores.append(q[i] @ zi.flatten(1).mean(dim=1))  # E
    return torch.stack(scores)
