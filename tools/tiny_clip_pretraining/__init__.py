"""The library of ``tools/pretrain_tiny_clip.py``: the project's tiny CLIP, pretrained from scratch on
synthetic ``shapes`` image-caption pairs (the losses and the evaluation are described in that tool's docstring),
one file per concept:

* :mod:`.data`: the image-caption batches, drawn in memory exactly as the dataset files would be, and region tags;
* :mod:`.pretrainer`: the open_clip model wrapper and its losses (clip, tag, dense, region, swap, names);
* :mod:`.evaluation`: dense zero-shot mIoU, presence AUROC and the twin patch probe of a checkpoint;
* :mod:`.training`: the training loop, its learning-rate schedule, fp16 checkpoints and their weights digest.
"""
