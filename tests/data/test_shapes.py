"""The synthetic shapes dataset: determinism, labels, appearance, shape, registration, lazy generation."""
import colorsys
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

import hvlformer.data  # noqa: F401  (registers the default shapes datasets)
from conftest import REPO_ROOT
from hvlformer.data import shapes as S
from hvlformer.data.datasets import register_shapes as R




def _files(root: Path):
    return sorted(p for p in root.rglob("*") if p.is_file())


def _read_rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _read_label(path):
    img = Image.open(path)
    assert img.mode == "L", f"labels must be single-channel index PNGs, got mode {img.mode}"
    return np.asarray(img)


def _unregister(*names):
    for n in names:
        if n in DatasetCatalog.list():
            DatasetCatalog.remove(n)
        if n in MetadataCatalog.list():
            MetadataCatalog.remove(n)


@pytest.fixture(scope="module")
def split40(tmp_path_factory):
    """40 images, all 10 shape classes, 128 px."""
    root = tmp_path_factory.mktemp("shapes40")
    dicts = S.generate_shapes_split(root, "train", 40, 128, 11, seed=0)
    images = [_read_rgb(d["file_name"]) for d in dicts]
    labels = [_read_label(d["sem_seg_file_name"]) for d in dicts]
    return dicts, images, labels


# ------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 3), (b, 3), (c, 4)):
        S.generate_shapes_split(root, "train", 5, 64, 6, seed)
        S.generate_shapes_split(root, "val", 3, 64, 6, seed)
    fa, fb, fc = _files(a), _files(b), _files(c)
    rel = [p.relative_to(a) for p in fa]
    assert rel == [p.relative_to(b) for p in fb] == [p.relative_to(c) for p in fc]
    assert len(rel) == 2 * (5 + 3) + 2  # images + labels + 2 manifests
    for pa, pb in zip(fa, fb):
        assert pa.read_bytes() == pb.read_bytes(), pa
    images_a = [p for p in fa if p.suffix == ".jpg"]
    images_c = [p for p in fc if p.suffix == ".jpg"]
    assert all(x.read_bytes() != y.read_bytes() for x, y in zip(images_a, images_c))
    # train and val are drawn with different seeds
    assert (a / "images/train/00000.jpg").read_bytes() != (a / "images/val/00000.jpg").read_bytes()


# ------------------------------------------------------------------------------------- files & labels
def test_dicts_sizes_and_label_range(split40):
    dicts, images, labels = split40
    assert len(dicts) == 40
    ids = set()
    for d, img, lbl in zip(dicts, images, labels):
        assert set(d) == {"file_name", "sem_seg_file_name", "height", "width", "image_id"}
        assert Path(d["file_name"]).parent.name == "train" and Path(d["file_name"]).suffix == ".jpg"
        assert Path(d["sem_seg_file_name"]).suffix == ".png"
        assert Path(d["file_name"]).stem == Path(d["sem_seg_file_name"]).stem
        assert img.shape == (128, 128, 3) and lbl.shape == (128, 128)
        assert (d["height"], d["width"]) == (128, 128)
        assert lbl.dtype == np.uint8 and lbl.max() < 11
        ids.add(d["image_id"])
    assert len(ids) == 40


def test_every_class_appears_in_40_images(split40):
    _, _, labels = split40
    present = set(np.unique(np.stack(labels)).tolist())
    assert present == set(range(11))
    # several shapes per image, not a single object on a background
    per_image = [len(np.unique(lbl)) - 1 for lbl in labels]
    assert np.mean(per_image) >= 2.5


def test_default_class_count_covers_all_classes_too(tmp_path):
    dicts = S.generate_shapes_split(tmp_path, "train", 40, 64, 6, seed=1)
    present = set()
    for d in dicts:
        present |= set(np.unique(_read_label(d["sem_seg_file_name"])).tolist())
    assert present == set(range(6))


def test_some_instances_are_cut_by_the_border(split40):
    _, _, labels = split40
    border = np.concatenate([np.concatenate([l[0], l[-1], l[:, 0], l[:, -1]]) for l in labels])
    assert (border > 0).mean() > 0.05


def _interior(mask, it=2):
    return cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=it).astype(bool)


def _class_pixels(images, labels, cls):
    pix = [img[_interior(lbl == cls)] for img, lbl in zip(images, labels)]
    return np.concatenate(pix).astype(np.float64)


