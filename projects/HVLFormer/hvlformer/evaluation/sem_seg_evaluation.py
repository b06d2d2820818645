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
import torch
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
        """``inputs``: dataset dicts (``file_name``, ``sem_seg_file_name``, ``height``, ``width``);
        ``outputs``: per input ``{"sem_seg": K x H x W}`` class scores (or the tensor itself; a NumPy array is
        accepted), at the input's ``height`` x ``width``. Anything else is a ``ValueError`` saying what is
        expected (an ``H x W`` label map used to fail with a NumPy broadcast error)."""
        checked = []
        for inp, out in zip(inputs, outputs):
            pred = out["sem_seg"] if isinstance(out, dict) else out
            name = inp.get("file_name", "an input")
            if isinstance(pred, np.ndarray):
                pred = torch.from_numpy(np.array(pred))
            if not isinstance(pred, torch.Tensor):
                raise ValueError(f"Prediction for {name} is a {type(pred).__name__}; expected a K x H x W tensor "
                                 f"of class scores (outputs[i]['sem_seg'] of the model)")
            if pred.ndim != 3 or pred.shape[0] != self._num_classes:
                hint = (" It looks like a label map: pass the K x H x W scores, or one-hot encode the labels "
                        "(torch.nn.functional.one_hot(labels, K).permute(2, 0, 1))." if pred.ndim == 2 else "")
                raise ValueError(
                    f"Prediction for {name} has shape {tuple(pred.shape)}; HVLSemSegEvaluator.process expects "
                    f"K x H x W class scores with K = {self._num_classes} (the classes of "
                    f"{self._dataset_name}), whose argmax over K is the label.{hint}")
            if "height" in inp and "width" in inp:
                expected = (int(inp["height"]), int(inp["width"]))
                if tuple(pred.shape[-2:]) != expected:
                    raise ValueError(
                        f"Prediction for {name} has size {tuple(pred.shape[-2:])} (H, W) but the "
                        f"input is {expected}; predictions must be resized to the original image size."
                    )
            checked.append(dict(out, sem_seg=pred) if isinstance(out, dict) else {"sem_seg": pred})
        super().process(inputs, checked)


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
