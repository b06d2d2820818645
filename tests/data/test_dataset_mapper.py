"""HVLFormerSemanticDatasetMapper: crop/pad, label-image alignment, test mode, validation."""
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from hvlformer.config import add_hvlformer_config
from hvlformer.data import HVLFormerSemanticDatasetMapper, register_sem_seg_folder

# Well-separated colours encoding the classes of the alignment test.
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 0, 0]], dtype=np.uint8)


def _cfg(crop=64, base=64, ratio=(0.5, 2.0), dataset=None, num_classes=5):
    cfg = get_cfg()
    add_hvlformer_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.CROP.SIZE = (crop, crop)
    cfg.INPUT.RESIZE_BASE = base
    cfg.INPUT.RESIZE_RATIO_RANGE = ratio
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    if dataset is not None:
        cfg.DATASETS.TRAIN = (dataset,)
        cfg.DATASETS.TEST = (dataset,)
    return cfg


def _write(tmp_path, image, label, stem="s"):
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "lbl").mkdir(exist_ok=True)
    img_path, lbl_path = tmp_path / "img" / f"{stem}.png", tmp_path / "lbl" / f"{stem}.png"
    Image.fromarray(image).save(img_path)  # lossless, so colours encode labels exactly
    Image.fromarray(label.astype(np.uint8)).save(lbl_path)
    return {"file_name": str(img_path), "sem_seg_file_name": str(lbl_path),
            "height": image.shape[0], "width": image.shape[1]}


