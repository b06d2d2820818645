"""HVLSemSegEvaluator: detectron2's metrics through the real process/evaluate path under NumPy 2."""
import math
import os

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from hvlformer.data import register_sem_seg_folder
from hvlformer.evaluation import HVLSemSegEvaluator, build_sem_seg_evaluator, load_sem_seg_indices


def _onehot(label: np.ndarray, k: int) -> torch.Tensor:
    """K x H x W scores whose argmax is ``label`` (ignore pixels get class 0)."""
    lbl = torch.as_tensor(np.where(label == 255, 0, label), dtype=torch.long)
    return torch.nn.functional.one_hot(lbl, k).permute(2, 0, 1).float()


@pytest.fixture
def tiny_dataset(tmp_path):
    """3 images with labels (one a palette PNG, some ignore pixels), 4 classes registered."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    labels = {}
    for i, (h, w) in enumerate([(10, 12), (8, 8), (6, 9)]):
        lbl = rng.integers(0, 4, (h, w)).astype(np.uint8)
        lbl[0, 0] = 255
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
        if i == 1:
            p = Image.fromarray(lbl, mode="P")
            p.putpalette([255, 255, 255] * 256)  # every index looks white: luminance would be wrong
            p.save(tmp_path / "lbl" / f"{i}.png")
        else:
            Image.fromarray(lbl).save(tmp_path / "lbl" / f"{i}.png")
        labels[str(tmp_path / "img" / f"{i}.jpg")] = lbl
    name = "t_eval_tiny"
    register_sem_seg_folder(name, tmp_path / "img", tmp_path / "lbl", ["bg", "a", "b", "c"])
    yield name, labels
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _inputs(name, labels):
    dicts = DatasetCatalog.get(name)
    return [dict(d, height=labels[d["file_name"]].shape[0], width=labels[d["file_name"]].shape[1]) for d in dicts]


def test_loader_is_numpy2_safe_and_reads_indices(tmp_path):
    idx = np.array([[0, 3], [255, 1]], np.uint8)
    p = Image.fromarray(idx, mode="P")
    p.putpalette([10, 200, 30] * 256)
    p.save(tmp_path / "p.png")
    out = load_sem_seg_indices(str(tmp_path / "p.png"), dtype=int)
    np.testing.assert_array_equal(out, idx.astype(int))
    out[0, 0] = 7  # writable (SemSegEvaluator writes the ignore value in place)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png"):
        load_sem_seg_indices(str(tmp_path / "rgb.png"))


def test_perfect_prediction_gives_100(tiny_dataset, tmp_path):
    name, labels = tiny_dataset
    evaluator = HVLSemSegEvaluator(name, distributed=False, output_dir=str(tmp_path / "out"))
    evaluator.reset()
    inputs = _inputs(name, labels)
    for inp in inputs:  # one image per call, as inference_on_dataset does with batch size 1
        evaluator.process([inp], [{"sem_seg": _onehot(labels[inp["file_name"]], 4)}])
    res = evaluator.evaluate()["sem_seg"]
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert res[key] == pytest.approx(100.0), key
    for cls in ("bg", "a", "b", "c"):
        assert res[f"IoU-{cls}"] == pytest.approx(100.0)
    assert os.path.isfile(tmp_path / "out" / "sem_seg_evaluation.pth")


def test_hand_computed_imperfect_prediction(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 2]])
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(tmp_path / "img" / "x.jpg")
    Image.fromarray(gt).save(tmp_path / "lbl" / "x.png")
    name = "t_eval_hand"
    register_sem_seg_folder(name, tmp_path / "img", tmp_path / "lbl", ["bg", "a", "b", "c"])
    try:
        evaluator = HVLSemSegEvaluator(name, distributed=False)
        evaluator.reset()
        evaluator.process([{"file_name": str(tmp_path / "img" / "x.jpg"), "height": 2, "width": 4}],
                          [{"sem_seg": _onehot(pred, 4)}])
        res = evaluator.evaluate()["sem_seg"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    # valid pixels (GT != 255): 7. Class 0: TP 2, GT 3, pred 3 -> 2/4. Class 1: TP 2, GT 2, pred 3 -> 2/3.
    # Class 2: TP 1, GT 2, pred 1 -> 1/2. Class 3: absent from GT -> NaN, excluded from the means.
    assert res["IoU-bg"] == pytest.approx(50.0)
    assert res["IoU-a"] == pytest.approx(200 / 3)
    assert res["IoU-b"] == pytest.approx(50.0)
    assert math.isnan(res["IoU-c"])
    assert res["mIoU"] == pytest.approx((50 + 200 / 3 + 50) / 3)
    assert res["fwIoU"] == pytest.approx((3 * 50 + 2 * 200 / 3 + 2 * 50) / 7)
    assert res["pACC"] == pytest.approx(100 * 5 / 7)
    assert res["mACC"] == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3)
    assert res["ACC-a"] == pytest.approx(100.0)


def test_errors_for_bad_predictions_and_labels(tiny_dataset, tmp_path):
    name, labels = tiny_dataset
    evaluator = HVLSemSegEvaluator(name, distributed=False)
    evaluator.reset()
    inp = _inputs(name, labels)[0]
    lbl = labels[inp["file_name"]]
    with pytest.raises(ValueError, match="original image size"):
        evaluator.process([inp], [{"sem_seg": _onehot(lbl[:-1], 4)}])
    # an H x W label map instead of K x H x W scores: says what it expects (was a NumPy broadcast error)
    with pytest.raises(ValueError, match=r"shape \(\d+, \d+\); HVLSemSegEvaluator.process expects K x H x W class "
                                         r"scores with K = 4.*label map.*one_hot"):
        evaluator.process([inp], [{"sem_seg": torch.as_tensor(lbl, dtype=torch.long)}])
    with pytest.raises(ValueError, match="K = 4"):
        evaluator.process([inp], [_onehot(lbl, 5)])
    # NumPy scores are accepted
    evaluator.process([inp], [{"sem_seg": _onehot(lbl, 4).numpy()}])
    evaluator.reset()
    # a label value >= K that is not the ignore label is reported with the file name
    bad = lbl.copy()
    bad[1, 1] = 9
    Image.fromarray(bad).save(DatasetCatalog.get(name)[0]["sem_seg_file_name"])
    with pytest.raises(ValueError, match=r"0\.png.*\[9\]"):
        evaluator.process([inp], [{"sem_seg": _onehot(lbl, 4)}])


def test_build_sem_seg_evaluator(tiny_dataset, tmp_path):
    name, labels = tiny_dataset
    cfg = get_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    ev = build_sem_seg_evaluator(cfg, name)
    assert isinstance(ev, HVLSemSegEvaluator)
    assert ev._output_dir == os.path.join(cfg.OUTPUT_DIR, "inference")
    ev = build_sem_seg_evaluator(cfg, name, str(tmp_path / "elsewhere"))
    ev.reset()
    for inp in _inputs(name, labels):
        ev.process([inp], [{"sem_seg": _onehot(labels[inp["file_name"]], 4)}])
    assert ev.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)  # distributed=True, single process
    assert os.path.isfile(tmp_path / "elsewhere" / "sem_seg_predictions.json")


def test_on_generated_shapes(tmp_path, monkeypatch):
    from hvlformer.data import register_shapes

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    names = register_shapes(num_classes=4, image_size=32, num_train=1, num_val=3, seed=0, name="t_eval_shapes")
    try:
        ev = HVLSemSegEvaluator(names[1], distributed=False)
        ev.reset()
        for d in DatasetCatalog.get(names[1]):
            gt = np.asarray(Image.open(d["sem_seg_file_name"]))
            ev.process([d], [{"sem_seg": _onehot(gt, 4)}])
        assert ev.evaluate()["sem_seg"]["pACC"] == pytest.approx(100.0)
    finally:
        for n in names:
            DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)
