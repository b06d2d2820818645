"""Pixel-text alignment of the HVLFormer supplement (section A.5, eq. 10) as an evaluator.

    S = 1/(E K) sum_e sum_k 1/(H W) sum_p cos(q_k^e, Z_pixel^p)

``q_k^e`` are the textual queries after PTRM (the ones the transformer decoder receives, ``B x E x K x D``)
and ``Z_pixel`` the per-pixel embedding (the pixel decoder's ``mask_features``, ``B x D x H/4 x W/4``).
Decisions:

- The score is reported **per query level** ``e`` (``level_1`` .. ``level_E``; level 1 is the coarsest, the
  one PTRM pairs with the stride-32 pixel features) and as their mean (``mean`` = eq. 10's ``S``).
- Only the pixels of the image count: the cells of ``Z_pixel`` that lie in the batch padding are left out.
  In sliding-window inference the score is computed per window (again without padding) and the windows of
  an image are averaged with equal weights.
- Zero queries (SRE ``threshold`` mode drops absent classes) have cosine 0 with every pixel and stay in the
  mean over ``k``, as in eq. 10.
- Because the mean of cosines is linear in the normalised vectors, ``S_e = <mean_k q^_k^e, mean_p Z^_p>``:
  the cost is ``O((K + HW) D)``, not ``O(K HW D)``.
- The per-image values are averaged over the dataset with equal weight per image (distributed-safe:
  gathered to the main process with :func:`detectron2.utils.comm.gather`).

It needs ``TEST.PIXEL_TEXT_ALIGNMENT True``: the model then adds ``"pixel_text_alignment"`` (a tensor of
``E`` values) to each image's inference output, and :func:`build_sem_seg_evaluator` combines this evaluator
with the mIoU one. ``MODEL.SEM_SEG_HEAD.MASK_DIM`` must equal ``MODEL.HVLFORMER.HIDDEN_DIM`` (both 256 in
the paper); otherwise the cosine is undefined and a ``ValueError`` says so.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from torch import Tensor

__all__ = ["pixel_text_alignment", "valid_cells", "PixelTextAlignmentEvaluator", "ALIGNMENT_KEY"]

#: Key of the per-image alignment (``E`` values) in the model's inference outputs.
ALIGNMENT_KEY = "pixel_text_alignment"
logger = logging.getLogger(__name__)


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


class PixelTextAlignmentEvaluator(DatasetEvaluator):
    """Dataset mean of the per-image, per-level pixel-text alignment (eq. 10) found in the model outputs.

    ``evaluate()`` returns ``{"pixel_text_alignment": {"mean": S, "level_1": S_1, ..., "num_images": n}}``
    on the main process (``None`` on the others). Cosine similarities, in ``[-1, 1]`` (not percent).
    """

    def __init__(self, distributed: bool = True) -> None:
        self._distributed = distributed
        self._values: List[Tensor] = []

    def reset(self) -> None:
        self._values = []

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            if not isinstance(out, dict) or ALIGNMENT_KEY not in out:
                name = inp.get("file_name", "an image") if isinstance(inp, dict) else "an image"
                raise ValueError(
                    f"the model output for {name} has no {ALIGNMENT_KEY!r}: build the model with "
                    f"TEST.PIXEL_TEXT_ALIGNMENT True (the same config as the evaluator)")
            self._values.append(torch.as_tensor(out[ALIGNMENT_KEY]).detach().to("cpu", torch.float64).flatten())

    def evaluate(self) -> Optional[Dict[str, Dict[str, float]]]:
        values = self._values
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(values, dst=0)
            if not comm.is_main_process():
                return None
            values = list(itertools.chain(*gathered))
        if not values:
            logger.warning("PixelTextAlignmentEvaluator received no images")
            return None
        levels = {v.numel() for v in values}
        if len(levels) != 1:
            raise ValueError(f"images have different numbers of query levels: {sorted(levels)}")
        per_level = torch.stack(values).mean(dim=0)
        result: "OrderedDict[str, float]" = OrderedDict()
        result["mean"] = float(per_level.mean())
        for e, value in enumerate(per_level.tolist(), start=1):
            result[f"level_{e}"] = float(value)
        result["num_images"] = len(values)
        return {ALIGNMENT_KEY: result}
