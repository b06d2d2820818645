"""tools/open_vocabulary_shapes.py: the IoU bookkeeping, and a smoke run (a few training steps, a few images)."""
from __future__ import annotations


import numpy as np
import pytest


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("open_vocabulary_shapes")


def test_confusion_and_iou(tool):
    label = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    conf = tool.confusion_of(pred, label, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]  # the ignored pixel is not counted
    iou = tool.iou_table(conf, ["a", "b", "c"])
    assert iou == pytest.approx({"a": 50.0, "b": 100 * 2 / 3, "c": 100.0})
    assert set(tool.iou_table(conf, ["a", "b", "c"], ignore=[2])) == {"a", "b"}


def test_smoke_run(tool, tmp_path):
    out = tool.main(["--seeds", "0", "--iters", "2", "--image-size", "64", "--num-images", "4", "--workers", "0",
                     "--output-dir", str(tmp_path), "--json-out", str(tmp_path / "e.json")])
    run = out["per_seed"]["0"]
    assert set(run["open_iou"]) == {"background", "circle", "square", "triangle", "star", "cross", "ring"}
    assert set(run["closed_iou"]) == {"background", "circle", "square", "triangle", "star", "cross"}
    assert run["images_with_unseen"] >= 2  # every other image holds the unseen kind
    assert (tmp_path / "e.json").exists() and (tmp_path / "text_classifier_seed0" / "model_final.pth").exists()
    assert out["summary"]["unseen_iou"]["runs"] == [round(run["open_iou"]["ring"], 2)]
