"""Split files (UniMatch format), seeded paper splits, config-given splits and custom semi-supervised datasets."""
from pathlib import Path

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from conftest import load_script
from hvlformer.config import add_hvlformer_config
from hvlformer.data import (
    parse_split_file,
    register_builtin_datasets,
    register_custom_semi_dataset,
    register_split_files_from_cfg,
    seeded_split,
)
from hvlformer.data.splits import parse_split_lines
from test_builtin_datasets import evaluate_perfect


def touch(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def fake_voc_tree(root: Path, n_aug=30, n_fine=10, n_val=5):
    """A prepared VOC2012 tree with empty files (split logic only lists files)."""
    voc = root / "VOC2012"
    aug = [f"2008_{i:06d}" for i in range(n_aug)]
    val = [f"2007_{i:06d}" for i in range(n_val)]
    for i in aug + val:
        touch(voc / "JPEGImages" / f"{i}.jpg")
        touch(voc / "SegmentationClassAug" / f"{i}.png")
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train_aug.txt").write_text("\n".join(aug) + "\n")
    (lists / "train.txt").write_text("\n".join(aug[:n_fine]) + "\n")
    (lists / "val.txt").write_text("\n".join(val) + "\n")
    return aug


def fake_cityscapes_tree(root: Path, n=120):
    for i in range(n):
        city = ["aachen", "bremen", "ulm"][i % 3]
        touch(root / "cityscapes" / "leftImg8bit" / "train" / city / f"{city}_{i:06d}_000019_leftImg8bit.png")
        touch(root / "cityscapes" / "gtFine" / "train" / city / f"{city}_{i:06d}_000019_gtFine_labelTrainIds.png")


# ----------------------------------------------------------------------------------------- parsing
def test_parse_split_lines():
    entries = parse_split_lines(["# comment", "", "JPEGImages/a.jpg SegmentationClass/a.png", "  b  ", "c.jpg\r"], "f")
    assert [(e.image, e.mask) for e in entries] == [("JPEGImages/a.jpg", "SegmentationClass/a.png"), ("b", None), ("c.jpg", None)]
    assert entries[0].source == "f:3"
    with pytest.raises(ValueError, match=r"f:1: expected 'image_path \[mask_path\]'"):
        parse_split_lines(["a b c"], "f")
    with pytest.raises(ValueError, match=r"f:2: image 'a' is listed twice \(first at f:1\)"):
        parse_split_lines(["a", "a x"], "f")


def test_parse_split_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        parse_split_file(tmp_path / "nope.txt")


# ----------------------------------------------------------------------------------------- seeded splits
def test_seeded_split_counts_determinism_nesting():
    keys = [f"img{i:04d}" for i in range(500)]
    pool = keys[:200]
    lab, unl = seeded_split(keys, 37, seed=0, salt="voc", pool=pool)
    assert len(lab) == 37 and len(unl) == 463 and set(lab) <= set(pool)
    assert not set(lab) & set(unl) and sorted(lab + unl) == keys
    assert (lab, unl) == seeded_split(list(reversed(keys)), 37, seed=0, salt="voc", pool=pool)  # order-independent
    assert seeded_split(keys, 37, seed=1, salt="voc", pool=pool)[0] != lab
    assert seeded_split(keys, 37, seed=0, salt="ade20k", pool=pool)[0] != lab
    bigger = seeded_split(keys, 80, seed=0, salt="voc", pool=pool)[0]
    assert set(lab) < set(bigger)  # nested over counts for one seed
    assert seeded_split(keys, 200, seed=2, salt="voc", pool=pool)[0] == pool
    with pytest.raises(ValueError, match="cannot draw 201"):
        seeded_split(keys, 201, seed=0, salt="voc", pool=pool)
    with pytest.raises(ValueError, match="not in the key set"):
        seeded_split(keys[:10], 1, seed=0, salt="voc", pool=["other"])


def test_paper_split_names_generate_write_and_reread(tmp_path, restore_builtin):
    fake_cityscapes_tree(tmp_path)
    register_builtin_datasets(root=tmp_path, datasets=["cityscapes"])
    lab = DatasetCatalog.get("cityscapes_100_seed0_labeled")
    unl = DatasetCatalog.get("cityscapes_100_seed0_unlabeled")
    assert len(lab) == 100 and len(unl) == 20
    assert all("sem_seg_file_name" in d for d in lab) and all("sem_seg_file_name" not in d for d in unl)
    assert not {d["file_name"] for d in lab} & {d["file_name"] for d in unl}
    files = tmp_path / "splits" / "cityscapes" / "100_seed0"
    first = (files / "labeled.txt").read_text().splitlines()[0]
    assert first.startswith("leftImg8bit/train/") and " gtFine/train/" in first and first.endswith("_gtFine_labelTrainIds.png")
    unl_lines = (files / "unlabeled.txt").read_text().splitlines()
    assert len(unl_lines) == 20 and all(len(line.split()) == 2 for line in unl_lines)  # UniMatch: "image mask"
    assert MetadataCatalog.get("cityscapes_100_seed0_labeled").split_file == str(files / "labeled.txt")
    # a new seed differs; the same seed regenerated from scratch is identical
    assert {d["file_name"] for d in DatasetCatalog.get("cityscapes_100_seed1_labeled")} != {d["file_name"] for d in lab}
    text = (files / "labeled.txt").read_text()
    (files / "labeled.txt").unlink()
    (files / "unlabeled.txt").unlink()
    assert DatasetCatalog.get("cityscapes_100_seed0_labeled") == lab
    assert (files / "labeled.txt").read_text() == text
    # existing files are read, not regenerated (published splits win)
    lines = text.splitlines()
    (files / "labeled.txt").write_text("\n".join(lines[:3]) + "\n")
    assert len(DatasetCatalog.get("cityscapes_100_seed0_labeled")) == 3


def test_make_splits_tool(tmp_path, capsys):
    fake_voc_tree(tmp_path)
    tool = load_script("tools/make_splits.py", "_hvl_make_splits")
    assert tool.main(["--dataset", "voc", "--counts", "4", "10", "--seeds", "0", "1", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("written") == 4 and "4 labeled, 26 unlabeled" in out and "10 labeled, 20 unlabeled" in out
    d = tmp_path / "splits" / "voc"
    assert sorted(p.name for p in d.iterdir()) == ["10_seed0", "10_seed1", "4_seed0", "4_seed1"]
    lab4 = [line.split()[0] for line in (d / "4_seed0" / "labeled.txt").read_text().splitlines()]
    fine = {f"JPEGImages/2008_{i:06d}.jpg" for i in range(10)}
    assert set(lab4) <= fine  # drawn from the fine train list
    assert tool.main(["--dataset", "voc", "--counts", "4", "--seeds", "0", "--root", str(tmp_path)]) == 0
    assert "kept" in capsys.readouterr().out
    assert tool.main(["--dataset", "voc", "--counts", "4", "--seeds", "0", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "voc" / "4_seed0" / "labeled.txt").read_text() == (d / "4_seed0" / "labeled.txt").read_text()


# ----------------------------------------------------------------------------------------- split files by config
def _cfg(**split):
    cfg = get_cfg()
    add_hvlformer_config(cfg)
    for k, v in split.items():
        setattr(cfg.DATASETS.SPLIT, k, v)
    return cfg


def test_split_files_from_cfg(tmp_path, restore_builtin, caplog):
    aug = fake_voc_tree(tmp_path)
    register_builtin_datasets(root=tmp_path, datasets=["voc"])
    assert register_split_files_from_cfg(_cfg()) == []  # no-op by default
    lab_file, unl_file = tmp_path / "labeled.txt", tmp_path / "unlabeled.txt"
    # UniMatch's VOC files name SegmentationClass/ masks; a bare id works too
    lab_file.write_text(f"JPEGImages/{aug[0]}.jpg SegmentationClass/{aug[0]}.png\n{aug[1]}\n")
    unl_file.write_text("".join(f"JPEGImages/{i}.jpg SegmentationClass/{i}.png\n" for i in aug[2:]))
    names = register_split_files_from_cfg(_cfg(DATASET="voc_train", LABELED_FILE=str(lab_file), UNLABELED_FILE=str(unl_file)))
    assert names == ["split_labeled", "split_unlabeled"]
    lab = DatasetCatalog.get("split_labeled")
    assert [Path(d["sem_seg_file_name"]).relative_to(tmp_path).as_posix() for d in lab] == [
        f"VOC2012/SegmentationClassAug/{aug[0]}.png", f"VOC2012/SegmentationClassAug/{aug[1]}.png"]
    unl = DatasetCatalog.get("split_unlabeled")
    assert len(unl) == 28 and all(set(d) == {"file_name", "image_id"} for d in unl)
    m = MetadataCatalog.get("split_labeled")
    assert m.stuff_classes[0] == "background" and m.descriptions_name == "voc" and m.split_file == str(lab_file)

    # a file relative to the dataset root is found there
    (tmp_path / "VOC2012" / "my_labeled.txt").write_text(f"JPEGImages/{aug[5]}.jpg\n")
    register_split_files_from_cfg(_cfg(DATASET="voc_train", LABELED_FILE="my_labeled.txt"))
    assert DatasetCatalog.get("split_labeled")[0]["image_id"] == aug[5]

    # an image that is not in the training set (a val image) is an error naming the line
    lab_file.write_text(f"{aug[0]}\nJPEGImages/2007_000000.jpg\n")
    register_split_files_from_cfg(_cfg(DATASET="voc_train", LABELED_FILE=str(lab_file)))
    with pytest.raises(ValueError, match=r"labeled\.txt:2: image 'JPEGImages/2007_000000\.jpg' is not in 'voc_train'"):
        DatasetCatalog.get("split_labeled")
    with pytest.raises(ValueError, match="DATASETS.SPLIT.DATASET is empty"):
        register_split_files_from_cfg(_cfg(LABELED_FILE=str(lab_file)))
    register_split_files_from_cfg(_cfg(DATASET="voc_train", LABELED_FILE=str(tmp_path / "missing.txt")))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        DatasetCatalog.get("split_labeled")
    for n in ("split_labeled", "split_unlabeled"):
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


# ----------------------------------------------------------------------------------------- custom datasets
def test_custom_semi_dataset(tmp_path):
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "data" / "images", tmp_path / "data" / "masks"
    names = [f"scene/{i:03d}" for i in range(6)]
    for i, n in enumerate(names):
        (images / n).parent.mkdir(parents=True, exist_ok=True)
        (masks / n).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)).save(images / f"{n}.jpg")
        lbl = rng.integers(0, 3, (8, 12)).astype(np.uint8)
        lbl[0, 0] = 255
        if i % 2:  # palette PNG: read as indices
            p = Image.fromarray(lbl, mode="P")
            p.putpalette([255, 255, 255] * 256)
            p.save(masks / f"{n}.png")
        else:
            Image.fromarray(lbl).save(masks / f"{n}.png")
    (tmp_path / "labeled.txt").write_text("scene/000.jpg scene/000.png\nscene/001.jpg\n")
    registered = register_custom_semi_dataset(
        "mine", images, masks, ["background", "crack", "rust"], tmp_path / "labeled.txt",
        unlabeled_list=None, val_list=["scene/004.jpg", "scene/005"], descriptions_name="mine")
    assert registered == ["mine_labeled", "mine_unlabeled", "mine_val"]
    assert [d["image_id"] for d in DatasetCatalog.get("mine_labeled")] == ["scene/000", "scene/001"]
    unl = DatasetCatalog.get("mine_unlabeled")
    assert [d["image_id"] for d in unl] == ["scene/002", "scene/003"] and all("sem_seg_file_name" not in d for d in unl)
    m = MetadataCatalog.get("mine_val")
    assert m.stuff_classes == ["background", "crack", "rust"] and m.ignore_label == 255 and m.descriptions_name == "mine"
    for name in ("mine_labeled", "mine_val"):
        assert evaluate_perfect(name)["mIoU"] == pytest.approx(100.0)

    register_custom_semi_dataset("mine2", images, masks, ["a", "b", "c"], ["scene/000.jpg"], ["scene/003.jpg x.png"])
    assert [d["image_id"] for d in DatasetCatalog.get("mine2_unlabeled")] == ["scene/003"]
    register_custom_semi_dataset("mine3", images, masks, ["a", "b", "c"], ["scene/009.jpg"])
    with pytest.raises(FileNotFoundError, match=r"scene/009\.jpg \(<labeled_list>:1\)"):
        DatasetCatalog.get("mine3_labeled")
    register_custom_semi_dataset("mine4", images, tmp_path / "nomasks", ["a", "b", "c"], ["scene/000.jpg"])
    with pytest.raises(FileNotFoundError, match="nomasks"):
        DatasetCatalog.get("mine4_labeled")
    for base in ("mine", "mine2", "mine3", "mine4"):
        for part in ("labeled", "unlabeled", "val"):
            if f"{base}_{part}" in DatasetCatalog.list():
                DatasetCatalog.remove(f"{base}_{part}")
                MetadataCatalog.remove(f"{base}_{part}")
