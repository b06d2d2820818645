"""Evaluation: detectron2's semantic-segmentation metrics with a NumPy-2-safe label loader."""
from .alignment import PixelTextAlignmentEvaluator, pixel_text_alignment
from .sem_seg_evaluation import HVLSemSegEvaluator, build_sem_seg_evaluator, load_sem_seg_indices

__all__ = ["HVLSemSegEvaluator", "build_sem_seg_evaluator", "load_sem_seg_indices", "PixelTextAlignmentEvaluator",
           "pixel_text_alignment"]