def _layout(h, w):
    """An asymmetric label map: a flip or shift that is not applied to both would show."""
    lbl = np.zeros((h, w), np.uint8)
    lbl[:, w // 5 : w // 2] = 1
    lbl[: h // 3, w // 2 :] = 2
    yy, xx = np.mgrid[0:h, 0:w]
    lbl[(yy - 0.7 * h) ** 2 + (xx - 0.8 * w) ** 2 < (0.15 * min(h, w)) ** 2] = 3
    return lbl


def test_train_crop_pads_small_images_with_zero_and_ignore(tmp_path):
    h, w = 30, 40
    image = np.random.default_rng(0).integers(50, 256, (h, w, 3), dtype=np.uint8)
    label = np.random.default_rng(1).integers(0, 4, (h, w), dtype=np.uint8)
    d = _write(tmp_path, image, label)
    for color_aug in (False, True):
        cfg = _cfg(crop=64, base=40, ratio=(1.0, 1.0))  # no resize: long side stays 40
        cfg.INPUT.COLOR_AUG_SSD = color_aug
        mapper = HVLFormerSemanticDatasetMapper(cfg, is_train=True)
        for seed in range(4):
            np.random.seed(seed)
            out = mapper(d)
            img, sem = out["image"], out["sem_seg"]
            assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 64, 64)
            assert sem.dtype == torch.long and tuple(sem.shape) == (64, 64)
            pad = sem == 255
            assert int(pad.sum()) == 64 * 64 - h * w
            assert (img[:, pad] == 0).all()
            if not color_aug:
                assert (img[:, ~pad] >= 50).all()
                # the content is the source (possibly flipped), sitting in the top rows
                content = img[:, :h][:, :, ~pad[0]].permute(1, 2, 0).numpy()
                assert np.array_equal(content, image) or np.array_equal(content, image[:, ::-1])
            assert (out["height"], out["width"]) == (h, w)


def test_train_label_image_alignment_under_resize_crop_flip(tmp_path):
    h, w = 150, 200
    label = _layout(h, w)
    d = _write(tmp_path, PALETTE[label], label)
    cfg = _cfg(crop=96, base=160, ratio=(0.5, 2.0))
    mapper = HVLFormerSemanticDatasetMapper(cfg, is_train=True)
    sizes = set()
    for seed in range(12):
        np.random.seed(seed)
        out = mapper(d)
        img = out["image"].permute(1, 2, 0).numpy().astype(np.int64)
        sem = out["sem_seg"].numpy()
        assert sem.shape == (96, 96)
        # nearest palette colour of every pixel
        dist = ((img[:, :, None, :] - PALETTE[None, None].astype(np.int64)) ** 2).sum(-1)
        decoded = dist.argmin(-1)
        valid = sem != 255
        # interior pixels: the 3x3 label neighbourhood is constant (boundaries are resampled)
        padded = np.pad(sem, 1, mode="edge")
        same = np.ones_like(valid)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                same &= padded[1 + dy : 1 + dy + 96, 1 + dx : 1 + dx + 96] == sem
        interior = valid & same
        assert interior.sum() > 0.5 * valid.sum()
        agreement = (decoded[interior] == sem[interior]).mean()
        assert agreement > 0.99, (seed, agreement)
        assert (decoded[valid] == sem[valid]).mean() > 0.95
        assert (decoded[~valid] == 4).all()  # padding is black in the image and ignore in the label
        sizes.add(int(valid.sum()))
    assert len(sizes) > 3  # the random resize/crop really varies


def test_flip_happens_and_is_applied_to_both(tmp_path):
    h, w = 40, 40
    label = np.zeros((h, w), np.uint8)
    label[:, :10] = 1  # a band on the left only
    d = _write(tmp_path, PALETTE[label], label)
    cfg = _cfg(crop=40, base=40, ratio=(1.0, 1.0))
    cfg.INPUT.SIZE_DIVISIBILITY = 0
    mapper = HVLFormerSemanticDatasetMapper(cfg, is_train=True)
    sides = set()
    for seed in range(10):
        np.random.seed(seed)
        out = mapper(d)
        sem = out["sem_seg"].numpy()
        left = (sem[:, :10] == 1).all()
        right = (sem[:, -10:] == 1).all()
        assert left != right
        sides.add("left" if left else "right")
        green = out["image"][1].numpy() == 255
        np.testing.assert_array_equal(green, sem == 1)
    assert sides == {"left", "right"}


def test_test_mode_keeps_original_size_and_labels(tmp_path):
    h, w = 45, 70
    label = _layout(h, w)
    image = PALETTE[label]
    label[0, :5] = 255
    d = _write(tmp_path, image, label)
    cfg = _cfg(crop=32, base=32)
    mapper = HVLFormerSemanticDatasetMapper(cfg, is_train=False)
    out = mapper(d)
    assert tuple(out["image"].shape) == (3, h, w) and (out["height"], out["width"]) == (h, w)
    np.testing.assert_array_equal(out["sem_seg"].numpy(), label.astype(np.int64))
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), image)
    # unlabeled entries: no "sem_seg"
    out = mapper({"file_name": d["file_name"]})
    assert "sem_seg" not in out and (out["height"], out["width"]) == (h, w)
    # the input dict is not modified
    assert "image" not in d


def test_test_scale_user_data_at_training_scale_benchmarks_unchanged(tmp_path):
    """Own datasets are evaluated at TEST.INFERENCE_SCALE (short side = crop, long side capped at
    RESIZE_BASE * 2); built-in benchmarks (metadata benchmark_protocol) keep the original size. The label and height/width stay at the original size in both cases."""
    from hvlformer.data import inference_resize

    h, w = 90, 300
    label = _layout(h, w)
    d = _write(tmp_path, PALETTE[label], label)
    register_sem_seg_folder("t_scale_user", tmp_path / "img", tmp_path / "lbl", list("abcd"), image_ext=".png")
    register_sem_seg_folder("t_scale_bench", tmp_path / "img", tmp_path / "lbl", list("abcd"), image_ext=".png")
    MetadataCatalog.get("t_scale_bench").set(benchmark_protocol=True)
    cfg = _cfg(crop=32, base=40, num_classes=4)
    user = HVLFormerSemanticDatasetMapper(cfg, is_train=False, dataset_name="t_scale_user")(d)
    assert tuple(user["image"].shape) == (3, 24, 80)  # short side 32 -> long 107 > cap 80 -> 80 x 24
    assert (user["height"], user["width"]) == (h, w) and tuple(user["sem_seg"].shape) == (h, w)
    bench = HVLFormerSemanticDatasetMapper(cfg, is_train=False, dataset_name="t_scale_bench")(d)
    assert tuple(bench["image"].shape) == (3, h, w)
    # without a dataset name the config's first test dataset decides
    cfg.DATASETS.TEST = ("t_scale_bench",)
    assert tuple(HVLFormerSemanticDatasetMapper(cfg, is_train=False)(d)["image"].shape) == (3, h, w)
    cfg.DATASETS.TEST = ("t_scale_user",)
    assert tuple(HVLFormerSemanticDatasetMapper(cfg, is_train=False)(d)["image"].shape) == (3, 24, 80)
    cfg.TEST.INFERENCE_SCALE.MIN_SIZE = 0  # switched off: original size for own data too
    assert inference_resize(cfg) is None
    assert tuple(HVLFormerSemanticDatasetMapper(cfg, is_train=False)(d)["image"].shape) == (3, h, w)
    for name in ("voc_val", "cityscapes_val", "coco81_val", "ade20k_val", "shapes_val"):
        assert MetadataCatalog.get(name).benchmark_protocol is True


