"""Pascal VOC 2012 + SBD (``train_aug``), 21 classes, as written by ``datasets/prepare_voc.py``::

    VOC2012/JPEGImages/<id>.jpg                                  (link to the VOC archive's folder)
    VOC2012/SegmentationClassAug/<id>.png                        index PNGs, train_aug + val
    VOC2012/ImageSets/Segmentation/{train_aug,train,val}.txt     10,582 / 1,464 / 1,449 ids

Names: ``voc_train`` (train_aug), ``voc_val`` and the paper splits ``voc_{count}_seed{seed}_{labeled,unlabeled}``,
whose labeled images are drawn from the 1,464 fine ``train`` images (:mod:`.builtin`).
"""
from .builtin import BuiltinDataset, DatasetPart, define_builtin_dataset, register_builtin_dataset

VOC = define_builtin_dataset(BuiltinDataset(
    "voc", "Pascal VOC 2012 + SBD", "VOC2012", "python datasets/prepare_voc.py --src DOWNLOADS",
    DatasetPart("JPEGImages", "SegmentationClassAug", ".jpg", ".png", "ImageSets/Segmentation/train_aug.txt"),
    DatasetPart("JPEGImages", "SegmentationClassAug", ".jpg", ".png", "ImageSets/Segmentation/val.txt"),
    split_counts=(92, 183, 366, 732, 1464),  # from the 1,464 fine images
    pool_list="ImageSets/Segmentation/train.txt",
))

register_builtin_dataset(VOC.name)  # lazy: nothing is read until DatasetCatalog.get
