"""Build open_clip models (architecture + optional weights) for the vision backbone and the text side.

Decisions (also in docs/DESIGN.md):

- ``pretrained == ""``: the model is randomly initialised and ONE warning is logged, saying the model is
  untrained and how to give weights. Nothing touches the network.
- ``pretrained`` is an existing local file: open_clip loads that state dict (strictly; a checkpoint of a
  different architecture is an error naming the file and the model). A relative path is taken from the
  working directory first, then from the repository root (:data:`REPO_ROOT`, the folder holding
  ``configs/`` and ``projects/``), so the tiny configs' shipped checkpoint is found whatever directory a
  run or a test starts in.
- ``pretrained`` looks like a path (has a path separator or a checkpoint suffix) but does not exist:
  ``FileNotFoundError`` at once, instead of asking a model hub about a misspelt path.
- any other string is an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``, ...). An unknown
  tag for the architecture is a ``ValueError`` listing the known tags (no network); a known tag whose
  download fails (offline, no cache) is a ``RuntimeError`` that says what to do, chaining the cause.
- Activation check (:func:`check_activation_match`): open_clip's pretrained metadata records whether the
  weights of a tag were trained with QuickGELU (``quick_gelu``, e.g. every ``openai`` tag). open_clip's
  plain ``ViT-B-16`` builds ``nn.GELU`` towers and only *warns* about the mismatch, which silently distorts
  the frozen text tower, T0 and the starting point of E_I / E_I^0. Here a mismatch is a ``ValueError``
  naming the matching architecture (``ViT-B-16-quickgelu`` for ``openai``), raised from the metadata alone,
  before any download. Local checkpoint files carry no such metadata and are not checked.

Weights from a checkpoint (``weights_from_checkpoint=True``, config key
``MODEL.HVLFORMER.CLIP.WEIGHTS_FROM_CHECKPOINT``, set by :func:`clip_weights_from_checkpoint` for
``--eval-only``, the demo and the predictor when ``MODEL.WEIGHTS`` is given): the architecture is built
without weights and without the random-init warning, because ``MODEL.WEIGHTS`` (a trained HVLFormer
checkpoint, which holds both CLIP towers) overwrites them; ``PRETRAINED`` is not loaded, so evaluation
works offline.

The project's own architectures (``hvlformer/modeling/backbone/model_configs/*.json``, e.g. the CPU-test
model ``HVL-Tiny-ViT``, its timm-EVA02 twin ``HVL-Tiny-EVA`` and the conv-stem ``HVL-Tiny-ConvViT-P8``, whose
timm tower :mod:`hvlformer.modeling.backbone.conv_stem_vit` registers with timm) are registered with open_clip by
:func:`register_project_model_configs`, which :func:`build_clip_model` calls itself.
"""
from __future__ import annotations

import logging
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Tuple

import open_clip
from detectron2.config import CfgNode
from torch import nn

__all__ = ["MODEL_CONFIG_DIR", "REPO_ROOT", "register_project_model_configs", "resolve_checkpoint_path",
           "check_activation_match", "build_clip_model", "clip_weights_from_checkpoint", "has_pretrained_reference",
           "reference_needed_at_test"]

logger = logging.getLogger(__name__)

#: Folder of the project's open_clip architecture configs (one JSON per architecture).
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "backbone" / "model_configs"

