"""HVLFormerPredictor: label maps, probabilities, input formats and the open-vocabulary swap."""
import json
import os

import matplotlib
import numpy as np
import pytest
import torch

from hvlformer.predictor import HVLFormerPredictor, SemanticPrediction, normalize_scores, parse_vocabulary

SHAPES = ["background", "circle", "square", "triangle", "star", "cross"]
PHOTO = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")


@pytest.fixture(scope="module")
def make_predictor(tiny_cfg):
    """Factory: the predictor of the tiny config (weights from seed 0)."""
    def make(*opts):
        cfg = tiny_cfg(*opts)
        torch.manual_seed(0)
        return HVLFormerPredictor(cfg)

    return make


@pytest.fixture(scope="module")
def text_predictor(single_thread, make_predictor):
    return make_predictor("MODEL.HVLFORMER.CLASSIFIER", "text")


@pytest.fixture(scope="module")
def linear_predictor(single_thread, make_predictor):
    return make_predictor()


def check_prediction(result, height, width, num_classes):
    assert isinstance(result, SemanticPrediction)
    assert result.labels.shape == (height, width) and result.labels.dtype == np.int64
    assert result.labels.min() >= 0 and result.labels.max() < num_classes
    assert result.scores.shape == result.probabilities.shape == (num_classes, height, width)
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, rtol=1e-4)
    assert (result.probabilities >= 0).all()
    # same argmax as the raw scores (the normalisation is per pixel and monotonic)
    np.testing.assert_array_equal(result.probabilities.argmax(axis=0), result.labels)


def test_array_and_path_inputs(linear_predictor):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    check_prediction(linear_predictor(image), 50, 70, 6)  # BGR array (detectron2's convention)
    # RGB array of the flipped channels = the same image
    same = linear_predictor(np.ascontiguousarray(image[:, :, ::-1]), format="RGB")
    np.testing.assert_array_equal(same.labels, linear_predictor(image).labels)
    # grey, RGBA and float [0, 1] arrays are accepted
    check_prediction(linear_predictor(image[:, :, 0]), 50, 70, 6)
    check_prediction(linear_predictor(np.dstack([image, np.full((50, 70), 255, np.uint8)])), 50, 70, 6)
    check_prediction(linear_predictor(image.astype(np.float32) / 255.0), 50, 70, 6)
    # a real photo, read from its path (at its own resolution)
    photo = linear_predictor(PHOTO)
    check_prediction(photo, 600, 512, 6)
    assert photo.class_names == SHAPES


