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
                     "--ensemble-weights", "0", "0", "--output-dir", str(tmp_path), "--json-out", str(tmp_path / "e.json")])
    run = out["per_seed"]["0"]
    assert set(run["open_iou"]) == {"background", "circle", "square", "triangle", "star", "cross", "ring"}
    assert set(run["closed_iou"]) == {"background", "circle", "square", "triangle", "star", "cross"}
    assert run["images_with_unseen"] >= 2  # every other image holds the unseen kind
    assert (tmp_path / "e.json").exists() and (tmp_path / "text_classifier_seed0" / "model_final.pth").exists()
    assert out["summary"]["unseen_iou"]["runs"] == [round(run["open_iou"]["ring"], 2)]
    # the open confusion matrix (rows: truth) gives the IoUs it reports
    confusion = np.array(run["open_confusion"])
    assert confusion.shape == (7, 7)
    assert tool.iou_table(confusion, list(run["open_iou"]))["ring"] == run["open_iou"]["ring"]
    # the same images with every name described by the descriptions file
    assert set(run["described_iou"]) == set(run["open_iou"])
    assert run["descriptions_file"] == "datasets/descriptions/shapes_tiny_clip.json"  # the config's own file
    # the unseen name's own queries: one class distribution per query level (K + no object, summing to 1)
    queries = run["unseen_queries"]
    assert queries["images"] == run["images_with_unseen"]
    assert len(queries["class_probability_per_level"]) == 3
    for row in queries["class_probability_per_level"]:
        assert list(row) == list(run["open_iou"]) + ["no object"] and sum(row.values()) == pytest.approx(1.0, abs=0.01)
    assert all(0.0 <= v <= 1.0 for v in queries["mask_on_unseen_pixels"].values())
    # the CLIP ensemble arm: its confusion gives its IoUs; its seen cost is against the plain closed vocabulary
    ensemble = np.array(run["ensemble_open_confusion"])
    assert ensemble.shape == (7, 7) and ensemble.sum() == confusion.sum()
    assert tool.iou_table(ensemble, list(run["open_iou"])) == run["ensemble_open_iou"]
    # with CLIP's exponents at 0 (--ensemble-weights 0 0) the ensemble is the decoder: the same predictions
    assert out["setup"]["ensemble_weights"] == [0.0, 0.0]
    assert np.abs(ensemble - confusion).sum() <= 0.002 * confusion.sum()
    assert set(run["ensemble_closed_iou"]) == set(run["closed_iou"])
    assert out["summary"]["ensemble_seen_cost"]["runs"] == [
        round(run["closed_seen_miou"] - run["ensemble_open_seen_miou"], 2)]
    # LEVEL pixel and pixel_unseen, also with CLIP's exponents at 0: the decoder's predictions again
    for arm in ("pixel_ensemble", "pixel_unseen_ensemble"):
        pixel = np.array(run[f"{arm}_open_confusion"])
        assert pixel.shape == (7, 7) and np.abs(pixel - confusion).sum() <= 0.002 * confusion.sum()
        assert tool.iou_table(pixel, list(run["open_iou"])) == run[f"{arm}_open_iou"]
        assert out["summary"][f"{arm}_unseen_iou"]["runs"] == [round(run[f"{arm}_open_iou"]["ring"], 2)]
        assert out["summary"][f"{arm}_seen_cost_same_pixels"]["runs"] == [
            round(run["closed_same_pixels_seen_miou"] - run[f"{arm}_open_seen_miou"], 2)]


def test_distractor_names(tool):
    names = tool.distractor_names(200, ["background", "circle", "square", "Sky"])
    assert len(names) == len(set(names)) == 200
    assert not {"background", "circle", "square", "sky", "Sky"} & set(names)
    with pytest.raises(ValueError, match="distinct names"):
        tool.distractor_names(100000, [])


def test_smoke_run_with_distractors(tool, tmp_path):
    """--distractors: the same trained run evaluated with 6 + 30 names, the category filter (top 8) off / on;
    --opts (here the paper's prompts) reach the training run and the evaluation."""
    paper_prompts = ["MODEL.HVLFORMER.TEXT.DESCRIPTIONS", "datasets/descriptions/shapes.json"]
    out = tool.main(["--seeds", "0", "--iters", "2", "--image-size", "64", "--num-images", "3", "--workers", "0",
                     "--distractors", "30", "--filter-top-k", "8", "--output-dir", str(tmp_path),
                     "--opts", *paper_prompts])
    assert out["setup"]["opts"] == paper_prompts
    trained = (tmp_path / "text_classifier_seed0" / "config.yaml").read_text()
    assert "DESCRIPTIONS: datasets/descriptions/shapes.json" in trained
    assert out["per_seed"]["0"]["descriptions_file"] == "datasets/descriptions/shapes.json"  # not the config's own
    result = out["per_seed"]["0"]["category_filter"]
    assert result["vocabulary"] == 36 and result["top_k"] == 8
    for arm in ("no_distractors", "filter_off", "filter_on"):
        assert set(result[arm]["seen_iou"]) == {"background", "circle", "square", "triangle", "star", "cross"}
        assert result[arm]["seconds_per_image"] > 0
        assert out["summary"][f"distractors_seen_miou_{arm}"]["runs"] == [round(result[arm]["seen_miou"], 2)]
    assert out["setup"]["distractors"] == 30