def test_bgr_format(tmp_path):
    label = _layout(20, 20)
    d = _write(tmp_path, PALETTE[label], label)
    cfg = _cfg()
    cfg.INPUT.FORMAT = "BGR"
    out = HVLFormerSemanticDatasetMapper(cfg, is_train=False)(d)
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), PALETTE[label][:, :, ::-1])


def test_size_divisibility_padding_in_training(tmp_path):
    label = _layout(50, 50)
    d = _write(tmp_path, PALETTE[label], label)
    cfg = _cfg(crop=60, base=50, ratio=(1.0, 1.0))
    cfg.INPUT.SIZE_DIVISIBILITY = 32
    out = HVLFormerSemanticDatasetMapper(cfg, is_train=True)(d)
    assert tuple(out["image"].shape) == (3, 64, 64)
    sem = out["sem_seg"]
    assert int((sem == 255).sum()) == 64 * 64 - 50 * 50


def test_validation_errors(tmp_path):
    label = _layout(20, 30)
    d = _write(tmp_path, PALETTE[label], label)
    mapper = HVLFormerSemanticDatasetMapper(_cfg(num_classes=3), is_train=False)
    with pytest.raises(ValueError, match=r"s\.png.*\[3\]"):
        mapper(d)  # label 3 with K = 3
    HVLFormerSemanticDatasetMapper(_cfg(num_classes=4), is_train=True)(d)
    cfg = _cfg(num_classes=3)
    cfg.INPUT.VALIDATE_LABELS = False
    assert HVLFormerSemanticDatasetMapper(cfg, is_train=False)(d)["sem_seg"].max() == 3
    # image / label size mismatch
    d2 = _write(tmp_path, PALETTE[_layout(20, 31)], label, stem="mismatch")
    d2.pop("height"), d2.pop("width")
    with pytest.raises(ValueError, match=r"mismatch\.png.*mismatch\.png"):
        HVLFormerSemanticDatasetMapper(_cfg(), is_train=True)(d2)
    # corrupt image
    bad = tmp_path / "img" / "corrupt_img.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"corrupt_img\.png.*corrupt"):
        HVLFormerSemanticDatasetMapper(_cfg(), is_train=True)({"file_name": str(bad)})
    with pytest.raises(FileNotFoundError, match="missing_img.jpg"):
        HVLFormerSemanticDatasetMapper(_cfg(), is_train=False)({"file_name": str(tmp_path / "missing_img.jpg")})
    # dataset dict size disagreeing with the file
    d3 = dict(d, height=21)
    with pytest.raises(ValueError, match=r"s\.png"):
        mapper(d3)


