"""projects/HVLFormer/demo/demo.py on synthetic images, real photos shipped by packages, bad inputs and a video."""
import shutil
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest
from PIL import Image

from conftest import SMALL, TINY_CONFIG, load_script
from hvlformer.data.shapes import render_shapes_image

SAMPLE_DATA = Path(matplotlib.get_data_path()) / "sample_data"
# real pictures that packages ship: a JPEG photo and an RGBA PNG from matplotlib, a Debian logo if installed
REAL_IMAGES = [SAMPLE_DATA / "grace_hopper.jpg", SAMPLE_DATA / "logo2.png", Path("/usr/share/pixmaps/debian-logo.png")]


demo = load_script("projects/HVLFormer/demo/demo.py", "hvlformer_demo")


def image_size(path):
    with Image.open(path) as img:
        return img.size  # (W, H)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, single_thread):
    folder = tmp_path_factory.mktemp("demo_inputs")
    for i in range(2):  # synthetic shapes images, 64 px and 80 px
        rgb, _ = render_shapes_image(np.random.default_rng(i), 64 + 16 * i, 6)
        Image.fromarray(rgb).save(folder / f"shapes_{i}.png")
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (30, 45), dtype=np.uint8)).save(folder / "grey.png")
    real = folder / "real"
    real.mkdir()
    for path in REAL_IMAGES:
        if path.is_file():
            shutil.copy(path, real / path.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
    return folder


def run(argv, capsys):
    code = demo.main(["--no-progress", *argv])
    return code, capsys.readouterr().err


def test_demo_writes_overlays_labels_and_heatmaps(inputs, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    photo = inputs / "real" / "grace_hopper.jpg"
    code, err = run(["--config-file", TINY_CONFIG, "--input", str(inputs / "shapes_*.png"), str(inputs / "grey.png"),
                     str(photo), str(inputs / "real"), "--output", str(out), "--heatmaps", "--opts", *SMALL], capsys)
    assert code == 0, err + caplog.text
    sources = [inputs / "shapes_0.png", inputs / "shapes_1.png", inputs / "grey.png",
               *sorted((inputs / "real").iterdir())]
    assert photo in sources and len(sources) >= 5
    for src in sources:  # grace_hopper.jpg is given twice (file and folder) and processed once
        overlay, labels = out / f"{src.stem}_overlay.png", out / f"{src.stem}_labels.png"
        assert image_size(overlay) == image_size(src)
        with Image.open(labels) as img:
            assert img.mode == "L" and img.size == image_size(src)
            values = np.asarray(img)
        assert values.max() < 6
        assert (out / f"{src.stem}_heatmaps.png").is_file()
    assert len(list(out.iterdir())) == 3 * len(sources)
    # the overlay is the photo with colours over it, not a blank canvas
    overlay = np.asarray(Image.open(out / "grace_hopper_overlay.png").convert("RGB")).astype(int)
    original = np.asarray(Image.open(photo).convert("RGB")).astype(int)
    assert 0 < np.abs(overlay - original).mean() < 128


def test_bad_inputs_are_skipped_with_a_message(inputs, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    code, err = run(["--config-file", TINY_CONFIG, "--input", str(inputs / "broken.jpg"), str(inputs / "nothing.png"),
                     str(inputs / "no_match_*.png"), str(inputs / "shapes_0.png"), "--output", str(out),
                     "--opts", *SMALL], capsys)
    messages = err + caplog.text
    assert code == 1
    assert "broken.jpg" in messages and "corrupt" in messages
    assert "nothing.png" in messages and "no such file" in messages
    assert "no_match_*.png" in messages and "matches no file" in messages
    # the good image after the bad ones was still processed
    assert sorted(p.name for p in out.iterdir()) == ["shapes_0_labels.png", "shapes_0_overlay.png"]


def test_vocabulary_replaces_classes_in_the_outputs(inputs, tmp_path, capsys, caplog, monkeypatch):
    out = tmp_path / "out"
    drawn = []
    original = demo.draw_overlay
    monkeypatch.setattr(demo, "draw_overlay", lambda img, labels, meta, alpha, skip=None: drawn.append(meta) or original(
        img, labels, meta, alpha, skip))
    code, err = run(["--config-file", TINY_CONFIG, "--input", str(inputs / "shapes_0.png"), "--output", str(out),
                     "--vocabulary", "cat, dog, grass", "--heatmaps",
                     "--opts", *SMALL, "MODEL.HVLFORMER.CLASSIFIER", "text"], capsys)
    assert code == 0, err + caplog.text
    assert drawn[0].stuff_classes == ["cat", "dog", "grass"] and len(drawn[0].stuff_colors) == 3
    assert np.asarray(Image.open(out / "shapes_0_labels.png")).max() < 3
    # a vocabulary file (one name per line, comments allowed)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("# my classes\nsky\nroad, car\n")
    assert demo.read_vocabulary(str(vocab)) == (["sky", "road", "car"], None)


def test_linear_classifier_with_other_class_count_is_refused(inputs, tmp_path, capsys, caplog):
    code, err = run(["--config-file", TINY_CONFIG, "--input", str(inputs / "shapes_0.png"), "--output",
                     str(tmp_path / "out"), "--vocabulary", "cat, dog", "--opts", *SMALL], capsys)
    assert code == 2
    assert "CLASSIFIER text" in err + caplog.text


def test_video_input(tmp_path, capsys, caplog, single_thread):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write mp4v")
    for i in range(3):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    out = tmp_path / "out"
    code, err = run(["--config-file", TINY_CONFIG, "--video-input", str(video), "--output", str(out), "--opts", *SMALL],
                    capsys)
    assert code == 0, err + caplog.text
    capture = cv2.VideoCapture(str(out / "clip_overlay.mp4"))
    frames = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        assert frame.shape == (48, 64, 3)
        frames += 1
    capture.release()
    assert frames == 3


def test_output_names_are_unique():
    assert demo.output_stems(["a/x.jpg", "b/x.png", "c/y.jpg"]) == ["a_x", "b_x", "y"]
    assert demo.output_stems(["d/x.jpg", "d/x.png", "d/y.jpg"]) == ["d_x_jpg", "d_x_png", "y"]
    assert demo.output_stems(["x.jpg", "./x.jpg"]) == [f"{Path.cwd().name}_x_jpg_1", f"{Path.cwd().name}_x_jpg_2"]


def test_overlay_leaves_the_background_class_uncoloured():
    """The background class is not drawn (it used to be black at 50 % over every picture); others are."""
    from detectron2.data.catalog import Metadata

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    metadata = Metadata(name="overlay_test", stuff_classes=["background", "cat", "dog"],
                        stuff_colors=[[0, 0, 0], [255, 0, 0], [0, 0, 255]])
    labels = np.zeros((60, 80), np.int64)
    np.testing.assert_array_equal(demo.draw_overlay(image, labels, metadata), image)
    labels[10:40, 20:60] = 1
    overlay = demo.draw_overlay(image, labels, metadata).astype(int)
    outside = np.ones((60, 80), bool)
    outside[5:45, 15:65] = False  # the region, its edge and its text label
    np.testing.assert_array_equal(overlay[outside], image[outside])
    inside = overlay[12:18, 22:30] - image[12:18, 22:30]  # a corner of the region, away from its name
    assert inside[..., 0].mean() > 20 and inside[..., 2].mean() < 0  # tinted red
    # --draw-background: colours it as before
    dimmed = demo.draw_overlay(image, np.zeros((60, 80), np.int64), metadata, skip=[]).astype(int)
    assert dimmed.mean() < image.mean() - 20
    assert demo.background_ids(["Background", "cat"]) == [0] and demo.background_ids(["road"]) == []