def test_inference_sees_the_training_image_size(tool, tmp_path, monkeypatch):
    """Inference reads the run's own config.yaml, so test images are resized to the size the model trained at
    (here 96 px), not the tiny config's 128 px: at 128 a model trained at 96 px without scale jitter saw every
    shape 1.33x larger and called 81-87 % of the crosses square (docs/RESULTS.md, "(e) in the current
    setting"). The four predictors (plain, CLIP ensemble per mask, per pixel, per pixel for the unseen name)
    are built from it, the ensemble ones with the switch on, the given weights and their LEVEL."""
    import argparse

    import hvlformer.predictor

    args = argparse.Namespace(image_size=96, opts=[], unseen="ring", seen_classes=5, ensemble_weights=[0.3, 0.9])
    trained = tool.resolved_cfg(tool.CONFIG, ["MODEL.HVLFORMER.CLASSIFIER", "text", *tool.size_opts(args)])
    (tmp_path / "config.yaml").write_text(trained.dump())
    (tmp_path / "model_final.pth").write_bytes(b"")
    built = []

    class Recorder:
        def __init__(self, cfg):
            built.append(cfg)
            if len(built) == 4:
                raise KeyboardInterrupt  # the four predictors seen: stop before any weights are read

    monkeypatch.setattr(hvlformer.predictor, "HVLFormerPredictor", Recorder)
    with pytest.raises(KeyboardInterrupt):
        tool.evaluate(tmp_path, args)
    plain, ensemble, pixel, pixel_unseen = built
    for cfg in built:
        assert cfg.INPUT.RESIZE_BASE == 96 and tuple(cfg.INPUT.CROP.SIZE) == (96, 96)
        assert cfg.MODEL.WEIGHTS == str(tmp_path / "model_final.pth") and cfg.MODEL.HVLFORMER.CLASSIFIER == "text"
    assert not plain.TEST.CLIP_ENSEMBLE.ENABLED and ensemble.TEST.CLIP_ENSEMBLE.ENABLED
    for arm in (ensemble, pixel, pixel_unseen):
        assert arm.TEST.CLIP_ENSEMBLE.ENABLED
        assert (arm.TEST.CLIP_ENSEMBLE.SEEN_WEIGHT, arm.TEST.CLIP_ENSEMBLE.UNSEEN_WEIGHT) == (0.3, 0.9)
    assert [arm.TEST.CLIP_ENSEMBLE.LEVEL for arm in (ensemble, pixel, pixel_unseen)] == ["mask", "pixel", "pixel_unseen"]
    assert tool.resolved_cfg(tool.CONFIG, []).INPUT.RESIZE_BASE == 128  # the tiny config's own, which the tool used to evaluate at


def test_seen_classes_options(tool):
    """--seen-classes: the default 5 adds nothing to the command line (the earlier runs stay reusable and keep
    their folders); other counts set the dataset's classes and get their own folders."""
    assert tool.class_opts(5) == [] and tool.run_name(2, 5) == "text_classifier_seed2"
    assert tool.class_opts(9) == ["DATASETS.SHAPES.NUM_CLASSES", "10"]
    assert tool.run_name(2, 9) == "text_classifier_9seen_seed2"
    for bad in (0, 10):
        with pytest.raises(ValueError, match="seen-classes"):
            tool.class_opts(bad)


def test_smoke_run_more_seen_classes(tool, tmp_path):
    """6 labeled kinds (ring among them), hexagon named only at inference: the run trains on 7 classes and the
    evaluation scores background + 6 kinds + hexagon; a kind among the seen ones cannot be the unseen one; the
    seen cost is also measured on the same pixels."""
    with pytest.raises(ValueError, match="unseen must be one of"):
        tool.main(["--seeds", "0", "--iters", "1", "--seen-classes", "6", "--unseen", "ring", "--workers", "0",
                   "--image-size", "64", "--num-images", "2", "--output-dir", str(tmp_path)])
    assert not (tmp_path / "text_classifier_6seen_seed0").exists()  # refused before any training
    out = tool.main(["--seeds", "0", "--iters", "1", "--seen-classes", "6", "--unseen", "hexagon", "--workers", "0",
                     "--image-size", "64", "--num-images", "2", "--ensemble-weights", "0", "0",
                     "--output-dir", str(tmp_path)])
    trained = (tmp_path / "text_classifier_6seen_seed0" / "config.yaml").read_text()
    assert "NUM_CLASSES: 7" in trained
    run = out["per_seed"]["0"]
    kinds = ["circle", "square", "triangle", "star", "cross", "ring"]
    assert run["seen_classes"] == kinds and out["setup"]["seen_classes"] == 6
    assert list(run["open_iou"]) == ["background", *kinds, "hexagon"]
    assert list(run["closed_iou"]) == ["background", *kinds]
    assert np.array(run["open_confusion"]).shape == (8, 8)
    assert run["images_with_unseen"] == 1  # image 0 is drawn with the unseen kind guaranteed
    assert list(run["zero_shot_vlm_iou"]) == list(run["open_iou"])
    # closed_same_pixels: the closed predictions scored on the open arm's pixels; every hexagon pixel is given
    # some seen class there (it cannot be named), so a seen union grows and no seen IoU can rise
    assert list(run["closed_same_pixels_iou"]) == list(run["closed_iou"])
    lower = [run["closed_same_pixels_iou"][n] < run["closed_iou"][n] - 1e-9 for n in run["closed_iou"]]
    assert any(lower) and all(run["closed_same_pixels_iou"][n] <= run["closed_iou"][n] + 1e-9
                              for n in run["closed_iou"])
    summary = out["summary"]
    assert summary["seen_cost_same_pixels"]["runs"] == [
        round(run["closed_same_pixels_seen_miou"] - run["open_seen_miou"], 2)]
    assert summary["ensemble_seen_cost_same_pixels"]["runs"] == [
        round(run["closed_same_pixels_seen_miou"] - run["ensemble_open_seen_miou"], 2)]

