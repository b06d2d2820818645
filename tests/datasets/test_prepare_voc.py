"""datasets/prepare_voc.py on tiny fake VOC 2012 + SBD archives in the official layouts."""
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from detectron2.data import DatasetCatalog
from PIL import Image

from hvlformer.data import default_class_colors, register_builtin_datasets
from hvlformer.data.splits import parse_split_file
from test_builtin_datasets import evaluate_perfect, load_prepare_script

voc_script = load_prepare_script("voc")

VOC_TRAIN = ["2007_000001", "2007_000002"]
VOC_VAL = ["2007_000003", "2007_000004"]
SBD_TRAIN = ["2007_000001", "2007_000003", "2008_000010"]  # overlaps VOC train and VOC val
SBD_VAL = ["2008_000011"]
TRAIN_AUG = ["2007_000001", "2007_000002", "2008_000010", "2008_000011"]
SIZES = {"2007_000001": (12, 16), "2007_000002": (10, 14), "2007_000003": (12, 12), "2007_000004": (9, 15),
         "2008_000010": (11, 13), "2008_000011": (8, 10), "2008_000099": (8, 8)}


def _label(rng, h, w, boundary=True):
    lbl = rng.integers(0, 21, (h, w)).astype(np.uint8)
    if boundary:
        lbl[h // 2, :] = 255  # VOC's ignore boundary
    return lbl


def save_palette_png(path, lbl):
    """A VOC-style palette PNG: the indices are the labels, the colours are the VOC palette."""
    img = Image.fromarray(lbl, mode="P")
    pal = [v for c in default_class_colors(256) for v in c]
    pal[255 * 3: 256 * 3] = [224, 224, 192]  # VOC's boundary colour
    img.putpalette(pal)
    img.save(path)


def make_fake_voc(src: Path, as_tar: bool = True, seed: int = 0):
    """VOCdevkit/VOC2012 (as VOCtrainval_11-May-2012.tar) and benchmark_RELEASE/dataset under ``src``.
    Returns the ground-truth label maps: VOC's for VOC ids, SBD's for the others."""
    rng = np.random.default_rng(seed)
    build = src / "_build" if as_tar else src
    voc = build / "VOCdevkit" / "VOC2012"
    sbd = src / "benchmark_RELEASE" / "dataset"
    for d in (voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation", sbd / "cls"):
        d.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i, (h, w) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
    for i in VOC_TRAIN + VOC_VAL:
        truth[i] = _label(rng, *SIZES[i])
        save_palette_png(voc / "SegmentationClass" / f"{i}.png", truth[i])
    for i in SBD_TRAIN + SBD_VAL:
        seg = _label(rng, *SIZES[i], boundary=False)
        scipy.io.savemat(sbd / "cls" / f"{i}.mat", {"GTcls": {
            "Segmentation": seg, "Boundaries": np.zeros((1, 21), dtype=object), "CategoriesPresent": np.unique(seg)}})
        truth.setdefault(i, seg)  # VOC's annotation wins where both exist
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    (sbd / "train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
    (sbd / "val.txt").write_text("\n".join(SBD_VAL) + "\n")
    if as_tar:
        with tarfile.open(src / "VOCtrainval_11-May-2012.tar", "w") as tf:
            tf.add(build / "VOCdevkit", arcname="VOCdevkit")
        import shutil

        shutil.rmtree(build)
    return truth


def run(src, root, *extra):
    return voc_script.main(["--src", str(src), "--root", str(root), "--workers", "1", *extra])


def read(path):
    return np.asarray(Image.open(path))


def test_prepare_voc_end_to_end(tmp_path, restore_builtin, capsys):
    src, root = tmp_path / "downloads", tmp_path / "datasets"
    truth = make_fake_voc(src, as_tar=True)
    assert run(src, root) == 0
    out = root / "VOC2012"
    assert (src / "VOCdevkit" / "VOC2012" / "JPEGImages").is_dir()  # the archive was extracted in --src
    assert (out / "JPEGImages").is_symlink()
    lists = {n: (out / "ImageSets" / "Segmentation" / f"{n}.txt").read_text().split() for n in ("train_aug", "train", "val")}
    assert lists == {"train_aug": TRAIN_AUG, "train": VOC_TRAIN, "val": VOC_VAL}
    for i in TRAIN_AUG + VOC_VAL:
        img = Image.open(out / "SegmentationClassAug" / f"{i}.png")
        assert img.mode == "L"  # plain index PNG
        np.testing.assert_array_equal(np.asarray(img), truth[i], err_msg=i)
    assert not (out / "SegmentationClassAug" / "2008_000099.png").exists()
    # palette PNGs were read as indices: index 1 is (128, 0, 0), luminance 38 - not what is stored
    assert 1 in truth["2007_000001"] and 255 in read(out / "SegmentationClassAug" / "2007_000001.png")
    assert "masks: 4 from VOC, 2 from SBD" in capsys.readouterr().out

    register_builtin_datasets(root=root, datasets=["voc"])
    assert len(DatasetCatalog.get("voc_train")) == 4 and len(DatasetCatalog.get("voc_val")) == 2
    for name in ("voc_train", "voc_val"):
        res = evaluate_perfect(name)
        assert res["mIoU"] == pytest.approx(100.0) and res["pACC"] == pytest.approx(100.0)

    # idempotent: a second run keeps every mask and rewrites identical lists
    stamp = {p: p.stat().st_mtime_ns for p in (out / "SegmentationClassAug").iterdir()}
    assert run(src, root) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "SegmentationClassAug").iterdir()} == stamp
    assert "0 from VOC, 0 from SBD, 6 already there" in capsys.readouterr().out
    assert (out / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split() == TRAIN_AUG


def test_voc_paper_style_split_draws_from_the_fine_set(tmp_path, restore_builtin):
    src, root = tmp_path / "downloads", tmp_path / "datasets"
    make_fake_voc(src, as_tar=False)
    run(src, root)
    register_builtin_datasets(root=root, datasets=["voc"], split_counts={"voc": [1]})
    lab = DatasetCatalog.get("voc_1_seed0_labeled")
    unl = DatasetCatalog.get("voc_1_seed0_unlabeled")
    assert len(lab) == 1 and lab[0]["image_id"] in VOC_TRAIN
    assert all("sem_seg_file_name" not in d for d in unl)
    assert sorted(d["image_id"] for d in lab + unl) == TRAIN_AUG
    files = root / "splits" / "voc" / "1_seed0"
    assert parse_split_file(files / "labeled.txt")[0].image == f"JPEGImages/{lab[0]['image_id']}.jpg"
    assert evaluate_perfect("voc_1_seed0_labeled")["mIoU"] == pytest.approx(100.0)


def test_voc_without_sbd(tmp_path, restore_builtin, capsys):
    """VOC 2012 alone: refused with a pointer to --no-sbd, then prepared with train_aug = the fine set."""
    import shutil

    src, root = tmp_path / "downloads", tmp_path / "datasets"
    truth = make_fake_voc(src, as_tar=True)
    shutil.rmtree(src / "benchmark_RELEASE")
    with pytest.raises(FileNotFoundError, match="--no-sbd"):
        run(src, root)
    assert run(src, root, "--no-sbd") == 0
    out = root / "VOC2012"
    lists = {n: (out / "ImageSets" / "Segmentation" / f"{n}.txt").read_text().split() for n in ("train_aug", "train", "val")}
    assert lists == {"train_aug": VOC_TRAIN, "train": VOC_TRAIN, "val": VOC_VAL}
    assert sorted(p.stem for p in (out / "SegmentationClassAug").iterdir()) == sorted(VOC_TRAIN + VOC_VAL)
    for i in VOC_TRAIN + VOC_VAL:
        np.testing.assert_array_equal(read(out / "SegmentationClassAug" / f"{i}.png"), truth[i], err_msg=i)
    printed = capsys.readouterr().out
    assert "masks: 4 from VOC, 0 from SBD" in printed and "prepared without SBD" in printed
    assert "train_aug: 2 images  (the official archives give 1,464)" in printed  # not 10,582 without SBD
    # the unlabeled pool of a split is the fine set minus its labeled images
    register_builtin_datasets(root=root, datasets=["voc"], split_counts={"voc": [1]})
    lab = DatasetCatalog.get("voc_1_seed0_labeled")
    unl = DatasetCatalog.get("voc_1_seed0_unlabeled")
    assert len(DatasetCatalog.get("voc_train")) == 2 and len(DatasetCatalog.get("voc_val")) == 2
    assert sorted(d["image_id"] for d in lab + unl) == VOC_TRAIN and len(unl) == 1
    with pytest.raises(SystemExit):
        voc_script.parse_args(["--voc", str(src), "--sbd", "x", "--no-sbd"])
    assert voc_script.parse_args(["--voc", str(src), "--no-sbd"]).no_sbd


def test_sbd_mat_reader(tmp_path):
    seg = np.array([[0, 1, 20], [5, 5, 0]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "a.mat", {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros(1)}})
    np.testing.assert_array_equal(voc_script.read_sbd_mat(str(tmp_path / "a.mat")), seg)
    scipy.io.savemat(tmp_path / "b.mat", {"GTcls": {"Segmentation": seg * 2}})  # 40 is not a VOC class
    with pytest.raises(ValueError, match=r"b\.mat.*\[40\]"):
        voc_script.read_sbd_mat(str(tmp_path / "b.mat"))
    scipy.io.savemat(tmp_path / "c.mat", {"GTinst": {"Segmentation": seg}})
    with pytest.raises(ValueError, match=r"c\.mat has no GTcls\.Segmentation"):
        voc_script.read_sbd_mat(str(tmp_path / "c.mat"))


def test_bad_inputs_are_clear_errors(tmp_path):
    src, root = tmp_path / "downloads", tmp_path / "datasets"
    make_fake_voc(src, as_tar=False)
    voc = src / "VOCdevkit" / "VOC2012"

    # a palette index that is not a class
    bad = np.zeros(SIZES["2007_000002"], np.uint8)
    bad[0, 0] = 30
    save_palette_png(voc / "SegmentationClass" / "2007_000002.png", bad)
    with pytest.raises(ValueError, match=r"2007_000002\.png.*\[30\]"):
        run(src, root)

    # a mask whose size differs from its image
    save_palette_png(voc / "SegmentationClass" / "2007_000002.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"sizes differ.*2007_000002\.jpg.*2007_000002\.png"):
        run(src, root)
    save_palette_png(voc / "SegmentationClass" / "2007_000002.png", np.zeros(SIZES["2007_000002"], np.uint8))

    # an id without an image
    os.remove(voc / "JPEGImages" / "2008_000011.jpg")
    with pytest.raises(FileNotFoundError, match=r"2008_000011\.jpg"):
        run(src, root)

    # a missing folder of the official layout
    (voc / "SegmentationClass").rename(voc / "SegmentationClass_moved")
    with pytest.raises(FileNotFoundError, match=r"VOC2012.*SegmentationClass.*README"):
        run(src, root)

    # nothing in --src
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"VOCtrainval_11-May-2012\.tar"):
        run(tmp_path / "empty", root)


def test_help_and_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        voc_script.parse_args(["--help"])
    assert e.value.code == 0
    assert "--src" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        voc_script.parse_args([])  # neither --src nor --voc/--sbd
