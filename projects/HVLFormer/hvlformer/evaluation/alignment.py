"""Pixel-text alignment of the HVLFormer supplement (section A.5, eq. 10) as an evaluator.

The per-image values are computed by the model (:mod:`hvlformer.modeling.alignment`, where the decisions
about padding, sliding windows and zero queries are); this module averages them over a dataset.

Decisions:

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
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from torch import Tensor

from ..modeling.alignment import ALIGNMENT_KEY, pixel_text_alignment, valid_cells

__all__ = ["pixel_text_alignment", "valid_cells", "PixelTextAlignmentEvaluator", "ALIGNMENT_KEY"]

logger = logging.getLogger(__name__)


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
