"""Captions of shapes images: they name exactly what is drawn; recording the content leaves the images as
they were."""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from hvlformer.data import captions as C
from hvlformer.data import shapes as S

NAMES = S.shapes_class_names(11)


def _render(i: int, size: int = 128, num_classes: int = 11, split: str = "pretrain"):
    record = {}
    image, label = S.render_shapes_image(S._image_rng(0, split, i), size, num_classes, 1 + i % (num_classes - 1),
                                         record=record)
    return image, label, record


def test_generator_output_unchanged_by_the_caption_record():
    """The segmentation images are pinned: this digest was computed with the generator before captions
    existed (6 classes at 64 and 128 px, 11 classes at 96 px, images 0-2 of seed 0 'train')."""
    h = hashlib.sha256()
    for num_classes, size in ((6, 64), (6, 128), (11, 96)):
        for i in range(3):
            image, label = S.render_shapes_image(S._image_rng(0, "train", i), size, num_classes, 1 + i % (num_classes - 1))
            h.update(image.tobytes())
            h.update(label.tobytes())
    assert h.hexdigest() == "9dc06849c1b15c51512c89593d039313faa3c6e222c9486e449e51a042df8024"
    for i in range(5):
        plain = S.render_shapes_image(S._image_rng(0, "train", i), 96, 6, 1 + i % 5)
        image, label, record = _render(i, 96, 6, "train")
        assert np.array_equal(plain[0], image) and np.array_equal(plain[1], label)


def test_record_matches_the_label_map():
    for i in range(20):
        _, label, record = _render(i)
        per_class = {}
        for inst in record["instances"]:
            per_class[inst["class"]] = per_class.get(inst["class"], 0) + inst["visible_pixels"]
        counts = np.bincount(label.ravel(), minlength=11)
        for k in range(1, 11):
            assert counts[k] == per_class.get(k, 0)
        assert record["background"]["texture"] in ("noise", "gradient", "stripes", "blotches")


def _mentioned(caption: str):
    words = re.findall(r"[a-z]+", caption)
    plurals = {v: k for k, v in C.load_caption_vocabulary()["plurals"].items()}
    found = set()
    for w in words:
        singular = plurals.get(w, w[:-1] if w.endswith("s") and w[:-1] in NAMES else w)
        if singular in NAMES[1:]:
            found.add(singular)
    return found


def test_captions_name_exactly_the_visible_kinds_with_counts():
    vocab = C.load_caption_vocabulary()
    min_pixels = vocab["min_visible_fraction"] * 128 * 128
    templates_seen = set()
    for i in range(60):
        _, label, record = _render(i)
        rng = np.random.default_rng(i)
        caption, tags = C.caption_shapes_image(record, 128, rng)
        visible = {}
        for inst in record["instances"]:
            if inst["visible_pixels"] >= min_pixels:
                visible[NAMES[inst["class"]]] = visible.get(NAMES[inst["class"]], 0) + 1
        assert tags == [n for n in NAMES[1:] if n in visible]  # sorted by class id
        assert _mentioned(caption) == set(visible)
        # every tagged kind really covers pixels of the label map
        for name in tags:
            assert (label == NAMES.index(name)).sum() >= min_pixels
        # counts: "two stars" for two visible stars, "a star" / "an ellipse" / "a large ... ellipse" for one
        for name, n in visible.items():
            noun = name if n == 1 else vocab["plurals"].get(name, name + "s")
            word = "an?" if n == 1 else vocab["number_words"][n]
            assert re.search(rf"\b{word} (?:[a-z-]+ )*{noun}\b", caption), (caption, name, n)
        matching = {t for t in vocab["templates"] if _template_matches(t, caption)}
        assert matching
        templates_seen |= matching
    assert len(templates_seen) == len(vocab["templates"])


def _template_matches(template: str, caption: str) -> bool:
    pattern = re.escape(template).replace(r"\{objects\}", ".+").replace(r"\{detailed\}", ".+")
    pattern = pattern.replace(r"\{background\}", ".+")
    return re.fullmatch(pattern, caption) is not None


