"""Cityscapes (gtFine, 19 train ids), as written by ``datasets/prepare_cityscapes.py``::

    cityscapes/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png  (link)
    cityscapes/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png           0..18, 255 ignore

Names: ``cityscapes_train``, ``cityscapes_val`` and the paper splits
``cityscapes_{count}_seed{seed}_{labeled,unlabeled}`` (:mod:`.builtin`).
"""
from .builtin import BuiltinDataset, DatasetPart, define_builtin_dataset, register_builtin_dataset

CITYSCAPES = define_builtin_dataset(BuiltinDataset(
    "cityscapes", "Cityscapes (gtFine)", "cityscapes", "python datasets/prepare_cityscapes.py --src DOWNLOADS",
    DatasetPart("leftImg8bit/train", "gtFine/train", "_leftImg8bit.png", "_gtFine_labelTrainIds.png"),
    DatasetPart("leftImg8bit/val", "gtFine/val", "_leftImg8bit.png", "_gtFine_labelTrainIds.png"),
    split_counts=(100, 186, 372, 744, 1488),  # 1/30 .. 1/2 of 2,975
))

register_builtin_dataset(CITYSCAPES.name)  # lazy: nothing is read until DatasetCatalog.get
