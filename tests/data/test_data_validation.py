"""Checked image / label readers and the generic image-folder + mask-folder dataset."""
import io

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from hvlformer.data import (
    check_dataset_root,
    check_image_label_sizes,
    load_sem_seg_folder,
    read_image_checked,
    read_label_checked,
    register_sem_seg_folder,
)


def _jpeg_bytes(h=64, w=80, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# ------------------------------------------------------------------------------------- images
def test_read_image_rgb_bgr_and_grey(tmp_path):
    arr = np.zeros((6, 5, 3), np.uint8)
    arr[..., 0] = 200  # red
    Image.fromarray(arr).save(tmp_path / "red.png")
    rgb = read_image_checked(tmp_path / "red.png")
    assert rgb.shape == (6, 5, 3) and rgb.dtype == np.uint8 and (rgb[..., 0] == 200).all()
    bgr = read_image_checked(str(tmp_path / "red.png"), format="BGR")
    assert (bgr[..., 2] == 200).all() and (bgr[..., 0] == 0).all()
    Image.fromarray(np.full((4, 7), 90, np.uint8)).save(tmp_path / "grey.png")
    grey = read_image_checked(tmp_path / "grey.png")
    assert grey.shape == (4, 7, 3) and (grey == 90).all()


def test_missing_image_names_the_file(tmp_path):
    path = tmp_path / "nope_123.jpg"
    with pytest.raises(FileNotFoundError, match="nope_123.jpg"):
        read_image_checked(path)


def test_garbage_image_is_reported_corrupt(tmp_path):
    path = tmp_path / "garbage_file.jpg"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ValueError, match=r"garbage_file\.jpg.*corrupt"):
        read_image_checked(path)


def test_truncated_jpeg_is_reported_corrupt(tmp_path):
    data = _jpeg_bytes()
    good = tmp_path / "good.jpg"
    good.write_bytes(data)
    assert read_image_checked(good).shape == (64, 80, 3)
    path = tmp_path / "truncated_file.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated_file\.jpg.*corrupt"):
        read_image_checked(path)


