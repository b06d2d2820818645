"""Dataset-aware class descriptions (paper Sec. 3.1 / eq. 1, supplement A.1 / Table A.1) and the frozen
reference prompts of L^L (supplement A.4.2.1 / eq. 7).

A descriptions file ``datasets/descriptions/<dataset>.json`` has the schema::

    {
      "dataset": "voc",
      "attributes": ["general consumer photos", "object-centric", ...],
      "classes": {"aeroplane": ["sentence 1", "sentence 2", "sentence 3", "sentence 4"], ...}
    }

``load_class_descriptions`` turns it into ``K`` lists of up to ``R`` prompts (class order = the dataset's
class order). Decisions:

- no path (``None`` / ``""``): one fallback prompt per class (``"a photo of a {}."``), no attributes;
- a path that does not exist: ``FileNotFoundError`` naming it (a typo must not silently fall back);
- a class of the dataset missing from the file: ``ValueError`` naming the class and the file;
  classes in the file that the dataset does not use are ignored;
- more than ``R`` descriptions: the first ``R`` are used; fewer: all that are there (at least one).
- class names are matched exactly (the names of the dataset metadata).

Prompt styles (``style``, config ``MODEL.HVLFORMER.TEXT.PROMPT_STYLE``):

- ``"descriptions"`` (default, the paper): up to ``R`` description sentences per class from ``"classes"``;
- ``"names"`` (the paper's Table 5 first row, "Fixed prompt - Class name only", which is also the prompt of
  its Table 4 baseline, TQDM): one fallback prompt per class (``"a photo of a {}."``), no attributes,
  whatever the descriptions file;
- ``"attributes"`` (the thesis, chapter 5, Sec. 5.2.3 "Attribute Combination", Table 5.4): ONE prompt per
  class, its attribute sentences joined in the order size, shape, texture, colour (``ATTRIBUTE_ORDER``),
  from a table ``{class: {"size": ..., "shape": ..., "texture": ..., "colour": ...}}`` ("color" is accepted
  for "colour"): the descriptions file's ``"attribute_descriptions"`` object if it has one, else the
  ``"classes"`` object of ``attributes/<same file name>`` next to it (the shipped
  ``datasets/descriptions/attributes/{shapes,voc}.json``). A class or an attribute missing is a
  ``ValueError``; the style needs a file (there is no fallback sentence for an attribute). Keep the four sentences short:
  the text encoder truncates a prompt at its context length (77 tokens minus the learnable context).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = [
    "ClassDescriptions",
    "load_class_descriptions",
    "resolve_descriptions_path",
    "reference_prompts",
    "DEFAULT_FALLBACK_TEMPLATE",
    "DEFAULT_REFERENCE_TEMPLATE",
    "PROMPT_STYLES",
    "ATTRIBUTE_ORDER",
]

DEFAULT_FALLBACK_TEMPLATE = "a photo of a {}."
DEFAULT_REFERENCE_TEMPLATE = "a clean origami of a {} with attributes: {}"
#: Prompt styles of :func:`load_class_descriptions`.
PROMPT_STYLES = ("descriptions", "attributes", "names")
#: The thesis's attribute combination, in its order (size + shape + texture + colour).
ATTRIBUTE_ORDER = ("size", "shape", "texture", "colour")
#: Filled into the attribute slot of the reference template when a dataset has no attributes.
NO_ATTRIBUTES = "unspecified"


@dataclass
class ClassDescriptions:
    """``prompts[k]``: the descriptions of class ``k`` (1..R strings); ``attributes``: dataset attributes;
    ``source``: the file they came from, or ``"fallback: <template>"``."""

    prompts: List[List[str]]
    attributes: List[str] = field(default_factory=list)
    source: str = ""


def _fail(path: str, msg: str) -> ValueError:
    return ValueError(f"descriptions file {path}: {msg}")


def _string_list(value, path: str, what: str) -> List[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, f"{what} must be a list of strings")
    return [v.strip() for v in value if v.strip()]


def load_class_descriptions(
    path: Optional[str],
    class_names: Sequence[str],
    num_descriptions: int = 4,
    fallback_template: str = DEFAULT_FALLBACK_TEMPLATE,
    style: str = "descriptions",
) -> ClassDescriptions:
    """Load the descriptions of ``class_names`` in prompt ``style`` (see the module docstring for the rules)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "attributes" and not path:
        raise ValueError('prompt style "attributes" needs a descriptions file with "attribute_descriptions"')
    if num_descriptions < 1:
        raise ValueError(f"num_descriptions must be >= 1, got {num_descriptions}")
    if not class_names:
        raise ValueError("class_names is empty")
    if not path or style == "names":
        return ClassDescriptions(
            prompts=[[fallback_template.format(name)] for name in class_names],
            attributes=[],
            source=f"{'class names' if style == 'names' else 'fallback'}: {fallback_template}",
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"descriptions file not found: {path}")
    with open(path, "r", encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise _fail(path, f"not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("classes"), dict):
        raise _fail(path, 'expected an object with a "classes" object {class name: [descriptions]}')
    attributes = _string_list(data.get("attributes", []), path, '"attributes"')
    if style == "attributes":
        return ClassDescriptions(prompts=[[p] for p in _attribute_prompts(data, class_names, path)],
                                 attributes=attributes, source=f"{path} (attributes)")
    classes = data["classes"]
    prompts = []
    for name in class_names:
        if name not in classes:
            raise _fail(path, f"class {name!r} has no descriptions")
        sentences = _string_list(classes[name], path, f"descriptions of class {name!r}")
        if not sentences:
            raise _fail(path, f"class {name!r} has no (non-empty) descriptions")
        prompts.append(sentences[:num_descriptions])
    return ClassDescriptions(prompts=prompts, attributes=attributes, source=str(path))


def _attribute_prompts(data: dict, class_names: Sequence[str], path: str) -> List[str]:
    """One prompt per class: its ``ATTRIBUTE_ORDER`` sentences joined by a space."""
    table = data.get("attribute_descriptions")
    if table is None:
        sibling = Path(path).parent / "attributes" / Path(path).name
        if not sibling.is_file():
            raise _fail(path, 'prompt style "attributes" needs an "attribute_descriptions" object {class name: '
                              '{"size": ..., "shape": ..., "texture": ..., "colour": ...}} in it, or the file '
                              f'{sibling} with that table as "classes"')
        with open(sibling, "r", encoding="utf-8") as f:
            try:
                table = json.load(f).get("classes")
            except json.JSONDecodeError as e:
                raise _fail(str(sibling), f"not valid JSON ({e})") from e
        path = str(sibling)
    if not isinstance(table, dict):
        raise _fail(path, "the attribute table must be an object {class name: {attribute: sentence}}")
    prompts = []
    for name in class_names:
        entry = table.get(name)
        if not isinstance(entry, dict):
            raise _fail(path, f"class {name!r} has no attribute descriptions")
        entry = {("colour" if key == "color" else key): value for key, value in entry.items()}
        sentences = []
        for attribute in ATTRIBUTE_ORDER:
            value = entry.get(attribute)
            if not isinstance(value, str) or not value.strip():
                raise _fail(path, f"class {name!r} has no {attribute!r} description")
            sentences.append(value.strip())
        prompts.append(" ".join(sentences))
    return prompts


def _repository_root() -> Optional[Path]:
    """The folder holding ``setup.py`` above this file (None when installed without the source tree)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "setup.py").is_file():
            return parent
    return None


def resolve_descriptions_path(cfg_value: str, descriptions_name: Optional[str]) -> Optional[str]:
    """Where the descriptions file is.

    ``cfg_value`` (MODEL.HVLFORMER.TEXT.DESCRIPTIONS), when set, wins: it is returned as found relative to
    the current directory, else relative to the repository root, else unchanged (so loading it fails with
    its name). Otherwise ``<dir>/descriptions/<descriptions_name>.json`` is looked up, ``<dir>`` being
    ``./datasets``, ``$DETECTRON2_DATASETS`` and ``<repository>/datasets`` in that order. None if nothing
    exists (the caller then uses the fallback template).
    """
    root = _repository_root()
    if cfg_value:
        if os.path.isabs(cfg_value) or os.path.exists(cfg_value) or root is None:
            return cfg_value
        in_root = root / cfg_value
        return str(in_root) if in_root.exists() else cfg_value
    if not descriptions_name:
        return None
    dirs = [Path("datasets")]
    if os.environ.get("DETECTRON2_DATASETS"):
        dirs.append(Path(os.environ["DETECTRON2_DATASETS"]))
    if root is not None:
        dirs.append(root / "datasets")
    for d in dirs:
        candidate = d / "descriptions" / f"{descriptions_name}.json"
        if candidate.is_file():
            return str(candidate)
    return None


def reference_prompts(
    class_names: Sequence[str],
    attributes: Sequence[str],
    template: str = DEFAULT_REFERENCE_TEMPLATE,
) -> List[str]:
    """The frozen reference prompts p^0 of L^L, one per class: ``template.format(class, attributes)`` with
    the attributes joined by ``", "`` (``"unspecified"`` when there are none). A template with a single
    ``{}`` gets the class name only."""
    attrs = ", ".join(attributes) if attributes else NO_ATTRIBUTES
    if template.count("{}") == 1:
        return [template.format(name) for name in class_names]
    return [template.format(name, attrs) for name in class_names]
