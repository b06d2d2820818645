"""detectron2's ``SemSegEvaluator`` with a NumPy-2-safe label loader.

detectron2's default ``load_image_into_numpy_array`` calls ``np.array(..., copy=False)``, which raises
under NumPy 2 whenever a copy is needed (always, for PIL images). The project stays on NumPy 2 and passes
its own ``sem_seg_loading_fn`` instead: the label PNG is read with PIL as class indices (palette PNGs give
their indices, never colours) into a fresh, writable array. The loader also rejects multi-channel labels
and values outside ``[0, K)`` other than the ignore label (which would otherwise corrupt the confusion
matrix silently or fail with an opaque reshape error), and ``process`` checks that each prediction has the
size of its input's ``height`` x ``width``. The metrics are detectron2's unchanged: mIoU, fwIoU, mACC,
pACC, per-class IoU / ACC (and boundary IoU), under ``results["sem_seg"]``.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
from PIL import Image

from detectron2.evaluation import DatasetEvaluators, SemSegEvaluator
from detectron2.utils.file_io import PathManager

from ..data.validation import check_label_values
from .alignment import PixelTextAlignmentEvaluator

__all__ = ["load_sem_seg_indices", "HVLSemSegEvaluator", "build_sem_seg_evaluator"]


def load_sem_seg_indices(filename: str, dtype: Optional[Union[np.dtype, str, type]] = int) -> np.ndarray:
    """Read a single-channel label PNG as a writable ``H x W`` array of class indices."""
    with PathManager.open(filename, "rb") as f:
        img = Image.open(f)
        img.load()
    if len(img.getbands()) != 1:
        raise ValueError(
            f"Label file {filename} has {len(img.getbands())} channels (PIL mode {img.mode!r}); expected a "
            f"single-channel map of class indices."
        )
    return np.array(img, dtype=dtype)  # np.array copies: writable under NumPy 1 and 2


class HVLSemSegEvaluator(SemSegEvaluator):
    """``SemSegEvaluator`` reading ground truth with :func:`load_sem_seg_indices` (NumPy-2 safe)."""

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: Optional[str] = None, *,
                 sem_seg_loading_fn=None, validate_labels: bool = True):
        super().__init__(
            dataset_name,
            distributed=distributed,
            output_dir=output_dir,
            sem_seg_loading_fn=sem_seg_loading_fn or load_sem_seg_indices,
        )
        if validate_labels:
            base_fn = self.sem_seg_loading_fn
            num_classes, ignore = self._num_classes, self._ignore_label

            def checked(filename, dtype=int):
                gt = base_fn(filename, dtype=dtype)
                check_label_values(gt, num_classes, ignore, filename)
                return gt

            self.sem_seg_loading_fn = checked

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            pred = out["sem_seg"] if isinstance(out, dict) else out
            if "height" in inp and "width" in inp:
                expected = (int(inp["height"]), int(inp["width"]))
                if tuple(pred.shape[-2:]) != expected:
                    raise ValueError(
                        f"Prediction for {inp.get('file_name')} has size {tuple(pred.shape[-2:])} (H, W) but the "
                        f"input is {expected}; predictions must be resized to the original image size."
                    )
        super().process(inputs, [o if isinstance(o, dict) else {"sem_seg": o} for o in outputs])


def build_sem_seg_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None):
    """The semantic-segmentation evaluator of ``dataset_name`` (output under ``cfg.OUTPUT_DIR/inference``).

    With ``TEST.PIXEL_TEXT_ALIGNMENT`` on, a ``DatasetEvaluators`` of it and the
    :class:`~hvlformer.evaluation.alignment.PixelTextAlignmentEvaluator` (supplement eq. 10).
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    evaluator = HVLSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
    if cfg.TEST.get("PIXEL_TEXT_ALIGNMENT", False):
        return DatasetEvaluators([evaluator, PixelTextAlignmentEvaluator(distributed=True)])
    return evaluator