#: The repository root of a source checkout (projects/HVLFormer/hvlformer/modeling -> four levels up).
REPO_ROOT = Path(__file__).resolve().parents[4]

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def register_project_model_configs() -> None:
    """Make the JSON architectures in :data:`MODEL_CONFIG_DIR` known to open_clip (idempotent), and the
    project's timm towers they name (``hvl_tiny_conv_vit_p8``) known to timm."""
    # imported here, not at the top: the backbone package imports this module
    from .backbone import conv_stem_vit  # noqa: F401  (registers the timm entry point on import)

    names = {p.stem for p in MODEL_CONFIG_DIR.glob("*.json")}
    if names and not names.issubset(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def _without_root_messages(prefix: str) -> Iterator[None]:
    """Drop root-logger records starting with ``prefix`` (open_clip's own 'no weights' notice is replaced
    by our single, more specific warning)."""
    root = logging.getLogger()
    flt = _DropMessages(prefix)
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _looks_like_path(value: str) -> bool:
    return os.sep in value or (os.altsep is not None and os.altsep in value) or value.endswith(_CHECKPOINT_SUFFIXES)


def resolve_checkpoint_path(pretrained: str) -> str:
    """``pretrained`` itself when it is an existing file (absolute, or relative to the working directory);
    else, for a relative path, the same path under :data:`REPO_ROOT` when that file exists; else unchanged."""
    if not pretrained or os.path.isfile(pretrained) or os.path.isabs(pretrained):
        return pretrained
    candidate = REPO_ROOT / pretrained
    return str(candidate) if candidate.is_file() else pretrained


def check_activation_match(model_name: str, pretrained_tag: str) -> None:
    """Raise ``ValueError`` if the architecture's activation differs from the one the tag's weights were
    trained with (QuickGELU vs GELU), from open_clip's metadata only (no network).

    Args:
        model_name: open_clip architecture name (e.g. ``"ViT-B-16"`` or ``"ViT-B-16-quickgelu"``).
        pretrained_tag: an open_clip pretrained tag known for ``model_name`` (e.g. ``"openai"``).
    """
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained_tag) or {}
    model_cfg = open_clip.get_model_config(model_name) or {}
    tag_quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    model_quick_gelu = bool(model_cfg.get("quick_gelu", False))
    if tag_quick_gelu == model_quick_gelu:
        return
    if tag_quick_gelu:
        suggestion = f"{model_name}-quickgelu"
        trained, built = "QuickGELU", "nn.GELU"
    else:
        suggestion = model_name[: -len("-quickgelu")] if model_name.endswith("-quickgelu") else model_name
        trained, built = "nn.GELU", "QuickGELU"
    known = suggestion in open_clip.list_models()
    raise ValueError(
        f"CLIP activation mismatch: the {pretrained_tag!r} weights were trained with {trained}, but "
        f"architecture {model_name!r} builds {built} towers, which would distort the frozen text tower, the "
        f"reference embeddings and the initial vision encoder. Use MODEL.HVLFORMER.CLIP.MODEL_NAME "
        + (f"{suggestion!r}." if known else "with the matching activation (see open_clip.list_models()).")
    )


def clip_weights_from_checkpoint(cfg: CfgNode) -> CfgNode:
    """The config to build a model whose weights all come from ``cfg.MODEL.WEIGHTS`` (evaluation, demo,
    predictor): a copy with ``MODEL.HVLFORMER.CLIP.WEIGHTS_FROM_CHECKPOINT = True`` when ``MODEL.WEIGHTS`` is
    set, so CLIP's pretrained weights are not loaded (no download) and no E_I^0 is built; ``cfg`` itself
    when ``MODEL.WEIGHTS`` is empty (the pretrained weights are then the only weights)."""
    if not cfg.MODEL.WEIGHTS or cfg.MODEL.HVLFORMER.CLIP.WEIGHTS_FROM_CHECKPOINT:
        return cfg
    cfg = cfg.clone()
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.HVLFORMER.CLIP.WEIGHTS_FROM_CHECKPOINT = True
    if frozen:
        cfg.freeze()
    return cfg


def reference_needed_at_test(cfg: CfgNode) -> bool:
    """Whether inference runs the frozen pretrained tower E_I^0: HierVL's zero-shot relevance
    (``SRE.MODE clip_zero_shot``) or the open-vocabulary CLIP ensemble (``TEST.CLIP_ENSEMBLE.ENABLED``). Then
    ``CLIP.PRETRAINED`` is loaded even when the weights come from a checkpoint (which never holds E_I^0)."""
    return cfg.MODEL.HVLFORMER.SRE.MODE == "clip_zero_shot" or bool(cfg.TEST.CLIP_ENSEMBLE.ENABLED)


def has_pretrained_reference(clip_cfg: CfgNode, zero_shot: bool = False) -> bool:
    """Whether a frozen reference encoder E_I^0 is built from ``clip_cfg`` (``MODEL.HVLFORMER.CLIP``).

    E_I^0 must be the PRETRAINED CLIP encoder, identical on every DDP rank: it is a copy of the tower right
    after ``PRETRAINED`` was loaded (every rank loads the same file or tag; later ``MODEL.WEIGHTS`` loads
    and training never touch it). So it exists only when ``PRETRAINED`` names weights that are loaded.
    Without pretrained weights a copy would anchor L^V to a (per-rank) random initialisation, so there is
    no E_I^0 and L^V is switched off.

    Args:
        clip_cfg: ``cfg.MODEL.HVLFORMER.CLIP``.
        zero_shot: the model needs E_I^0 at inference too (:func:`reference_needed_at_test`): then it is built
            whenever ``PRETRAINED`` is set, even with ``WEIGHTS_FROM_CHECKPOINT`` (a checkpoint does not hold
            E_I^0, so evaluation of that mode loads ``PRETRAINED``). Otherwise it needs ``FROZEN_REFERENCE``
            and is skipped with ``WEIGHTS_FROM_CHECKPOINT`` (evaluation needs no L^V).
    """
    if not clip_cfg.PRETRAINED:
        return False
    return bool(zero_shot or (clip_cfg.FROZEN_REFERENCE and not clip_cfg.WEIGHTS_FROM_CHECKPOINT))


