"""datasets/prepare_cityscapes.py on tiny fake leftImg8bit / gtFine folders in the official layout."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from hvlformer.data import register_builtin_datasets
from test_builtin_datasets import evaluate_perfect, load_prepare_script

cs_script = load_prepare_script("cityscapes")
FRAMES = {"train": [("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")],
          "val": [("frankfurt", "frankfurt_000000_000294")]}
# every label id 0..33 plus 255 (license plate, id -1 as uint8)
IDS = np.array(list(range(34)) + [255], np.uint8)
TRAIN_IDS = np.array([255] * 7 + [0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                      255, 255, 16, 17, 18, 255], np.uint8)
EXPECTED_LUT = np.zeros(256, np.uint8)
EXPECTED_LUT[IDS] = TRAIN_IDS


def make_fake_cityscapes(src: Path):
    rng = np.random.default_rng(0)
    ids = {}
    for split, frames in FRAMES.items():
        for city, frame in frames:
            img_dir, gt_dir = src / "leftImg8bit" / split / city, src / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (10, 20, 3), dtype=np.uint8)).save(img_dir / f"{frame}_leftImg8bit.png")
            lab = rng.choice(IDS, size=(10, 20)).astype(np.uint8)
            lab[0, :] = np.resize(IDS, 20)
            Image.fromarray(lab).save(gt_dir / f"{frame}_gtFine_labelIds.png")
            # the other files of gtFine_trainvaltest.zip are ignored
            Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(gt_dir / f"{frame}_gtFine_color.png")
            (gt_dir / f"{frame}_gtFine_polygons.json").write_text("{}")
            ids[frame] = lab
    return ids


def run(src, root, *extra):
    return cs_script.main(["--src", str(src), "--root", str(root), "--workers", "1", *extra])


def test_label_id_mapping():
    np.testing.assert_array_equal(cs_script.label_ids_to_train_ids(IDS[None, :], "x"), TRAIN_IDS[None, :])
    with pytest.raises(ValueError, match=r"x\.png contains values \[34, 40\]"):
        cs_script.label_ids_to_train_ids(np.array([[7, 34, 40]], np.uint8), "x.png")


def test_prepare_cityscapes_end_to_end(tmp_path, restore_builtin, capsys):
    src, root = tmp_path / "downloads", tmp_path / "datasets"
    ids = make_fake_cityscapes(src)
    assert run(src, root) == 0
    out = root / "cityscapes"
    assert (out / "leftImg8bit").is_symlink()
    for split, frames in FRAMES.items():
        for city, frame in frames:
            label = np.asarray(Image.open(out / "gtFine" / split / city / f"{frame}_gtFine_labelTrainIds.png"))
            np.testing.assert_array_equal(label, EXPECTED_LUT[ids[frame]])
    assert not list((out / "gtFine").rglob("*_color.png"))

    register_builtin_datasets(root=root, datasets=["cityscapes"])
    assert [Path(d["file_name"]).parent.name for d in DatasetCatalog.get("cityscapes_train")] == ["aachen", "bochum"]
    for name in ("cityscapes_train", "cityscapes_val"):
        assert evaluate_perfect(name)["mIoU"] == pytest.approx(100.0)

    capsys.readouterr()
    assert run(src, root) == 0  # idempotent
    assert "train: 2 images, 0 masks written, 2 already there" in capsys.readouterr().out


def test_bad_inputs_are_clear_errors(tmp_path):
    src, root = tmp_path / "downloads", tmp_path / "datasets"
    make_fake_cityscapes(src)
    gt = src / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png"

    Image.fromarray(np.full((10, 20), 50, np.uint8)).save(gt)
    with pytest.raises(ValueError, match=r"frankfurt_000000_000294_gtFine_labelIds\.png contains values \[50\]"):
        run(src, root)

    Image.fromarray(np.zeros((10, 21), np.uint8)).save(gt)
    with pytest.raises(ValueError, match=r"sizes differ.*frankfurt_000000_000294_leftImg8bit\.png"):
        run(src, root)

    gt.unlink()
    with pytest.raises(ValueError, match=r"frankfurt_000000_000294_leftImg8bit\.png"):
        run(src, root)

    (src / "gtFine").rename(src / "gtFine_elsewhere")
    with pytest.raises(FileNotFoundError, match=r"gtFine.*gtFine_trainvaltest\.zip"):
        run(src, root)


def test_command_line_with_worker_processes(tmp_path):
    """The script as users run it: a separate process, --help, two forked conversion workers."""
    script = Path(cs_script.__file__)
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--src" in help_text and "--overwrite" in help_text
    ids = make_fake_cityscapes(tmp_path / "downloads")
    proc = subprocess.run([sys.executable, str(script), "--src", str(tmp_path / "downloads"), "--root",
                           str(tmp_path / "datasets"), "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train: 2 images, 2 masks written" in proc.stdout
    label = np.asarray(Image.open(tmp_path / "datasets" / "cityscapes" / "gtFine" / "train" / "aachen"
                                  / "aachen_000000_000019_gtFine_labelTrainIds.png"))
    np.testing.assert_array_equal(label, EXPECTED_LUT[ids["aachen_000000_000019"]])
