"""The up-front dataset check: every image and mask read before training, cached, datasets before models."""
import argparse
import os
import time

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_PRETRAINED_CONFIG, load_script, repo_path
from hvlformer import setup_cfg
from hvlformer.data import register_sem_seg_folder
from hvlformer.data import check as check_module
from hvlformer.data.check import DatasetCheckError, check_dataset_dicts

check_dataset_tool = load_script("tools/check_dataset.py", "check_dataset_tool")


def make_folder(root, count=6, size=(40, 30)):
    """``count`` good image/mask pairs (3 classes) under root/images, root/masks; returns the dicts."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    dicts = []
    for i in range(count):
        w, h = size
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 3, (h, w), dtype=np.uint8)).save(root / "masks" / f"{i}.png")
        dicts.append({"file_name": str(root / "images" / f"{i}.jpg"),
                      "sem_seg_file_name": str(root / "masks" / f"{i}.png")})
    return dicts


def break_some(root):
    """Four kinds of damage; returns the damaged files."""
    (root / "images" / "1.jpg").write_bytes((root / "images" / "1.jpg").read_bytes()[:200])  # truncated
    Image.fromarray(np.full((30, 40), 7, np.uint8)).save(root / "masks" / "2.png")  # class 7 of 3
    Image.fromarray(np.zeros((31, 40), np.uint8)).save(root / "masks" / "3.png")  # size mismatch
    os.remove(root / "images" / "4.jpg")  # missing
    return ["1.jpg", "2.png", "3.png", "4.jpg"]


def test_every_problem_is_reported_at_once(tmp_path):
    dicts = make_folder(tmp_path)
    assert check_dataset_dicts(dicts, 3, 255, cache_dir=None, progress=False).problems == []
    damaged = break_some(tmp_path)
    report = check_dataset_dicts(dicts, 3, 255, cache_dir=None, progress=False)
    assert report.total == 6 and report.checked == 6
    assert [os.path.basename(path) for path, _ in report.problems] == damaged
    reasons = " ".join(reason for _, reason in report.problems)
    assert "corrupt" in reasons and "values [7]" in reasons and "sizes differ" in reasons and "not found" in reasons
    # without a class count only decoding and sizes are checked
    assert len(check_dataset_dicts(dicts, None, 255, cache_dir=None, progress=False).problems) == 3


def test_parallel_check_gives_the_same_result(tmp_path, monkeypatch):
    dicts = make_folder(tmp_path, count=12)
    break_some(tmp_path)
    monkeypatch.setattr(check_module, "MIN_PARALLEL", 1)
    serial = check_dataset_dicts(dicts, 3, 255, workers=1, cache_dir=None, progress=False)
    parallel = check_dataset_dicts(dicts, 3, 255, workers=2, cache_dir=None, progress=False)
    assert parallel.problems == serial.problems and len(serial.problems) == 4


def test_second_run_uses_the_cache_and_rechecks_changed_files(tmp_path):
    dicts = make_folder(tmp_path / "data")
    cache = str(tmp_path / "cache")
    first = check_dataset_dicts(dicts, 3, 255, cache_dir=cache, progress=False)
    assert (first.checked, first.cached) == (6, 0) and not first.problems
    second = check_dataset_dicts(dicts, 3, 255, cache_dir=cache, progress=False)
    assert (second.checked, second.cached) == (0, 6)
    # a mask rewritten with a bad value (new modification time) is read again and caught
    bad = tmp_path / "data" / "masks" / "5.png"
    Image.fromarray(np.full((30, 40), 9, np.uint8)).save(bad)
    os.utime(bad, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    third = check_dataset_dicts(dicts, 3, 255, cache_dir=cache, progress=False)
    assert (third.checked, third.cached) == (1, 5) and "values [9]" in third.problems[0][1]
    # another class count is another check
    assert check_dataset_dicts(dicts, 2, 255, cache_dir=cache, progress=False).checked == 6


def _cfg(name, *opts):
    cfg = setup_cfg(argparse.Namespace(config_file=TINY_PRETRAINED_CONFIG, opts=[
        "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", *opts]), freeze=False)
    return cfg


def test_training_stops_before_the_model_with_the_list_of_bad_files(tmp_path, monkeypatch):
    from hvlformer.engine.trainer import Trainer

    make_folder(tmp_path)
    break_some(tmp_path)
    register_sem_seg_folder("check_bad_folder", tmp_path / "images", tmp_path / "masks", ["a", "b", "c"])
    os.remove(tmp_path / "masks" / "4.png")  # the folder loader pairs images and masks: keep them paired
    monkeypatch.setattr(Trainer, "build_model", classmethod(lambda cls, cfg: pytest.fail("model built first")))
    with pytest.raises(DatasetCheckError) as info:
        Trainer(_cfg("check_bad_folder", "OUTPUT_DIR", str(tmp_path / "out")))
    message = str(info.value)
    assert "3 image/mask file(s)" in message
    for name in ("1.jpg", "2.png", "3.png"):
        assert name in message
    assert "tools/check_dataset.py" in message and "DATASETS.CHECK.ENABLED False" in message
    # switched off: only the existence check runs, so the model is built (here: the sentinel fails)
    with pytest.raises(pytest.fail.Exception, match="model built first"):
        Trainer(_cfg("check_bad_folder", "OUTPUT_DIR", str(tmp_path / "out"), "DATASETS.CHECK.ENABLED", "False"))


def test_missing_dataset_is_reported_before_the_model(tmp_path, monkeypatch):
    """A VOC config without the data: the missing dataset, not a CLIP download error, comes first."""
    from hvlformer.engine.semi_trainer import SemiSupervisedTrainer

    monkeypatch.setattr(SemiSupervisedTrainer, "build_model",
                        classmethod(lambda cls, cfg: pytest.fail("model built before the datasets were checked")))
    cfg = setup_cfg(argparse.Namespace(config_file=str(repo_path("configs/voc/hvlformer_vitb16_voc_92.yaml")),
                                       opts=["OUTPUT_DIR", str(tmp_path)]), freeze=False)
    with pytest.raises(FileNotFoundError, match="VOC2012") as info:
        SemiSupervisedTrainer(cfg)
    assert "prepare_voc.py" in str(info.value) or "DETECTRON2_DATASETS" in str(info.value)


def test_check_dataset_tool(tmp_path, capsys):
    main = check_dataset_tool.main
    make_folder(tmp_path)
    register_sem_seg_folder("check_tool_folder", tmp_path / "images", tmp_path / "masks", ["a", "b", "c"])
    opts = ["--no-progress", "--config-file", TINY_PRETRAINED_CONFIG, "--opts",
            "DATASETS.TRAIN", "('check_tool_folder',)", "DATASETS.TEST", "()"]
    assert main(opts) == 0
    assert "check_tool_folder: 6 entries OK (6 read" in capsys.readouterr().out
    assert main(opts) == 0
    assert "(0 read, 6 unchanged" in capsys.readouterr().out  # cached
    Image.fromarray(np.full((30, 40), 5, np.uint8)).save(tmp_path / "masks" / "0.png")
    assert main(opts) == 1
    assert "0.png" in capsys.readouterr().err
    assert main(["--no-progress", "--config-file", TINY_PRETRAINED_CONFIG, "--opts",
                 "DATASETS.TRAIN", "('nope',)"]) == 2
    assert "not registered" in capsys.readouterr().err