def build_clip_model(model_name: str, pretrained: str = "",
                     weights_from_checkpoint: bool = False) -> Tuple[nn.Module, Callable]:
    """Create an open_clip model and its tokenizer.

    Args:
        model_name: open_clip architecture name (``"ViT-B-16-quickgelu"``, ``"EVA02-L-14-336"``,
            ``"HVL-Tiny-ViT"``).
        pretrained: ``""`` (random init, one warning), a local checkpoint file, or an open_clip tag.
        weights_from_checkpoint: the caller loads every weight from a trained checkpoint next:
            ``pretrained`` is ignored (not loaded, not downloaded) and no random-init warning is logged.

    Returns:
        ``(model, tokenizer)``: an open_clip ``CLIP`` / ``CustomTextCLIP`` (fp32, CPU) and
        ``open_clip.get_tokenizer(model_name)``.
    """
    register_project_model_configs()
    if ":" not in model_name and open_clip.get_model_config(model_name) is None:
        raise ValueError(
            f"Unknown open_clip architecture {model_name!r}. Known: {', '.join(open_clip.list_models())}. "
            f"Project architectures live in {MODEL_CONFIG_DIR}."
        )
    pretrained = resolve_checkpoint_path(pretrained or "")

    if weights_from_checkpoint:
        with _without_root_messages("No pretrained weights loaded"):
            model = open_clip.create_model(model_name, pretrained=None)
        logger.info("CLIP %s: weights come from MODEL.WEIGHTS; MODEL.HVLFORMER.CLIP.PRETRAINED=%r is not loaded",
                    model_name, pretrained)
    elif not pretrained:
        with _without_root_messages("No pretrained weights loaded"):
            model = open_clip.create_model(model_name, pretrained=None)
        logger.warning(
            "CLIP model %r is RANDOMLY INITIALISED (MODEL.HVLFORMER.CLIP.PRETRAINED is empty): it is untrained, "
            "fine for tests and smoke runs only. To use real weights set MODEL.HVLFORMER.CLIP.PRETRAINED to a "
            "local checkpoint file, or to an open_clip tag (downloads once, needs "
            "network; 'openai' weights need the '-quickgelu' architecture, e.g. 'ViT-B-16-quickgelu') - see "
            "open_clip.list_pretrained_tags_by_model(%r).",
            model_name, model_name,
        )
    elif os.path.isfile(pretrained):
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained)
        except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError) as e:
            raise RuntimeError(
                f"Could not load the CLIP checkpoint {pretrained!r} into architecture {model_name!r}: {e}. "
                "Is it an open_clip state dict of this architecture?"
            ) from e
        logger.info("Loaded CLIP weights for %s from %s", model_name, pretrained)
    elif _looks_like_path(pretrained):
        raise FileNotFoundError(
            f"MODEL.HVLFORMER.CLIP.PRETRAINED={pretrained!r} looks like a file path but no such file exists."
        )
    else:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in known:
            raise ValueError(
                f"{pretrained!r} is neither an existing file nor an open_clip pretrained tag of {model_name!r}. "
                f"Known tags: {known or 'none'}."
            )
        check_activation_match(model_name, pretrained)
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained)
        except (RuntimeError, OSError, ValueError) as e:
            raise RuntimeError(
                f"Could not get the open_clip weights {model_name!r}/{pretrained!r} ({e}). The tag is downloaded "
                "from a model hub once and then cached. Either run once with network access (unset "
                "HF_HUB_OFFLINE), or download the checkpoint elsewhere and set MODEL.HVLFORMER.CLIP.PRETRAINED "
                "to the local file path, or set it to '' for a randomly initialised model (tests only). "
                "Set HF_HUB_OFFLINE=1 to make offline runs fail fast instead of waiting for the hub."
            ) from e
        logger.info("Loaded CLIP weights %s/%s", model_name, pretrained)

    tokenizer = open_clip.get_tokenizer(model_name)
    return model, tokenizer
