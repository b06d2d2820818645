"""The library of ``tools/pretrain_tiny_clip.py``: the project's tiny CLIP, pretrained from scratch on
synthetic ``shapes`` image-caption pairs (the losses and the evaluation are described in that tool's docstring),
one file per concept:

* :mod:`.data`: the image-caption batches, drawn in memory exactly as the dataset files would be, and region tags;
* :mod:`.pretrainer`: the open_clip model wrapper and its losses (clip, tag, dense, region, swap, names);
* :mod:`.evaluation`: dense zero-shot mIoU, presence AUROC and the twin patch probe of a checkpoint;
* :mod:`.training`: the training loop, its learning-rate schedule, fp16 checkpoints and their weights digest.

Tools and tests import the package (``import tiny_clip_pretraining as tiny``; ``tools/`` is on ``sys.path`` when a
tool runs), not the command line ``tools/pretrain_tiny_clip.py``.
"""

from .data import (ALL_KINDS, PLAIN_TEMPLATE, SEG_CLASSES, colour_twins, draw_batch, region_tags, swapped_caption,
                   vocabulary)
from .evaluation import TWIN_PAIRS, auroc, evaluate, linear_probe_accuracy, pure_patch_owners, twin_patch_probe
from .pretrainer import PIXEL_MEAN, PIXEL_STD, TinyClipPretrainer, cell_pooled, gwrp
from .training import MODEL_NAME, build_model, param_groups, save_checkpoint, train, warmup_cosine_lr, weights_digest

__all__ = ["ALL_KINDS", "PLAIN_TEMPLATE", "SEG_CLASSES", "colour_twins", "draw_batch", "region_tags", "swapped_caption",
           "vocabulary", "TWIN_PAIRS", "auroc", "evaluate", "linear_probe_accuracy", "pure_patch_owners",
           "twin_patch_probe", "PIXEL_MEAN", "PIXEL_STD", "TinyClipPretrainer", "cell_pooled", "gwrp", "MODEL_NAME",
           "build_model", "param_groups", "save_checkpoint", "train", "warmup_cosine_lr", "weights_digest"]
