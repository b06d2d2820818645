"""COCO 2017 with 81 classes (background + the 80 thing classes), as written by ``datasets/prepare_coco.py``::

    coco/images/{train2017,val2017}/<id>.jpg                     (links)
    coco/annotations_semseg81/{train2017,val2017}/<id>.png       0 background, 1..80 things, 255 crowd

Names: ``coco81_train``, ``coco81_val`` and the paper splits ``coco81_{count}_seed{seed}_{labeled,unlabeled}``
(:mod:`.builtin`).
"""
from .builtin import BuiltinDataset, DatasetPart, define_builtin_dataset, register_builtin_dataset

COCO81 = define_builtin_dataset(BuiltinDataset(
    "coco81", "COCO 2017 (81 classes)", "coco", "python datasets/prepare_coco.py --src DOWNLOADS",
    DatasetPart("images/train2017", "annotations_semseg81/train2017", ".jpg", ".png"),
    DatasetPart("images/val2017", "annotations_semseg81/val2017", ".jpg", ".png"),
    split_counts=(232, 463, 925, 1849, 3697),  # 1/512 .. 1/32 of 118,287
))

register_builtin_dataset(COCO81.name)  # lazy: nothing is read until DatasetCatalog.get