def test_bad_inputs_are_clear_errors(linear_predictor, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        linear_predictor(str(tmp_path / "missing.jpg"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        linear_predictor(str(broken))
    with pytest.raises(ValueError, match="H x W x 3"):
        linear_predictor(np.zeros((4, 5, 2), np.uint8))


def _model_input_sizes(predictor, image, **kwargs):
    """(height, width) of the tensor the model gets, and the prediction."""
    seen = []
    forward = predictor.model.forward

    def spy(batched_inputs, *args, **kw):
        seen.append(tuple(batched_inputs[0]["image"].shape[-2:]))
        assert batched_inputs[0]["image"].is_contiguous()
        return forward(batched_inputs, *args, **kw)

    predictor.model.forward = spy
    try:
        result = predictor(image, **kwargs)
    finally:
        del predictor.model.forward
    return seen[0], result


def test_inference_scale_defaults_to_the_training_scale(linear_predictor, make_predictor):
    """A large photo is segmented at the training crop's short side (128 for the tiny config), long side
    capped at RESIZE_BASE * max(RESIZE_RATIO_RANGE) (128 * 1.0 for the tiny config, which trains without
    scale jitter; 128 * 2 with the base config's 0.5-2.0x), and the result mapped back to the input size."""
    size, result = _model_input_sizes(linear_predictor, np.zeros((300, 400, 3), np.uint8))
    assert size == (96, 128)  # long side capped at the training size
    check_prediction(result, 300, 400, 6)
    jitter = make_predictor("INPUT.RESIZE_RATIO_RANGE", "(0.5, 2.0)")
    assert _model_input_sizes(jitter, np.zeros((300, 400, 3), np.uint8))[0] == (128, 171)
    size, _ = _model_input_sizes(jitter, np.zeros((100, 1000, 3), np.uint8))
    assert size == (26, 256)  # long side capped
    # the benchmark protocol keys do not change the predictor's scale
    predictor = make_predictor("INPUT.MIN_SIZE_TEST", "0")
    assert _model_input_sizes(predictor, np.zeros((300, 400, 3), np.uint8))[0] == (96, 128)


def test_inference_scale_can_be_set_or_switched_off(single_thread, make_predictor):
    predictor = make_predictor("TEST.INFERENCE_SCALE.MIN_SIZE", "32", "TEST.INFERENCE_SCALE.MAX_SIZE", "64")
    size, result = _model_input_sizes(predictor, np.zeros((48, 96, 3), np.uint8))
    assert size == (32, 64)
    check_prediction(result, 48, 96, 6)
    predictor = make_predictor("TEST.INFERENCE_SCALE.MIN_SIZE", "0")  # original size
    assert _model_input_sizes(predictor, np.zeros((48, 96, 3), np.uint8))[0] == (48, 96)


def test_sixteen_bit_and_other_depths_are_scaled_not_clipped(linear_predictor, tmp_path):
    """A 16-bit grey PNG read as 8 bit (not clipped to white); arrays of other depths likewise."""
    import cv2
    from PIL import Image

    from hvlformer.data import read_image_checked

    ramp = np.linspace(0, 65535, 40 * 60).reshape(40, 60).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "grey16.png"), ramp)
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    image = read_image_checked(tmp_path / "grey16.png")
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.abs(image[:, :, 0].astype(int) - expected).max() <= 1 and (image[:, :, 0] == image[:, :, 2]).all()
    assert 120 < image.mean() < 135  # a ramp, not "nearly all white"
    colour = (np.random.default_rng(0).random((20, 30, 3)) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "colour16.png"), colour)  # BGR on disk
    rgb = read_image_checked(tmp_path / "colour16.png")
    assert np.abs(rgb.astype(int) - colour[:, :, ::-1] // 257).max() <= 1
    Image.fromarray((ramp / 65535.0).astype(np.float32)).save(tmp_path / "float.tif")
    assert np.abs(read_image_checked(tmp_path / "float.tif")[:, :, 0].astype(int) - expected).max() <= 1
    # the predictor accepts the same depths as arrays and refuses values it cannot place
    a = linear_predictor(ramp)
    b = linear_predictor(expected)
    np.testing.assert_array_equal(a.labels, b.labels)
    with pytest.raises(ValueError, match="outside 0..65535"):
        linear_predictor(np.full((8, 8, 3), 70000, np.int32))
    with pytest.raises(ValueError, match=r"neither in \[0, 1\] nor in \[0, 255\]"):
        linear_predictor(np.full((8, 8, 3), 300.0, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        linear_predictor(np.full((8, 8, 3), np.nan, np.float32))


def test_read_only_inputs_reach_torch_as_writable_arrays(linear_predictor, monkeypatch):
    """No "The given NumPy array is not writable" warning: torch only gets owned, writable arrays."""
    from PIL import Image

    def checked(real):
        def convert(data, *args, **kwargs):
            assert not isinstance(data, np.ndarray) or data.flags.writeable, "read-only array handed to torch"
            return real(data, *args, **kwargs)
        return convert

    monkeypatch.setattr(torch, "from_numpy", checked(torch.from_numpy))
    monkeypatch.setattr(torch, "as_tensor", checked(torch.as_tensor))
    photo = Image.open(PHOTO)
    read_only = np.asarray(photo)
    assert not read_only.flags.writeable
    for image, fmt in [(photo, "RGB"), (read_only, "RGB"), (read_only, "BGR"), (PHOTO, "RGB")]:
        linear_predictor(image, format=fmt).probabilities


def test_vocabulary_swap_changes_channels_names_and_palette(text_predictor):
    image = np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    before = text_predictor(image)
    assert before.num_classes == 6
    circle_color = text_predictor.metadata.stuff_colors[1]
    names = text_predictor.set_vocabulary("cat, dog, circle, grass")
    assert names == ["cat", "dog", "circle", "grass"]
    after = text_predictor(image)
    check_prediction(after, 40, 48, 4)
    assert after.class_names == names
    # new names get the fallback prompt; a training class keeps its (dataset-description) training prompts
    training_prompts = dict(zip(SHAPES, text_predictor._training_vocabulary[1]))
    assert text_predictor.model.class_prompts == [["a photo of a cat."], ["a photo of a dog."],
                                                  training_prompts["circle"], ["a photo of a grass."]]
    assert len(training_prompts["circle"]) == 4
    meta = text_predictor.metadata
    assert meta.stuff_classes == names and len(meta.stuff_colors) == 4
    assert meta.stuff_colors[2] == circle_color  # a training class keeps its colour
    assert len({tuple(c) for c in meta.stuff_colors}) == 4  # new names get distinct colours
    text_predictor.reset_vocabulary()
    np.testing.assert_allclose(text_predictor(image).scores, before.scores, rtol=1e-5, atol=1e-6)


def test_vocabulary_with_descriptions_file(text_predictor, tmp_path):
    path = tmp_path / "pets.json"
    path.write_text(json.dumps({"attributes": ["indoor photos"],
                                "classes": {"cat": ["a small furry cat.", "a cat on a sofa."],
                                            "dog": ["a dog with floppy ears."]}}))
    try:
        text_predictor.set_vocabulary(["cat", "dog"], str(path))
        assert text_predictor.model.class_prompts == [["a small furry cat.", "a cat on a sofa."],
                                                      ["a dog with floppy ears."]]
        assert "indoor photos" in text_predictor.model.reference_class_prompts[0]
        check_prediction(text_predictor(np.zeros((32, 32, 3), np.uint8)), 32, 32, 2)
        with pytest.raises(ValueError, match="'bird' has no descriptions"):
            text_predictor.set_vocabulary(["cat", "bird"], str(path))
    finally:
        text_predictor.reset_vocabulary()


def test_linear_classifier_refuses_a_new_class_count(linear_predictor):
    with pytest.raises(ValueError, match="MODEL.HVLFORMER.CLASSIFIER text"):
        linear_predictor.set_vocabulary("cat, dog, grass")
    assert linear_predictor.class_names == SHAPES  # unchanged after the error
    renamed = ["bg", "round", "box", "tri", "star", "plus"]
    try:
        linear_predictor.set_vocabulary(renamed)  # same K: allowed, only relabels (with a warning)
        assert linear_predictor(np.zeros((32, 32, 3), np.uint8)).class_names == renamed
    finally:
        linear_predictor.reset_vocabulary()


def test_parse_vocabulary_and_normalisation():
    assert parse_vocabulary(" cat,dog ,\n grass,, ") == ["cat", "dog", "grass"]
    with pytest.raises(ValueError, match="names no class"):
        parse_vocabulary(" , ")
    with pytest.raises(ValueError, match="more than once"):
        parse_vocabulary("cat, dog, cat")
    probs = normalize_scores(torch.tensor([[[0.0, 3.0]], [[0.0, 1.0]]]))
    torch.testing.assert_close(probs[:, 0, 0], torch.tensor([0.5, 0.5]))  # all-zero scores: uniform
    torch.testing.assert_close(probs[:, 0, 1], torch.tensor([0.75, 0.25]), rtol=1e-5, atol=1e-5)


def test_missing_weights_file_is_a_clear_error(tmp_path, single_thread, make_predictor):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        make_predictor("MODEL.WEIGHTS", str(tmp_path / "nope.pth"))


def test_config_of_a_semi_split_run_builds_without_the_trainer(single_thread, make_predictor):
    """A run's dumped config names the labeled split (``shapes_labeled``), which only the trainer used to
    register: the predictor (and the demo) register the config's datasets themselves."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for catalog in (DatasetCatalog, MetadataCatalog):
        if "shapes_labeled" in catalog.list():
            catalog.remove("shapes_labeled")
    predictor = make_predictor("DATASETS.TRAIN", "('shapes_labeled',)", "DATASETS.TEST", "()", "DATASETS.SHAPES.NUM_LABELED", "4")
    assert predictor.metadata.stuff_classes == ["background", "circle", "square", "triangle", "star", "cross"]
