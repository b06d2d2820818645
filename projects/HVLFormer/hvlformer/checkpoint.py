"""Checkpoint loading and saving: strict loading for inference, resume fallback, atomic writes.

:class:`HVLFormerCheckpointer` is detectron2's ``DetectionCheckpointer`` with three changes:

- **Strict loading** (``strict=True``; evaluation, the demo and :class:`~hvlformer.predictor.HVLFormerPredictor`):
  a checkpoint that leaves tensors of the model uninitialised (missing, or of another shape) is a
  :class:`CheckpointMismatchError` that names the layers and points at the ``config.yaml`` that training
  saved next to its checkpoints. Without it, a model trained with another config (e.g.
  ``MODEL.HVLFORMER.CLASSIFIER text``) would run with randomly initialised layers and give garbage.
  Fine-tuning (``strict=False``, training from ``MODEL.WEIGHTS``) keeps detectron2's permissive loading
  and logs one summary line instead of per-key lists.
- **Resume fallback**: ``resume_or_load(resume=True)`` tries the checkpoint named in ``last_checkpoint``,
  then the other ``model_*.pth`` of the output folder, newest first, and resumes from the first one that
  loads; each damaged file is named in a warning.
- **Atomic writes**: a checkpoint (and ``last_checkpoint``) is written to a temporary file in the same
  folder and renamed, so a kill during saving never leaves a truncated file under the final name.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys

from .file_io import atomic_write

__all__ = ["HVLFormerCheckpointer", "CheckpointMismatchError", "DamagedCheckpointError", "group_layers",
           "atomic_torch_save"]

#: Errors that ``torch.load`` raises for truncated, empty or otherwise damaged files.
DAMAGED_CHECKPOINT_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
                             OSError, KeyError, AttributeError)


#: State-dict keys of the LayerNorm that ends each HQG head (``MODEL.HVLFORMER.QUERY_NORM``).
HQG_NORM_KEY = re.compile(r"(^|\.)htqg\.hqg\.heads\.\d+\.3\.(weight|bias)$")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not initialise every tensor of the model (strict loading)."""


class DamagedCheckpointError(RuntimeError):
    """The checkpoint file cannot be read (truncated, empty, not a checkpoint)."""


def group_layers(keys: Iterable[str], limit: int = 12) -> str:
    """``"a.b (bias, weight); c (4 tensors)"``: state-dict keys, sorted, grouped by their module (all but the
    last dotted part), at most ``limit`` modules then ``"... and N more layers"``."""
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for key in sorted(keys):
        module, _, leaf = key.rpartition(".")
        groups.setdefault(module or "(model)", []).append(leaf or key)
    parts = []
    for module, leaves in list(groups.items())[:limit]:
        shown = ", ".join(leaves) if len(leaves) <= 3 else f"{len(leaves)} tensors"
        parts.append(f"{module} ({shown})")
    if len(groups) > limit:
        parts.append(f"... and {len(groups) - limit} more layers")
    return "; ".join(parts)


def atomic_torch_save(data: Any, path: str) -> None:
    """``torch.save(data, path)`` through a temporary file in the same folder and ``os.replace``."""
    atomic_write(path, lambda f: torch.save(data, f), binary=True)


def _iteration_of(path: str) -> int:
    """Training iteration in a ``model_0000199.pth`` name (``model_final`` sorts last, others first)."""
    name = os.path.basename(path)
    if name == "model_final.pth":
        return 1 << 62
    match = re.fullmatch(r"model_(\d+)\.pth", name)
    return int(match.group(1)) if match else -1


class HVLFormerCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with strict inference loading, resume fallback and atomic saves.

    Args:
        model: the model (a DDP wrapper is unwrapped by detectron2).
        save_dir: output folder of ``save`` / ``resume_or_load(resume=True)``.
        strict: raise :class:`CheckpointMismatchError` when the checkpoint leaves model tensors
            uninitialised (inference); ``False`` = fine-tuning: permissive, one summary line.
        **checkpointables: optimizer, scheduler, ... as in detectron2.
    """

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *, strict: bool = False,
                 save_to_disk: Optional[bool] = None, **checkpointables: Any) -> None:
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.strict = strict
        self._loading: str = ""

    # ------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` atomically, then tag it in ``last_checkpoint`` (also atomically)."""
        if not self.save_dir or not self.save_to_disk:
            return
        data: Dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename))

    # ------------------------------------------------------------------ resuming
    def resume_candidates(self) -> List[str]:
        """Checkpoints to resume from, best first: the one named in ``last_checkpoint``, then every other
        ``model_*.pth`` of ``save_dir`` from the newest iteration down. Empty without ``last_checkpoint``
        (detectron2: nothing to resume, start from ``MODEL.WEIGHTS``)."""
        if not self.has_checkpoint():
            return []
        named = self.get_checkpoint_file()
        others = [p for p in self.get_all_checkpoint_files() if _iteration_of(p) >= 0]
        others.sort(key=_iteration_of, reverse=True)
        return [named] + [p for p in others if os.path.abspath(p) != os.path.abspath(named)]

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """``resume``: the newest checkpoint of ``save_dir`` that loads (a warning names each damaged one);
        otherwise (or when ``save_dir`` holds none) load the model weights of ``path``."""
        if resume:
            damaged: List[str] = []
            for candidate in self.resume_candidates():
                if not os.path.isfile(candidate):
                    damaged.append(f"{candidate} (missing)")
                    self.logger.warning("cannot resume from %s: the file does not exist", candidate)
                    continue
                try:
                    result = self.load(candidate)
                except DamagedCheckpointError as e:
                    damaged.append(candidate)
                    self.logger.warning("%s; trying the previous checkpoint", e)
                    continue
                if damaged:
                    self.logger.warning("resumed from %s instead of the damaged %s", candidate, ", ".join(damaged))
                return result
            if damaged:
                raise DamagedCheckpointError(
                    f"--resume: no checkpoint in {self.save_dir} can be loaded (damaged: {', '.join(damaged)}). "
                    f"Delete them and last_checkpoint to start again from MODEL.WEIGHTS, or copy an intact "
                    f"checkpoint into {self.save_dir}.")
        return self.load(path, checkpointables=[])

    # ------------------------------------------------------------------ loading
    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        """detectron2's ``load``; a missing local file is a ``FileNotFoundError`` naming it, a damaged one a
        :class:`DamagedCheckpointError` naming it."""
        if not path:
            if self.strict:
                self.logger.warning("no checkpoint given (MODEL.WEIGHTS is empty): the model is untrained")
            return super().load(path, checkpointables)
        if "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path} (MODEL.WEIGHTS)")
        self._loading = path
        try:
            return super().load(path, checkpointables)
        finally:
            self._parsed_url_during_load = None  # detectron2 leaves it set when loading raises

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            return super()._load_file(filename)
        except DAMAGED_CHECKPOINT_ERRORS as e:
            raise DamagedCheckpointError(
                f"checkpoint {filename} is damaged or not a checkpoint file ({type(e).__name__}: "
                f"{str(e)[:200]}); a kill or a full disk while it was saved cuts files off") from e

    def _config_hint(self) -> str:
        folder = os.path.dirname(os.path.abspath(self._loading)) if self._loading and "://" not in self._loading else ""
        saved = os.path.join(folder, "config.yaml") if folder else ""
        if saved and os.path.isfile(saved):
            return f"Use the config saved with the checkpoint: --config-file {saved}"
        return ("Use the config.yaml that training saved in the run's output folder (next to the checkpoint) "
                "as --config-file")

    def _load_model(self, checkpoint: Any) -> _IncompatibleKeys:
        incompatible = super()._load_model(checkpoint)
        if not self.strict or incompatible is None:
            return incompatible
        from fvcore.common.checkpoint import _filter_reused_missing_keys

        missing = _filter_reused_missing_keys(self.model, list(incompatible.missing_keys))
        reshaped = {k for k, _, _ in incompatible.incorrect_shapes}
        missing = [k for k in missing if k not in reshaped]
        query_norm_keys = [k for k in incompatible.unexpected_keys if HQG_NORM_KEY.search(k)]
        if not missing and not reshaped and not query_norm_keys:
            return incompatible
        lines = [f"checkpoint {self._loading or '(MODEL.WEIGHTS)'} does not match the model built from the config: "]
        if missing:
            lines.append(f"{len(missing)} trained tensor(s) of the model are not in the checkpoint and would stay "
                         f"randomly initialised: {group_layers(missing)}.")
        if incompatible.incorrect_shapes:
            shapes = "; ".join(f"{k}: {tuple(c)} in the checkpoint, {tuple(m)} in the model"
                               for k, c, m in incompatible.incorrect_shapes[:8])
            more = len(incompatible.incorrect_shapes) - 8
            lines.append(f" {len(incompatible.incorrect_shapes)} tensor(s) have another shape: {shapes}"
                         + (f" ... and {more} more" if more > 0 else "") + ".")
        if incompatible.unexpected_keys:
            lines.append(f" The checkpoint has {len(incompatible.unexpected_keys)} tensor(s) the model lacks: "
                         f"{group_layers(incompatible.unexpected_keys, limit=6)}.")
        if missing and all(HQG_NORM_KEY.search(k) for k in missing):
            lines.append(" The checkpoint is from before the HQG output LayerNorm (docs/DESIGN.md): load it with "
                         "MODEL.HVLFORMER.QUERY_NORM False.")
        elif query_norm_keys and not missing:
            lines.append(" The checkpoint's HQG heads end in a LayerNorm the model lacks: it was trained with "
                         "MODEL.HVLFORMER.QUERY_NORM True.")
        lines.append(" The checkpoint was trained with another config (e.g. MODEL.HVLFORMER.CLASSIFIER, the class "
                     "list, the model size or MODEL.HVLFORMER.CLIP.MODEL_NAME). " + self._config_hint() + ".")
        raise CheckpointMismatchError("".join(lines))

    def _log_incompatible_keys(self, incompatible: _IncompatibleKeys) -> None:
        """One summary line (fine-tuning) instead of detectron2's per-key lists."""
        from fvcore.common.checkpoint import _filter_reused_missing_keys

        missing = _filter_reused_missing_keys(self.model, list(incompatible.missing_keys))
        total = len(self.model.state_dict())
        if not missing and not incompatible.unexpected_keys and not incompatible.incorrect_shapes:
            self.logger.info("loaded all %d tensors of the model from %s", total, self._loading)
            return
        self.logger.warning(
            "%s %s: %d of %d model tensors loaded; %d not in the checkpoint or of another shape "
            "(initialised fresh: %s); %d checkpoint tensors unused%s",
            "loaded" if self.strict else "fine-tuning from", self._loading, total - len(missing), total,
            len(missing), group_layers(missing, limit=4) or "-",
            len(incompatible.unexpected_keys),
            f" ({group_layers(incompatible.unexpected_keys, limit=4)})" if incompatible.unexpected_keys else "")
