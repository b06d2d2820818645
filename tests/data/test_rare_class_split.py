"""``DATASETS.SHAPES.RARE_CLASS``: a labeled split in which one class shows in at most N images."""
import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from conftest import make_tiny_cfg
from hvlformer.data import register_shapes_semi_split

SPLIT = ["DATASETS.SHAPES.NUM_TRAIN", "40", "DATASETS.SHAPES.NUM_LABELED", "12", "DATASETS.SHAPES.SEED", "3"]


def _split(*opts):
    register_shapes_semi_split(make_tiny_cfg(*SPLIT, *opts))
    return ([r["sem_seg_file_name"] for r in DatasetCatalog.get("shapes_labeled")],
            [r["hidden_sem_seg_file_name"] for r in DatasetCatalog.get("shapes_unlabeled")])


def _showing(files, label):
    return sum(bool((np.asarray(Image.open(f)) == label).any()) for f in files)


def test_the_rare_class_shows_in_exactly_the_asked_number_of_labeled_images():
    plain_labeled, plain_unlabeled = _split()
    star = 4  # background, circle, square, triangle, star, cross
    assert _showing(plain_labeled, star) > 2  # the plain split is not already rare (else the test says nothing)
    for limit in (0, 2):
        labeled, unlabeled = _split("DATASETS.SHAPES.RARE_CLASS", "star", "DATASETS.SHAPES.RARE_CLASS_LABELED_IMAGES",
                                    str(limit))
        assert len(labeled) == 12 and _showing(labeled, star) == limit
        assert set(labeled).isdisjoint(unlabeled) and set(labeled) | set(unlabeled) == set(plain_labeled) | set(plain_unlabeled)
        # the images without the class keep the plain split's seeded order: its first ones are all still taken
        kept = [f for f in plain_labeled if not (np.asarray(Image.open(f)) == star).any()]
        assert set(kept) <= set(labeled)


def test_an_unknown_rare_class_is_a_clear_error():
    with pytest.raises(ValueError, match="RARE_CLASS='hexagon' is not a shape class"):
        _split("DATASETS.SHAPES.RARE_CLASS", "hexagon")


def test_the_rare_class_split_reads_the_label_files_once(monkeypatch):
    import hvlformer.data.datasets.register_shapes as register_shapes

    reads = []
    read = register_shapes.read_label_checked
    monkeypatch.setattr(register_shapes, "read_label_checked", lambda *a: reads.append(a[0]) or read(*a))
    first = _split("DATASETS.SHAPES.RARE_CLASS", "star")
    assert reads and len(reads) == len(set(reads))  # the walk reads each image it passes once
    walked = len(reads)
    assert (first[0], first[1]) == ([r["sem_seg_file_name"] for r in DatasetCatalog.get("shapes_labeled")],
                                    [r["hidden_sem_seg_file_name"] for r in DatasetCatalog.get("shapes_unlabeled")])
    assert len(reads) == walked  # two more fetches of both splits read nothing again
