"""Built-in dataset registration: names, metadata, laziness, clear errors, configs.

Also holds the helpers that the ``test_prepare_*.py`` files share (loading a prepare script, evaluating
a registered dataset with a perfect predictor).
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import REPO_ROOT, load_script
from hvlformer.data import (
    BUILTIN_DATASETS,
    PAPER_SPLIT_COUNTS,
    HVLFormerSemanticDatasetMapper,
    builtin_class_names,
    register_builtin_datasets,
)
from hvlformer.data import load_builtin_classes
from hvlformer.evaluation import HVLSemSegEvaluator

NUM_CLASSES = {"voc": 21, "coco81": 81, "ade20k": 150, "cityscapes": 19}


# ----------------------------------------------------------------------------------------- shared helpers
def load_prepare_script(name: str):
    """Import ``datasets/prepare_<name>.py`` as a module (its ``main(argv)`` runs in-process; its
    ``import prepare_common`` finds the folder that ``conftest.py`` put on ``sys.path``)."""
    return load_script(f"datasets/prepare_{name}.py", f"_hvl_prepare_{name}")


def evaluate_perfect(dataset_name: str) -> dict:
    """Load every image of ``dataset_name`` through the dataset mapper and score the ground truth itself
    with ``HVLSemSegEvaluator``; returns the ``sem_seg`` results."""
    k = len(MetadataCatalog.get(dataset_name).stuff_classes)
    mapper = HVLFormerSemanticDatasetMapper(
        is_train=False, augmentations=[], image_format="RGB", ignore_label=255, size_divisibility=0, num_classes=k
    )
    evaluator = HVLSemSegEvaluator(dataset_name, distributed=False)
    evaluator.reset()
    dicts = DatasetCatalog.get(dataset_name)
    assert dicts, dataset_name
    for d in dicts:
        out = mapper(d)
        label = out["sem_seg"]
        assert out["image"].shape[1:] == label.shape
        scores = torch.nn.functional.one_hot(torch.where(label == 255, 0, label), k).permute(2, 0, 1).float()
        evaluator.process([out], [{"sem_seg": scores}])
    return evaluator.evaluate()["sem_seg"]


# ----------------------------------------------------------------------------------------- tests
CONTRACT_NAMES = [f"{d}_{s}" for d in NUM_CLASSES for s in ("train", "val")] + [
    f"{d}_{c}_seed{seed}_{part}"
    for d, counts in PAPER_SPLIT_COUNTS.items() for c in counts for seed in (0, 1, 2) for part in ("labeled", "unlabeled")
]


def test_every_name_is_registered_with_metadata():
    registered = set(DatasetCatalog.list())
    assert len(CONTRACT_NAMES) == 8 + 4 * 5 * 3 * 2
    assert not [n for n in CONTRACT_NAMES if n not in registered]
    assert "voc_92_seed0_labeled" in registered and "cityscapes_100_seed2_unlabeled" in registered
    assert PAPER_SPLIT_COUNTS["coco81"] == (232, 463, 925, 1849, 3697)
    root = os.environ["DETECTRON2_DATASETS"]
    for name in ("voc_train", "coco81_val", "ade20k_158_seed1_labeled", "cityscapes_1488_seed2_unlabeled"):
        dataset = name.split("_")[0]
        m = MetadataCatalog.get(name)
        assert len(m.stuff_classes) == len(m.stuff_colors) == NUM_CLASSES[dataset]
        assert m.ignore_label == 255 and m.evaluator_type == "sem_seg"
        assert m.descriptions_name == dataset
        assert m.image_root.startswith(os.path.join(root, BUILTIN_DATASETS[dataset].root))
        assert m.sem_seg_root.startswith(m.dataset_root)
    assert MetadataCatalog.get("voc_val").stuff_classes[0] == "background"
    assert MetadataCatalog.get("coco81_train").stuff_classes[80] == "toothbrush"
    assert MetadataCatalog.get("cityscapes_val").stuff_classes[18] == "bicycle"


def test_registration_is_lazy_and_touches_no_disk(tmp_path, restore_builtin):
    root = tmp_path / "absent"
    names = register_builtin_datasets(root=root)
    assert len(names) == len(CONTRACT_NAMES)
    assert not root.exists() and not list(tmp_path.iterdir())
    assert MetadataCatalog.get("ade20k_val").image_root == str(root / "ADEChallengeData2016" / "images" / "validation")


@pytest.mark.parametrize("name", ["voc_train", "coco81_val", "ade20k_2526_seed0_labeled", "cityscapes_100_seed1_unlabeled"])
def test_missing_root_is_a_clear_error(tmp_path, restore_builtin, name):
    register_builtin_datasets(root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as e:
        DatasetCatalog.get(name)
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg
    assert "DETECTRON2_DATASETS" in msg and "datasets/README.md" in msg and "prepare_" in msg


def test_class_files():
    for dataset, k in NUM_CLASSES.items():
        spec = load_builtin_classes(dataset)
        assert len(spec["classes"]) == len(set(spec["classes"])) == k
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in spec["colors"])
    assert len(load_builtin_classes("ade20k")["official_names"]) == 150
    assert load_builtin_classes("coco81")["coco_category_ids"][-1] == 90
    assert builtin_class_names("voc")[1:4] == ["aeroplane", "bicycle", "bird"]


def test_cityscapes_label_table():
    lut = load_prepare_script("cityscapes").cityscapes_id_to_train_id_lut()
    rows = load_builtin_classes("cityscapes")["label_ids"]
    names = builtin_class_names("cityscapes")
    train_ids = sorted(r["train_id"] for r in rows if r["train_id"] != 255)
    assert train_ids == list(range(19))  # each train id exactly once
    for r in rows:
        if r["train_id"] != 255:
            assert names[r["train_id"]] == r["name"]
    assert lut[7] == 0 and lut[26] == 13 and lut[33] == 18 and lut[0] == 255 and lut[255] == 255
    assert lut[34] == -1 and lut[100] == -1


def _dataset_names(cfg):
    """Dataset names of a merged config: every DATASETS.TRAIN* / TEST* entry and DATASETS.SPLIT.DATASET."""
    names = []
    for key, value in cfg.DATASETS.items():
        if key.startswith(("TRAIN", "TEST")) and isinstance(value, (list, tuple)):
            names += [v for v in value if isinstance(v, str) and v]
    if cfg.DATASETS.SPLIT.DATASET:
        names.append(cfg.DATASETS.SPLIT.DATASET)
    return names


def test_every_config_names_registered_datasets():
    """Each config in configs/, merged with its _BASE_, names datasets that exist once the trainer has
    registered its config-dependent ones (shapes parameters and splits, DATASETS.SPLIT files)."""
    from detectron2.config import get_cfg

    from hvlformer.config import add_hvlformer_config
    from hvlformer.data import register_shapes, register_split_files_from_cfg
    from hvlformer.engine.setup import build_trainer_class

    checked = []
    try:
        for path in sorted((REPO_ROOT / "configs").rglob("*.yaml")):
            cfg = get_cfg()
            add_hvlformer_config(cfg)
            cfg.merge_from_file(str(path))
            trainer = build_trainer_class(cfg)
            if hasattr(trainer, "register_datasets"):
                trainer.register_datasets(cfg)  # lazy: nothing is read
            register_split_files_from_cfg(cfg)
            registered = set(DatasetCatalog.list())
            for name in _dataset_names(cfg):
                assert name in registered, f"{path.relative_to(REPO_ROOT)} names {name!r}, which is not registered"
                checked.append(name)
    finally:
        register_shapes()  # the default shapes datasets for the other tests
    assert checked


def test_perfect_predictor_helper_on_a_fake_tree(tmp_path, restore_builtin):
    """A Cityscapes tree written directly in the prepared layout loads and scores mIoU 100."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(2):
            img_dir = tmp_path / "cityscapes" / "leftImg8bit" / split / "ulm"
            gt_dir = tmp_path / "cityscapes" / "gtFine" / split / "ulm"
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 16, 3), dtype=np.uint8)).save(img_dir / f"ulm_{i:06d}_000019_leftImg8bit.png")
            lbl = rng.integers(0, 19, (8, 16)).astype(np.uint8)
            lbl[0] = 255
            Image.fromarray(lbl).save(gt_dir / f"ulm_{i:06d}_000019_gtFine_labelTrainIds.png")
    register_builtin_datasets(root=tmp_path, datasets=["cityscapes"])
    dicts = DatasetCatalog.get("cityscapes_val")
    assert [Path(d["file_name"]).name for d in dicts] == ["ulm_000000_000019_leftImg8bit.png", "ulm_000001_000019_leftImg8bit.png"]
    assert all(d["sem_seg_file_name"].endswith("_gtFine_labelTrainIds.png") for d in dicts)
    assert evaluate_perfect("cityscapes_val")["mIoU"] == pytest.approx(100.0)
