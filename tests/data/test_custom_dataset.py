"""A user's own semi-supervised dataset, registered from the config alone (DATASETS.CUSTOM)."""
import argparse
import json

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import TINY_SEMI_CONFIG
from hvlformer import setup_cfg
from hvlformer.data import generate_shapes_split
from hvlformer.engine.trainer import Trainer


@pytest.fixture()
def folder_dataset(tmp_path):
    records = generate_shapes_split(tmp_path / "gen", "train", num_images=6, image_size=32, num_classes=3, seed=0)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(["background", "circle", "square"]))
    names = [r["file_name"].split("/")[-1] for r in records]
    (tmp_path / "labeled.txt").write_text("\n".join(names[:2]) + "\n")
    (tmp_path / "val.txt").write_text(names[5] + "\n")
    return tmp_path, names


def _cfg(tmp_path, **custom):
    opts = []
    for key, value in custom.items():
        opts += [f"DATASETS.CUSTOM.{key}", value]
    return setup_cfg(argparse.Namespace(config_file=TINY_SEMI_CONFIG, opts=opts))


def test_custom_dataset_from_config(folder_dataset):
    tmp_path, names = folder_dataset
    cfg = _cfg(tmp_path, NAME="mine", IMAGE_ROOT=str(tmp_path / "gen" / "images" / "train"),
               MASK_ROOT=str(tmp_path / "gen" / "labels" / "train"), CLASSES_FILE=str(tmp_path / "classes.json"),
               LABELED_LIST=str(tmp_path / "labeled.txt"), VAL_LIST=str(tmp_path / "val.txt"))
    Trainer.register_datasets(cfg)
    labeled = DatasetCatalog.get("mine_labeled")
    unlabeled = DatasetCatalog.get("mine_unlabeled")
    assert len(labeled) == 2 and all("sem_seg_file_name" in r for r in labeled)
    # unlabeled: every other image under IMAGE_ROOT (neither labeled nor validation), without masks
    assert len(unlabeled) == 3 and all("sem_seg_file_name" not in r for r in unlabeled)
    assert len(DatasetCatalog.get("mine_val")) == 1
    assert MetadataCatalog.get("mine_labeled").stuff_classes == ["background", "circle", "square"]


def test_custom_dataset_errors(folder_dataset):
    tmp_path, _ = folder_dataset
    with pytest.raises(ValueError, match="CLASSES_FILE"):
        Trainer.register_datasets(_cfg(tmp_path, NAME="mine2", IMAGE_ROOT=str(tmp_path), MASK_ROOT=str(tmp_path),
                                       LABELED_LIST=str(tmp_path / "labeled.txt")))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Trainer.register_datasets(_cfg(tmp_path, NAME="mine3", IMAGE_ROOT=str(tmp_path), MASK_ROOT=str(tmp_path),
                                       CLASSES_FILE=str(tmp_path / "nope.json"),
                                       LABELED_LIST=str(tmp_path / "labeled.txt")))
