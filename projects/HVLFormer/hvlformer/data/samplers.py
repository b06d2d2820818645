"""Sampling of the labeled set in semi-supervised training (paper Sec. 4.1): the labeled list repeated to
the unlabeled length, and DAFormer's rare-class sampling (``SEMI.RARE_CLASS_SAMPLING``) with the per-image
class pixel counts it needs.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from detectron2.utils import comm
from torch.utils.data import Sampler

from .validation import read_label_checked

logger = logging.getLogger(__name__)

__all__ = ["repeat_to_length", "class_pixel_counts", "rare_class_probabilities", "RareClassSampler"]


def repeat_to_length(dataset_dicts: List[Dict], length: int) -> List[Dict]:
    """The labeled list repeated (whole copies) and cut to ``length`` (the unlabeled length), so one
    epoch is one pass over the unlabeled set. Shorter targets than the list keep the whole list."""
    if not dataset_dicts:
        raise ValueError("the labeled dataset is empty")
    if length <= len(dataset_dicts):
        return list(dataset_dicts)
    repeats = math.ceil(length / len(dataset_dicts))
    return (list(dataset_dicts) * repeats)[:length]


def class_pixel_counts(dataset_dicts: List[Dict], num_classes: int, ignore_label: int = 255,
                       cache_file: Optional[str] = None) -> np.ndarray:
    """``N x K`` pixel count of every class in every labeled image (cached as JSON when a path is given)."""
    if cache_file and Path(cache_file).is_file():
        cached = json.loads(Path(cache_file).read_text())
        if cached.get("files") == [d["sem_seg_file_name"] for d in dataset_dicts] and cached["num_classes"] == num_classes:
            return np.asarray(cached["counts"], dtype=np.int64)
    counts = np.zeros((len(dataset_dicts), num_classes), dtype=np.int64)
    for index, record in enumerate(dataset_dicts):
        label = read_label_checked(record["sem_seg_file_name"], num_classes, ignore_label)
        valid = label[label != ignore_label]
        counts[index] = np.bincount(valid.ravel(), minlength=num_classes)[:num_classes]
    if cache_file:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        Path(cache_file).write_text(json.dumps({"num_classes": num_classes, "counts": counts.tolist(),
                                                "files": [d["sem_seg_file_name"] for d in dataset_dicts]}))
    return counts


def rare_class_probabilities(counts: np.ndarray, temperature: float = 0.01, min_pixels: int = 3000
                             ) -> Tuple[np.ndarray, List[np.ndarray]]:
    """DAFormer's rare-class sampling: ``P(c) = softmax((1 - f_c) / T)`` over the classes that have at
    least one image with ``>= min_pixels`` pixels of them (``f_c``: the class's share of all labeled
    pixels); returns (``K`` probabilities, per class the indices of its eligible images)."""
    frequency = counts.sum(axis=0) / max(int(counts.sum()), 1)
    eligible = [np.flatnonzero(counts[:, c] >= min_pixels) for c in range(counts.shape[1])]
    logits = (1.0 - frequency) / temperature
    logits = np.where([len(e) > 0 for e in eligible], logits, -np.inf)
    if not np.isfinite(logits).any():
        raise ValueError(f"rare-class sampling: no image has {min_pixels} pixels of any class; lower "
                         "SEMI.RARE_CLASS_SAMPLING.MIN_PIXELS")
    logits = logits - logits[np.isfinite(logits)].max()
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(), eligible


class RareClassSampler(Sampler):
    """Infinite sampler: draw a class with :func:`rare_class_probabilities`, then a uniform image that
    contains it. Every process draws the same stream and keeps every ``world_size``-th index."""

    def __init__(self, counts: np.ndarray, temperature: float = 0.01, min_pixels: int = 3000,
                 seed: Optional[int] = None) -> None:
        self.probabilities, self.eligible = rare_class_probabilities(counts, temperature, min_pixels)
        self.seed = int(comm.shared_random_seed()) if seed is None else int(seed)
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seed)
        position = 0
        while True:
            cls = rng.choice(len(self.probabilities), p=self.probabilities)
            index = int(rng.choice(self.eligible[cls]))
            if position % self.world_size == self.rank:
                yield index
            position += 1