def test_labels_follow_painted_pixels_and_colour_families(split40):
    """Each class region shows its own colour family (labels follow occlusion), hue from the JSON."""
    _, images, labels = split40
    spec = S.load_shapes_classes()["classes"]
    for cls, cspec in enumerate(spec, start=1):
        pix = _class_pixels(images, labels, cls)
        assert len(pix) > 200, cspec["name"]
        hsv = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in pix[:: max(1, len(pix) // 2000)]])
        saturated = hsv[hsv[:, 1] > 0.3]
        assert len(saturated) > 0.7 * len(hsv), cspec["name"]
        hue = saturated[:, 0] * 360.0
        diff = np.abs((hue - cspec["color"]["hue"] + 180.0) % 360.0 - 180.0)
        assert np.median(diff) < cspec["color"]["hue_jitter"] + 12, cspec["name"]


def test_classes_distinguishable_by_appearance(split40):
    _, images, labels = split40
    names = S.shapes_class_names(11)
    mean_rgb, std, lap = {}, {}, {}
    for cls in range(1, 11):
        mean_rgb[names[cls]] = _class_pixels(images, labels, cls).mean(0)
        # texture statistics per instance region (eroded to skip edges): grey-level spread and the
        # mean absolute Laplacian (fine structure), medians over images
        stds, laps = [], []
        for img, lbl in zip(images, labels):
            m = _interior(lbl == cls)
            if m.sum() < 30:
                continue
            grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
            stds.append(grey[m].std())
            laps.append(np.abs(cv2.Laplacian(grey, cv2.CV_32F))[m].mean())
        std[names[cls]], lap[names[cls]] = float(np.median(stds)), float(np.median(laps))
    # distinct colour families are far apart ...
    assert np.linalg.norm(mean_rgb["circle"] - mean_rgb["square"]) > 100
    assert np.linalg.norm(mean_rgb["star"] - mean_rgb["hexagon"]) > 60
    # ... and textures differ where colour families are shared: flat speckle (circle) vs stripes
    # (triangle); fine crosshatch (diamond) vs smooth waves (ring)
    assert np.linalg.norm(mean_rgb["circle"] - mean_rgb["triangle"]) < 50
    assert std["triangle"] > 2 * std["circle"], std
    assert lap["diamond"] > 3 * lap["ring"], lap


def test_shared_colour_families_so_shape_matters():
    spec = S.load_shapes_classes()["classes"]
    shared = []
    for i, a in enumerate(spec):
        for b in spec[i + 1 :]:
            dh = abs((a["color"]["hue"] - b["color"]["hue"] + 180) % 360 - 180)
            if dh <= 15:
                assert a["shape"] != b["shape"]
                shared.append((a["name"], b["name"]))
    assert ("circle", "triangle") in shared and ("square", "cross") in shared
    assert len(shared) >= 4
    assert len({c["texture"]["type"] for c in spec}) == len(spec)  # each class its own texture


def test_shape_masks_differ():
    shapes = [c["shape"] for c in S.load_shapes_classes()["classes"]]
    masks = {s: S.draw_shape_mask(s, 101, 101, (50, 50), 40, angle=0.3) for s in shapes}
    for s, m in masks.items():
        assert 300 < m.sum() < np.pi * 41 ** 2, s
    for i, a in enumerate(shapes):
        for b in shapes[i + 1 :]:
            inter = np.logical_and(masks[a], masks[b]).sum()
            union = np.logical_or(masks[a], masks[b]).sum()
            assert inter / union < 0.9, (a, b)
    assert not masks["ring"][50, 50] and masks["circle"][50, 50]
    # partly outside the image: only the visible part is drawn
    assert S.draw_shape_mask("circle", 50, 50, (0, 0), 20).sum() < 0.3 * np.pi * 20 ** 2


def test_class_count_errors(tmp_path):
    k_max = S.max_shapes_classes()
    assert k_max == 1 + len(json.loads(S.SHAPES_CLASSES_FILE.read_text())["classes"]) >= 10
    with pytest.raises(ValueError, match=str(k_max - 1)):
        S.generate_shapes_split(tmp_path, "train", 2, 32, k_max + 1, 0)
    with pytest.raises(ValueError):
        R.register_shapes(num_classes=1, root=tmp_path, name="t_shapes_bad")


def test_any_image_size(tmp_path):
    for size in (32, 200):
        d = S.generate_shapes_split(tmp_path / str(size), "val", 2, size, 3, 0)[0]
        assert _read_rgb(d["file_name"]).shape == (size, size, 3)
        assert _read_label(d["sem_seg_file_name"]).shape == (size, size)


# ------------------------------------------------------------------------------------- registration
def test_default_registration_on_import():
    for split in ("train", "val"):
        meta = MetadataCatalog.get(f"shapes_{split}")
        assert f"shapes_{split}" in DatasetCatalog.list()
        assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255
        assert meta.descriptions_name == "shapes"


def test_registration_metadata_and_replacement(tmp_path):
    names = ("t_shapes_meta_train", "t_shapes_meta_val")
    try:
        assert R.register_shapes(4, 32, 3, 2, seed=1, root=tmp_path, name="t_shapes_meta") == names
        meta = MetadataCatalog.get(names[0])
        assert meta.stuff_classes == ["background", "circle", "square", "triangle"]
        assert len(meta.stuff_colors) == 4 and all(len(c) == 3 for c in meta.stuff_colors)
        assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
        assert meta.descriptions_name == "shapes"
        assert meta.image_root == str(tmp_path / "images" / "train")
        assert meta.sem_seg_root == str(tmp_path / "labels" / "train")
        assert not (tmp_path / "images").exists()  # lazy
        assert len(DatasetCatalog.get(names[0])) == 3 and len(DatasetCatalog.get(names[1])) == 2
        assert Path(MetadataCatalog.get(names[1]).image_root, "00001.jpg").is_file()
        # Re-registering with other parameters replaces the entries cleanly.
        R.register_shapes(6, 32, 4, 1, seed=1, root=tmp_path / "b", name="t_shapes_meta")
        assert len(MetadataCatalog.get(names[0]).stuff_classes) == 6
        assert len(DatasetCatalog.get(names[0])) == 4
        assert DatasetCatalog.list().count(names[0]) == 1
    finally:
        _unregister(*names)


def test_descriptions_cover_every_class():
    desc = json.loads((REPO_ROOT / "datasets" / "descriptions" / "shapes.json").read_text())
    assert desc["dataset"] == "shapes" and len(desc["attributes"]) >= 3
    names = S.shapes_class_names(S.max_shapes_classes())
    assert set(desc["classes"]) == set(names)
    for name in names:
        sentences = desc["classes"][name]
        assert len(sentences) == 4 and len(set(sentences)) == 4, name
        assert all(5 <= len(s.split()) < 50 for s in sentences), name


def test_lazy_generation_under_env_and_fast_second_call(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    names = ("t_shapes_lazy_train", "t_shapes_lazy_val")
    try:
        R.register_shapes(num_classes=5, image_size=48, num_train=6, num_val=2, seed=7, name="t_shapes_lazy")
        root = tmp_path / "shapes_5c_48px_seed7"
        assert not root.exists()
        dicts = DatasetCatalog.get(names[0])
        assert root.is_dir() and len(dicts) == 6
        assert Path(dicts[0]["file_name"]).parent == root / "images" / "train"
        manifest = json.loads((root / "manifest_train.json").read_text())
        assert manifest["num_images"] == 6 and manifest["seed"] == 7 and manifest["image_size"] == 48
        mtimes = {p: p.stat().st_mtime_ns for p in _files(root)}
        t0 = time.perf_counter()
        assert DatasetCatalog.get(names[0]) == dicts
        assert time.perf_counter() - t0 < 0.5
        assert {p: p.stat().st_mtime_ns for p in _files(root)} == mtimes  # nothing rewritten
        # A missing file or changed parameters trigger regeneration.
        os.remove(dicts[2]["file_name"])
        DatasetCatalog.get(names[0])
        assert Path(dicts[2]["file_name"]).is_file()
        assert len(S.generate_shapes_split(root, "train", 4, 48, 5, 7)) == 4
        assert len(list((root / "images" / "train").glob("*.jpg"))) == 4  # stale files removed
    finally:
        _unregister(*names)


def test_register_from_cfg(tmp_path, monkeypatch):
    from detectron2.config import get_cfg

    from hvlformer.config import add_hvlformer_config

    cfg = get_cfg()
    add_hvlformer_config(cfg)
    cfg.DATASETS.SHAPES.NUM_CLASSES = 3
    cfg.DATASETS.SHAPES.IMAGE_SIZE = 40
    cfg.DATASETS.SHAPES.NUM_TRAIN = 2
    cfg.DATASETS.SHAPES.NUM_VAL = 1
    cfg.DATASETS.SHAPES.SEED = 5
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    try:
        assert R.register_shapes_from_cfg(cfg) == ("shapes_train", "shapes_val")
        assert MetadataCatalog.get("shapes_val").stuff_classes == ["background", "circle", "square"]
        assert MetadataCatalog.get("shapes_train").image_root == str(tmp_path / "shapes_3c_40px_seed5" / "images" / "train")
    finally:
        monkeypatch.undo()  # back to the session's $DETECTRON2_DATASETS ...
        R.register_shapes()  # ... and the default registration, for other tests
    assert len(MetadataCatalog.get("shapes_train").stuff_classes) == 6
    assert MetadataCatalog.get("shapes_train").image_root == str(R.shapes_root(6, 128, 0) / "images" / "train")


def test_command_line(tmp_path, capsys, load_tool):
    tool = load_tool("generate_shapes")
    assert tool.main(["--out", str(tmp_path), "--num-classes", "4", "--image-size", "32", "--num-train", "3",
                   "--num-val", "2", "--seed", "2"]) == 0
    assert len(list((tmp_path / "images" / "train").glob("*.jpg"))) == 3
    assert len(list((tmp_path / "labels" / "val").glob("*.png"))) == 2
    assert "circle" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- class tables
SWAPPED = "shapes_square_cross_textures_swapped.json"


def test_swapped_textures_table_changes_only_square_and_cross_pixels():
    """The same seed with the square/cross texture swap: identical labels, identical pixels wherever the label
    is neither square nor cross; inside squares the row-to-row contrast of a grid (thin dark lines) replaces
    the checker's, i.e. square now looks like the shipped cross."""
    assert S.shapes_class_names(6, SWAPPED) == S.shapes_class_names(6)
    changed = 0
    for i in range(6):
        plain_image, plain_label = S.render_shapes_image(S._image_rng(3, "swap", i), 96, 6, guaranteed_class=2 + i % 2)
        image, label = S.render_shapes_image(S._image_rng(3, "swap", i), 96, 6, guaranteed_class=2 + i % 2,
                                             classes_file=SWAPPED)
        assert np.array_equal(label, plain_label)
        pair = np.isin(label, [2, 5])
        assert np.array_equal(image[~pair], plain_image[~pair])
        changed += int((image[pair] != plain_image[pair]).any(axis=-1).sum())
    assert changed > 1000
    table = S.load_shapes_classes(SWAPPED)["classes"]
    shipped = S.load_shapes_classes()["classes"]
    assert table[1]["texture"] == shipped[4]["texture"] and table[4]["texture"] == shipped[1]["texture"]
    assert [c for j, c in enumerate(table) if j not in (1, 4)] == [c for j, c in enumerate(shipped) if j not in (1, 4)]


def test_class_table_selects_its_own_root_and_manifest(tmp_path, monkeypatch):
    from detectron2.config import get_cfg

    from hvlformer.config import add_hvlformer_config

    cfg = get_cfg()
    add_hvlformer_config(cfg)
    assert cfg.DATASETS.SHAPES.CLASSES_FILE == ""
    cfg.DATASETS.SHAPES.IMAGE_SIZE, cfg.DATASETS.SHAPES.NUM_TRAIN, cfg.DATASETS.SHAPES.NUM_VAL = 40, 2, 1
    cfg.DATASETS.SHAPES.CLASSES_FILE = SWAPPED
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    try:
        R.register_shapes_from_cfg(cfg)
        root = Path(MetadataCatalog.get("shapes_val").image_root).parents[1]
        assert root.name.startswith("shapes_6c_40px_seed0_shapes_square_cross_textures_swapped-")
        assert root != R.shapes_root(6, 40, 0)  # never mixed with the shipped table's files
        DatasetCatalog.get("shapes_val")
        manifest = json.loads((root / "manifest_val.json").read_text())
        assert manifest["classes_sha1"] == S.classes_digest(SWAPPED) != S.classes_digest()
        cfg.DATASETS.SHAPES.CLASSES_FILE = "no_such_table.json"
        with pytest.raises(FileNotFoundError, match="CLASSES_FILE"):
            R.register_shapes_from_cfg(cfg)
    finally:
        monkeypatch.undo()
        R.register_shapes()
    assert MetadataCatalog.get("shapes_train").image_root == str(R.shapes_root(6, 128, 0) / "images" / "train")