def test_attribute_words_follow_the_drawing():
    """A single red speckled circle is described as such, with its size and the background's look."""
    record = {
        "background": {"texture": "stripes", "hsv": [[10.0, 0.05, 0.5], [200.0, 0.1, 0.6]]},
        "instances": [{"class": 1, "radius": 30.0, "hsv": [3.0, 0.8, 0.75], "texture": "speckle",
                       "visible_pixels": 2000}],
    }
    vocab = C.load_caption_vocabulary()
    detailed = [t for t in vocab["templates"] if "{detailed}" in t and "{background}" in t][0]
    for seed in range(50):
        caption, tags = C.caption_shapes_image(record, 128, np.random.default_rng(seed))
        if _template_matches(detailed, caption):
            break
    assert caption == "a large red speckled circle on a striped grey background."
    assert tags == ["circle"]
    record["instances"][0].update(hsv=[50.0, 0.9, 0.95], radius=12.0, texture="waves", **{"class": 6})
    record["background"]["hsv"][1][1] = 0.3
    caption, tags = C.caption_shapes_image(record, 128, np.random.default_rng(seed))
    assert caption == "a small bright yellow wavy ring on a striped muted blue background." and tags == ["ring"]


def test_hidden_instances_are_not_mentioned():
    record = {
        "background": {"texture": "noise", "hsv": [[0.0, 0.0, 0.5], [0.0, 0.0, 0.5]]},
        "instances": [{"class": 2, "radius": 20.0, "hsv": [220.0, 0.8, 0.8], "texture": "checker",
                       "visible_pixels": 3},
                      {"class": 4, "radius": 20.0, "hsv": [120.0, 0.8, 0.8], "texture": "dots",
                       "visible_pixels": 900}],
    }
    caption, tags = C.caption_shapes_image(record, 128, np.random.default_rng(0))
    assert tags == ["star"] and "square" not in caption and "star" in caption


@pytest.mark.parametrize("size", [64, 128])
def test_visible_classes_threshold(size):
    _, _, record = _render(3, size)
    vis = C.visible_classes(record, size)
    min_pixels = C.load_caption_vocabulary()["min_visible_fraction"] * size * size
    assert all(inst["visible_pixels"] >= min_pixels for insts in vis.values() for inst in insts)
    assert sum(len(v) for v in vis.values()) == sum(i["visible_pixels"] >= min_pixels for i in record["instances"])


def test_attribute_words_never_contain_a_shape_name():
    """'cross-hatched' would teach the text tower that 'cross' describes diamonds."""
    vocab = C.load_caption_vocabulary()
    words = set()
    for table in ("texture_words", "background_texture_words"):
        for phrase in vocab[table].values():
            words |= set(re.findall(r"[a-z]+", phrase))
    for table in ("hue_words", "value_words", "size_words"):
        for _, phrase in vocab[table]:
            words |= set(re.findall(r"[a-z]+", phrase))
    for template in vocab["templates"]:
        words |= set(re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", "", template)))
    assert words and not words & set(NAMES[1:])


def test_random_hue_recolours_instances_and_leaves_the_dataset_alone():
    """``random_hue_probability`` 0 is the dataset (no extra random number drawn); 1 spreads every kind's hue
    over the colour circle (the family of circle is 0 +- 12 degrees), and the captions' colour words follow."""
    for i in range(3):
        plain = S.render_shapes_image(S._image_rng(0, "train", i), 96, 6, 1 + i % 5)
        zero = S.render_shapes_image(S._image_rng(0, "train", i), 96, 6, 1 + i % 5, random_hue_probability=0.0)
        assert np.array_equal(plain[0], zero[0]) and np.array_equal(plain[1], zero[1])
    circle_hues, half_in_family, words = [], [], set()
    for i in range(60):
        record = {}
        S.render_shapes_image(S._image_rng(0, "pretrain", i), 128, 11, 1 + i % 10, record=record,
                              random_hue_probability=1.0)
        circle_hues += [inst["hsv"][0] for inst in record["instances"] if inst["class"] == 1]
        caption, _ = C.caption_shapes_image(record, 128, np.random.default_rng(i))
        words.update(w for w in ("red", "blue", "green", "yellow", "purple") if w in caption)
        record = {}
        S.render_shapes_image(S._image_rng(0, "pretrain", i), 128, 11, 1 + i % 10, record=record,
                              random_hue_probability=0.5)
        half_in_family += [min(inst["hsv"][0], 360 - inst["hsv"][0]) <= 12
                           for inst in record["instances"] if inst["class"] == 1]
    hues = np.array(circle_hues)
    assert len(hues) >= 20
    assert np.histogram(hues, bins=4, range=(0, 360))[0].min() >= 2  # every quarter of the circle
    assert 0.3 <= np.mean(half_in_family) <= 0.8  # about half keep the family (plus the random hues near red)
    assert len(words) >= 4
