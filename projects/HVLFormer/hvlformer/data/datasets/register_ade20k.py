"""ADE20K SceneParsing (150 classes), as written by ``datasets/prepare_ade20k.py``::

    ADEChallengeData2016/images/{training,validation}/*.jpg      (link)
    ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png   0..149, 255 ignore

Names: ``ade20k_train``, ``ade20k_val`` and the paper splits ``ade20k_{count}_seed{seed}_{labeled,unlabeled}``
(:mod:`.builtin`).
"""
from .builtin import BuiltinDataset, DatasetPart, define_builtin_dataset, register_builtin_dataset

ADE20K = define_builtin_dataset(BuiltinDataset(
    "ade20k", "ADE20K SceneParsing", "ADEChallengeData2016", "python datasets/prepare_ade20k.py --src DOWNLOADS",
    DatasetPart("images/training", "annotations_detectron2/training", ".jpg", ".png"),
    DatasetPart("images/validation", "annotations_detectron2/validation", ".jpg", ".png"),
    split_counts=(158, 316, 632, 1263, 2526),  # 1/128 .. 1/8 of 20,210
))

register_builtin_dataset(ADE20K.name)  # lazy: nothing is read until DatasetCatalog.get
