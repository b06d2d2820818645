"""datasets/prepare_ade20k.py on a tiny fake ADEChallengeData2016.zip."""
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from hvlformer.data import register_builtin_datasets
from test_builtin_datasets import evaluate_perfect, load_prepare_script

ade_script = load_prepare_script("ade20k")
FILES = {"training": ["ADE_train_00000001", "ADE_train_00000002"], "validation": ["ADE_val_00000001"]}


def make_fake_ade(src: Path, as_zip: bool = True):
    """ADEChallengeData2016/{images,annotations}/{training,validation}; returns the raw annotations."""
    rng = np.random.default_rng(0)
    base = src / "ADEChallengeData2016"
    raw = {}
    for split, names in FILES.items():
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for n in names:
            h, w = int(rng.integers(8, 14)), int(rng.integers(8, 14))
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(base / "images" / split / f"{n}.jpg")
            a = rng.integers(0, 151, (h, w)).astype(np.uint8)
            a[0, :3] = [0, 1, 150]
            Image.fromarray(a).save(base / "annotations" / split / f"{n}.png")
            raw[n] = a
    (base / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n")
    if as_zip:
        with zipfile.ZipFile(src / "ADEChallengeData2016.zip", "w") as zf:
            for p in sorted(base.rglob("*")):
                zf.write(p, p.relative_to(src).as_posix())
        shutil.rmtree(base)
    return raw


def run(src, root, *extra):
    return ade_script.main(["--src", str(src), "--root", str(root), "--workers", "1", *extra])


def test_shift_rule():
    raw = np.array([[0, 1, 2], [75, 149, 150]], np.uint8)
    np.testing.assert_array_equal(ade_script.ade_to_train_labels(raw), [[255, 0, 1], [74, 148, 149]])


def test_prepare_ade20k_end_to_end(tmp_path, restore_builtin, capsys):
    src, root = tmp_path / "downloads", tmp_path / "datasets"
    raw = make_fake_ade(src, as_zip=True)
    assert run(src, root) == 0
    out = root / "ADEChallengeData2016"
    assert (src / "ADEChallengeData2016" / "images").is_dir()  # extracted from the zip
    assert (out / "images").is_symlink()
    for split, names in FILES.items():
        for n in names:
            label = np.asarray(Image.open(out / "annotations_detectron2" / split / f"{n}.png"))
            expected = raw[n].astype(np.int32) - 1
            expected[raw[n] == 0] = 255
            np.testing.assert_array_equal(label, expected)
            assert label[0, 0] == 255 and label[0, 1] == 0 and label[0, 2] == 149

    register_builtin_datasets(root=root, datasets=["ade20k"])
    assert len(DatasetCatalog.get("ade20k_train")) == 2
    for name in ("ade20k_train", "ade20k_val"):
        assert evaluate_perfect(name)["mIoU"] == pytest.approx(100.0)

    capsys.readouterr()
    assert run(src, root) == 0  # idempotent
    assert "validation: 1 images, 0 masks written, 1 already there" in capsys.readouterr().out


def test_prepare_in_place(tmp_path, restore_builtin):
    """The archive extracted directly under $DETECTRON2_DATASETS: masks are added next to the originals."""
    root = tmp_path / "datasets"
    make_fake_ade(root, as_zip=False)
    assert run(root / "ADEChallengeData2016", root) == 0
    assert not (root / "ADEChallengeData2016" / "images").is_symlink()
    assert len(list((root / "ADEChallengeData2016" / "annotations_detectron2" / "training").iterdir())) == 2


def test_bad_inputs_are_clear_errors(tmp_path):
    src, root = tmp_path / "downloads", tmp_path / "datasets"
    raw = make_fake_ade(src, as_zip=False)
    ann = src / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000001.png"

    bad = raw["ADE_val_00000001"].copy()
    bad[1, 1] = 151
    Image.fromarray(bad).save(ann)
    with pytest.raises(ValueError, match=r"ADE_val_00000001\.png.*\[151\]"):
        run(src, root)

    Image.fromarray(np.zeros((3, 3), np.uint8)).save(ann)
    with pytest.raises(ValueError, match=r"sizes differ.*ADE_val_00000001\.jpg"):
        run(src, root)

    ann.unlink()
    with pytest.raises(ValueError, match=r"have no mask.*ADE_val_00000001\.jpg"):
        run(src, root)

    shutil.rmtree(src / "ADEChallengeData2016" / "annotations" / "validation")
    with pytest.raises(FileNotFoundError, match=r"annotations/validation"):
        run(src, root)

    shutil.rmtree(src / "ADEChallengeData2016")
    with pytest.raises(FileNotFoundError, match=r"ADEChallengeData2016\.zip"):
        run(src, root)
