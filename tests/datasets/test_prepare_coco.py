"""datasets/prepare_coco.py on a tiny fake COCO 2017 (instances JSON + images) in the official layout."""
import json
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from PIL import Image

from hvlformer.data import register_builtin_datasets
from hvlformer.data import load_builtin_classes
from test_builtin_datasets import evaluate_perfect, load_prepare_script

coco_script = load_prepare_script("coco")
SPEC = load_builtin_classes("coco81")
CATEGORIES = [{"id": i, "name": n, "supercategory": "thing"} for i, n in zip(SPEC["coco_category_ids"], SPEC["classes"][1:])]
PERSON, CUP, TOOTHBRUSH, DOG = 1, 47, 90, 18  # official ids -> labels 1, 42, 80, 17


def box(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def uncompressed_rle(mask):
    """COCO's uncompressed RLE (column-major run lengths, starting with zeros), as crowd annotations use."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"counts": counts, "size": list(mask.shape)}


def make_fake_coco(src: Path):
    rng = np.random.default_rng(0)
    images = {"train2017": [(1, 20, 24), (2, 16, 16), (3, 18, 22)], "val2017": [(7, 20, 24)]}
    for split, rows in images.items():
        (src / split).mkdir(parents=True)
        anns, imgs = [], []
        for image_id, h, w in rows:
            name = f"{image_id:012d}.jpg"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / split / name)
            imgs.append({"id": image_id, "file_name": name, "height": h, "width": w})
        crowd = np.zeros((20, 24), np.uint8)
        crowd[12:20, 0:10] = 1  # overlaps the person's bottom-left corner and the background
        first = rows[0][0]
        anns += [
            # the small cup comes first (lower id): "later annotation wins" would hide it under the person
            {"id": 10, "image_id": first, "category_id": CUP, "iscrowd": 0, "segmentation": box(8, 6, 14, 12), "area": 36, "bbox": [8, 6, 6, 6]},
            {"id": 11, "image_id": first, "category_id": PERSON, "iscrowd": 0, "segmentation": box(4, 2, 20, 16), "area": 224, "bbox": [4, 2, 16, 14]},
            {"id": 12, "image_id": first, "category_id": DOG, "iscrowd": 1, "segmentation": uncompressed_rle(crowd), "area": 80, "bbox": [0, 12, 10, 8]},
        ]
        if split == "train2017":
            anns.append({"id": 13, "image_id": 3, "category_id": TOOTHBRUSH, "iscrowd": 0, "segmentation": box(2, 2, 9, 9), "area": 49, "bbox": [2, 2, 7, 7]})
        (src / "annotations").mkdir(exist_ok=True)
        with open(src / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump({"images": imgs, "annotations": anns, "categories": CATEGORIES}, f)


def run(src, root, *extra):
    return coco_script.main(["--src", str(src), "--root", str(root), "--workers", "1", *extra])


def test_prepare_coco_end_to_end(tmp_path, restore_builtin, capsys):
    src, root = tmp_path / "downloads", tmp_path / "datasets"
    make_fake_coco(src)
    assert run(src, root) == 0
    out = root / "coco"
    assert (out / "images" / "train2017").is_symlink()
    masks = sorted(p.name for p in (out / "annotations_semseg81" / "train2017").iterdir())
    assert masks == ["000000000001.png", "000000000002.png", "000000000003.png"]  # every image, even without instances

    from pycocotools.coco import COCO

    coco = COCO(str(src / "annotations" / "instances_train2017.json"))
    m = {a["id"]: coco.annToMask(a).astype(bool) for a in coco.dataset["annotations"]}
    label = np.asarray(Image.open(out / "annotations_semseg81" / "train2017" / "000000000001.png"))
    assert label.shape == (20, 24)
    cup, person = 1 + SPEC["coco_category_ids"].index(CUP), 1
    assert cup == 42 and SPEC["classes"][cup] == "cup"
    assert (label[m[10]] == cup).all()  # the smaller instance is on top
    assert (label[m[11] & ~m[10]] == person).all()
    assert (label[m[12] & ~m[11]] == 255).all()  # crowd -> ignore, except under a non-crowd instance
    assert (label[~(m[10] | m[11] | m[12])] == 0).all()  # background
    assert (np.asarray(Image.open(out / "annotations_semseg81" / "train2017" / "000000000002.png")) == 0).all()
    toothbrush = np.asarray(Image.open(out / "annotations_semseg81" / "train2017" / "000000000003.png"))
    assert set(np.unique(toothbrush)) == {0, 80}  # category id 90 -> contiguous label 80

    register_builtin_datasets(root=root, datasets=["coco81"])
    assert len(DatasetCatalog.get("coco81_train")) == 3 and len(DatasetCatalog.get("coco81_val")) == 1
    for name in ("coco81_train", "coco81_val"):
        assert evaluate_perfect(name)["mIoU"] == pytest.approx(100.0)

    capsys.readouterr()
    assert run(src, root, "--splits", "val2017") == 0  # idempotent
    assert "0 masks written, 1 already there" in capsys.readouterr().out


def test_semantic_mask_rule_directly():
    from pycocotools.coco import COCO

    coco = COCO()
    big, small = box(0, 0, 10, 10), box(2, 2, 5, 5)
    coco.dataset = {
        "images": [{"id": 1, "height": 10, "width": 10, "file_name": "x.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": PERSON, "iscrowd": 0, "segmentation": big, "area": 100},
            {"id": 2, "image_id": 1, "category_id": CUP, "iscrowd": 0, "segmentation": small, "area": 9},
            {"id": 3, "image_id": 1, "category_id": DOG, "iscrowd": 0, "segmentation": big, "area": 100},
            {"id": 4, "image_id": 1, "category_id": CUP, "iscrowd": 0, "segmentation": [[1, 1, 2, 2]], "area": 0},
            {"id": 5, "image_id": 1, "category_id": CUP, "iscrowd": 0, "segmentation": [], "area": 0},
        ],
        "categories": CATEGORIES,
    }
    coco.createIndex()
    lut = coco_script.category_to_label(CATEGORIES, "x")
    label = coco_script.semantic_mask(coco, 1, lut, "x")  # degenerate polygons (ids 4, 5) are skipped
    small_m = coco.annToMask(coco.anns[2]).astype(bool)
    assert (label[small_m] == lut[CUP]).all()
    assert (label[~small_m] == lut[DOG]).all()  # equal areas: the later annotation id is on top


def test_bad_inputs_are_clear_errors(tmp_path):
    src, root = tmp_path / "downloads", tmp_path / "datasets"
    make_fake_coco(src)
    ann_file = src / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())

    # an annotation with a category the file does not define
    bad = json.loads(json.dumps(data))
    bad["annotations"][0]["category_id"] = 12  # a COCO id gap
    ann_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"category_id 12"):
        run(src, root, "--splits", "val2017")

    # categories that are not the 80 COCO things
    bad = json.loads(json.dumps(data))
    bad["categories"][0]["name"] = "human"
    ann_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"'human' != 'person'"):
        run(src, root, "--splits", "val2017")

    # an image whose size differs from its annotation entry
    bad = json.loads(json.dumps(data))
    bad["images"][0]["height"] = 21
    ann_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"sizes differ.*000000000007\.jpg"):
        run(src, root, "--splits", "val2017")

    # missing annotation file
    ann_file.unlink()
    with pytest.raises(FileNotFoundError, match=r"instances_val2017\.json.*annotations_trainval2017\.zip"):
        run(src, root, "--splits", "val2017")
    ann_file.write_text(json.dumps(data))

    # missing image
    (src / "val2017" / "000000000007.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"000000000007\.jpg"):
        run(src, root, "--splits", "val2017")