def test_num_classes_from_metadata_or_head(tmp_path):
    label = _layout(16, 16)
    _write(tmp_path, PALETTE[label], label)
    try:
        register_sem_seg_folder("t_mapper_ds", tmp_path / "img", tmp_path / "lbl",
                                ["a", "b", "c", "d", "e", "f", "g"], ignore_label=200, image_ext=".png")
        m = HVLFormerSemanticDatasetMapper(_cfg(dataset="t_mapper_ds", num_classes=2), is_train=True)
        assert m.num_classes == 7 and m.ignore_label == 200
        m = HVLFormerSemanticDatasetMapper(_cfg(dataset="t_mapper_ds", num_classes=2), is_train=False)
        assert m.num_classes == 7
        d = DatasetCatalog.get("t_mapper_ds")[0]
        assert m(d)["sem_seg"].shape == (16, 16)
    finally:
        DatasetCatalog.remove("t_mapper_ds")
        MetadataCatalog.remove("t_mapper_ds")
    m = HVLFormerSemanticDatasetMapper(_cfg(dataset="t_unregistered_ds", num_classes=9), is_train=True)
    assert m.num_classes == 9 and m.ignore_label == 255
    # explicit construction (no cfg)
    m = HVLFormerSemanticDatasetMapper(False, augmentations=[], image_format="RGB", ignore_label=255,
                                       size_divisibility=0, num_classes=4, validate_labels=True)
    assert m.num_classes == 4 and not m.is_train


def test_on_shapes_dataset(tmp_path):
    from hvlformer.data import generate_shapes_split

    dicts = generate_shapes_split(tmp_path, "train", 2, 64, 6, 0)
    cfg = _cfg(crop=64, base=64, num_classes=6)
    mapper = HVLFormerSemanticDatasetMapper(cfg, is_train=True)
    for d in dicts:
        out = mapper(d)
        assert tuple(out["image"].shape) == (3, 64, 64) and tuple(out["sem_seg"].shape) == (64, 64)
        vals = set(out["sem_seg"].unique().tolist())
        assert vals <= set(range(6)) | {255}


def test_augmentations_directly():
    from detectron2.data import transforms as T

    from hvlformer.data import PadTo, RandomCropPad, ResizeLongestSide

    img = np.full((30, 50, 3), 7, np.uint8)
    seg = np.zeros((30, 50), np.uint8)
    seg[:, 25:] = 1
    np.random.seed(0)
    for _ in range(5):
        aug_in = T.AugInput(img.copy(), sem_seg=seg.copy())
        T.AugmentationList([ResizeLongestSide(100, (0.5, 2.0))])(aug_in)
        assert 50 <= max(aug_in.image.shape[:2]) <= 200
        assert aug_in.image.shape[:2] == aug_in.sem_seg.shape
        assert abs(aug_in.image.shape[1] / aug_in.image.shape[0] - 50 / 30) < 0.1  # aspect kept
    aug_in = T.AugInput(img.copy(), sem_seg=seg.copy())
    T.AugmentationList([RandomCropPad((40, 40), pad=True, pad_value=0, seg_pad_value=255)])(aug_in)
    assert aug_in.image.shape == (40, 40, 3)
    assert ((aug_in.sem_seg == 255) == (aug_in.image[..., 0] == 0)).all()
    assert (aug_in.sem_seg[30:] == 255).all() and (aug_in.sem_seg[:30] != 255).all()
    # crop offsets are independent in x and y (detectron2's FixedSizeCrop uses one factor for both)
    offsets = set()
    big = np.zeros((100, 100, 3), np.uint8)
    for s in range(30):
        np.random.seed(s)
        t = RandomCropPad((20, 20)).get_transform(big).transforms[0]
        offsets.add(t.x0 == t.y0)
    assert False in offsets
    # category-area constraint: prefers crops with more than one class when possible
    np.random.seed(1)
    t = RandomCropPad((20, 20), pad=False, single_category_max_area=0.75).get_transform(img, seg)
    crop = t.apply_segmentation(seg)
    assert len(np.unique(crop)) == 2
    assert PadTo(size_divisibility=32).get_transform(img).apply_image(img).shape == (32, 64, 3)
