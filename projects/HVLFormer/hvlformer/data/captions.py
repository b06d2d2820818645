"""Captions of synthetic ``shapes`` images, for pretraining the project's tiny vision-language model.

:func:`caption_shapes_image` turns the ``record`` that :func:`hvlformer.data.shapes.render_shapes_image`
fills (instances in painting order with their class, radius, drawn HSV colour, texture and visible pixel
count; the background's texture and colours) into one caption and its tags (the shape names it mentions).

Decisions:

* A caption mentions every shape kind that is visible (at least ``min_visible_fraction`` of the image
  after occlusion) and nothing else, so its tags are the image's presence labels; kinds are listed in a
  random order, with counts ("two stars"), and in the detailed templates with size, colour and texture
  words of one of their instances ("a large bright red speckled circle").
* Colour, size and texture words come from what was drawn (the per-instance hue jitter can make a red
  triangle orange), the background from its texture and its colours (grey when both are unsaturated).
* The word lists and templates live in :file:`classes/shapes_captions.json`; the names come from
  :file:`classes/shapes.json`.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .shapes import load_shapes_classes

__all__ = ["CAPTIONS_FILE", "load_caption_vocabulary", "visible_classes", "caption_shapes_image"]

CAPTIONS_FILE = Path(__file__).resolve().parent / "classes" / "shapes_captions.json"


@functools.lru_cache(maxsize=None)
def load_caption_vocabulary() -> Dict[str, Any]:
    """The parsed :file:`classes/shapes_captions.json`."""
    with open(CAPTIONS_FILE, "r", encoding="utf-8") as f:
        return json.load(f)


def _binned(table: Sequence[Sequence[Any]], value: float) -> str:
    word = table[0][1]
    for lower, w in table:
        if value >= lower:
            word = w
    return word


def visible_classes(record: Dict[str, Any], image_size: int) -> Dict[int, List[Dict[str, Any]]]:
    """Visible instances per class id (``{class: [instance, ...]}``, painting order) of a render record."""
    vocab = load_caption_vocabulary()
    min_pixels = vocab["min_visible_fraction"] * image_size * image_size
    out: Dict[int, List[Dict[str, Any]]] = {}
    for inst in record["instances"]:
        if inst["visible_pixels"] >= min_pixels:
            out.setdefault(int(inst["class"]), []).append(inst)
    return out


def _colour_word(hsv: Sequence[float]) -> str:
    vocab = load_caption_vocabulary()
    return _binned(vocab["value_words"], hsv[2]) + _binned(vocab["hue_words"], hsv[0] % 360.0)


def _background_phrase(background: Dict[str, Any]) -> str:
    vocab = load_caption_vocabulary()
    (h1, s1, _), (h2, s2, _) = background["hsv"]
    if max(s1, s2) < vocab["grey_saturation"]:
        colour = "grey"
    else:
        colour = "muted " + _binned(vocab["hue_words"], (h1 if s1 >= s2 else h2) % 360.0)
    return f"{vocab['background_texture_words'][background['texture']]} {colour}"


def _join(parts: List[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_shapes_image(record: Dict[str, Any], image_size: int, rng: np.random.Generator) -> Tuple[str, List[str]]:
    """One caption for a rendered image and its tags (the shape names it mentions, sorted by class id).

    Args:
        record: the ``record`` filled by ``render_shapes_image``.
        image_size: the image side in pixels.
        rng: chooses the template, the order of the kinds and which instance's attributes are described.
    """
    vocab = load_caption_vocabulary()
    classes = load_shapes_classes()["classes"]
    visible = visible_classes(record, image_size)
    template = vocab["templates"][int(rng.integers(len(vocab["templates"])))]
    order = [sorted(visible)[j] for j in rng.permutation(len(visible))]
    plain, detailed = [], []
    for cls in order:
        name = classes[cls - 1]["name"]
        insts = visible[cls]
        n = len(insts)
        noun = name if n == 1 else vocab["plurals"].get(name, name + "s")
        count = vocab["number_words"][n] if n < len(vocab["number_words"]) else str(n)
        if n == 1 and name[0] in "aeiou":
            count = "an"
        plain.append(f"{count} {noun}")
        inst = insts[int(rng.integers(n))]
        texture = vocab["texture_words"][inst["texture"]]
        colour = _colour_word(inst["hsv"])
        if n == 1:
            size = _binned(vocab["size_words"], inst["radius"] / image_size)
            detailed.append(f"a {size} {colour} {texture} {noun}")
        else:
            detailed.append(f"{count} {colour} {texture} {noun}")
    objects = _join(plain) if plain else "nothing but a background"
    details = _join(detailed) if detailed else "nothing but a background"
    caption = template.format(objects=objects, detailed=details, background=_background_phrase(record["background"]))
    tags = [classes[c - 1]["name"] for c in sorted(visible)]
    return caption, tags