def test_empty_file_is_reported_corrupt(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.png.*corrupt"):
        read_image_checked(path)


# ------------------------------------------------------------------------------------- labels
def test_label_values_out_of_range_are_named(tmp_path):
    lbl = np.zeros((5, 6), np.uint8)
    lbl[0, 0], lbl[1, 1], lbl[2, 2], lbl[3, 3] = 7, 9, 255, 2
    path = tmp_path / "bad_label.png"
    Image.fromarray(lbl).save(path)
    with pytest.raises(ValueError, match=r"bad_label\.png") as e:
        read_label_checked(path, num_classes=3)
    assert "7, 9" in str(e.value) and "255" not in str(e.value).split("]")[0]
    # 255 is the ignore label, the rest is in range: fine with K = 10
    out = read_label_checked(path, num_classes=10)
    assert out.dtype == np.int64 and out.shape == (5, 6) and out[2, 2] == 255 and out[1, 1] == 9
    # without an ignore label, 255 is out of range too
    with pytest.raises(ValueError, match="255"):
        read_label_checked(path, num_classes=10, ignore_label=None)
    # no value check when num_classes is None
    assert read_label_checked(path, num_classes=None).max() == 255


def test_palette_png_reads_indices_not_luminance(tmp_path):
    idx = np.array([[0, 1, 1], [2, 0, 1]], np.uint8)
    img = Image.fromarray(idx, mode="P")
    palette = [0, 0, 0, 255, 255, 255, 200, 10, 10] + [0] * (256 * 3 - 9)
    img.putpalette(palette)
    path = tmp_path / "palette.png"
    img.save(path)
    assert Image.open(path).mode == "P"
    out = read_label_checked(path, num_classes=3)
    np.testing.assert_array_equal(out, idx.astype(np.int64))


def test_multichannel_label_is_an_error(tmp_path):
    path = tmp_path / "colour_mask.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"colour_mask\.png.*channels"):
        read_label_checked(path, num_classes=3)


def test_missing_and_corrupt_label(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.png"):
        read_label_checked(tmp_path / "gone.png", 3)
    bad = tmp_path / "broken_label.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ValueError, match=r"broken_label\.png.*corrupt"):
        read_label_checked(bad, 3)


def test_image_label_size_mismatch():
    with pytest.raises(ValueError, match=r"img_a\.jpg.*10x8.*lbl_a\.png.*12x8"):
        check_image_label_sizes(np.zeros((8, 10, 3)), np.zeros((8, 12)), "img_a.jpg", "lbl_a.png")
    check_image_label_sizes(np.zeros((8, 10, 3)), np.zeros((8, 10)), "a", "b")  # no error


def test_missing_dataset_root_mentions_env(tmp_path, monkeypatch):
    missing = tmp_path / "no_such_dataset"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="DETECTRON2_DATASETS") as e:
        check_dataset_root(missing, "VOC root")
    assert "no_such_dataset" in str(e.value) and "VOC root" in str(e.value)
    monkeypatch.delenv("DETECTRON2_DATASETS")
    with pytest.raises(FileNotFoundError, match="DETECTRON2_DATASETS"):
        check_dataset_root(missing)
    assert check_dataset_root(tmp_path) == str(tmp_path)


# ------------------------------------------------------------------------------------- folder datasets
def _make_folder(tmp_path, stems, masks=None):
    img_root, lbl_root = tmp_path / "img", tmp_path / "lbl"
    for stem in stems:
        (img_root / stem).parent.mkdir(parents=True, exist_ok=True)
        (img_root / f"{stem}.jpg").write_bytes(_jpeg_bytes(8, 8))
    for stem in stems if masks is None else masks:
        (lbl_root / stem).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(lbl_root / f"{stem}.png")
    return img_root, lbl_root


def test_load_sem_seg_folder_pairs_by_stem(tmp_path):
    img_root, lbl_root = _make_folder(tmp_path, ["b", "a", "sub/c"], masks=["a", "b", "sub/c", "extra"])
    dicts = load_sem_seg_folder(img_root, lbl_root)
    assert [d["image_id"] for d in dicts] == ["a", "b", "sub/c"]
    for d in dicts:
        assert d["file_name"].endswith(d["image_id"] + ".jpg")
        assert d["sem_seg_file_name"].endswith(d["image_id"] + ".png")
        assert d["sem_seg_file_name"].startswith(str(lbl_root))
    unlabeled = load_sem_seg_folder(img_root, None)
    assert len(unlabeled) == 3 and all("sem_seg_file_name" not in d for d in unlabeled)


def test_load_sem_seg_folder_errors(tmp_path):
    img_root, lbl_root = _make_folder(tmp_path, ["a", "lonely_image"], masks=["a"])
    with pytest.raises(ValueError, match="lonely_image"):
        load_sem_seg_folder(img_root, lbl_root)
    with pytest.raises(FileNotFoundError, match="DETECTRON2_DATASETS"):
        load_sem_seg_folder(tmp_path / "missing_images", lbl_root)
    with pytest.raises(FileNotFoundError, match="missing_masks"):
        load_sem_seg_folder(img_root, tmp_path / "missing_masks")
    with pytest.raises(FileNotFoundError, match="No images"):
        load_sem_seg_folder(img_root, lbl_root, image_ext=".tif")


def test_register_sem_seg_folder(tmp_path):
    img_root, lbl_root = _make_folder(tmp_path, ["x", "y"])
    try:
        register_sem_seg_folder("t_folder_ds", img_root, lbl_root, ["bg", "thing"], descriptions_name="voc")
        meta = MetadataCatalog.get("t_folder_ds")
        assert meta.stuff_classes == ["bg", "thing"] and meta.ignore_label == 255
        assert meta.evaluator_type == "sem_seg" and meta.descriptions_name == "voc"
        assert len(meta.stuff_colors) == 2 and meta.stuff_colors[0] != meta.stuff_colors[1]
        assert meta.sem_seg_root == str(lbl_root)
        assert len(DatasetCatalog.get("t_folder_ds")) == 2
        register_sem_seg_folder("t_folder_ds", img_root, lbl_root, ["a", "b", "c"], colors=[[1, 2, 3]] * 3)
        assert MetadataCatalog.get("t_folder_ds").stuff_colors == [[1, 2, 3]] * 3
        with pytest.raises(ValueError, match="colors"):
            register_sem_seg_folder("t_folder_ds", img_root, lbl_root, ["a", "b"], colors=[[0, 0, 0]])
    finally:
        if "t_folder_ds" in DatasetCatalog.list():
            DatasetCatalog.remove("t_folder_ds")
        if "t_folder_ds" in MetadataCatalog.list():
            MetadataCatalog.remove("t_folder_ds")
