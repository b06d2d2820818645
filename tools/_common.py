"""Helpers shared by the scripts in ``tools/`` (not a command itself).

The tools run as ``python tools/<name>.py``, so this folder is on ``sys.path`` and they import this file as
``_common``; ``tests/conftest.py`` puts the folder on ``sys.path`` for the tests, which load the tools by
file path.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["emit_json", "mean_std", "confusion_of", "iou_table", "resolved_cfg", "clip_weights_id", "config_id",
           "finished_run_cfg", "settings_of_older_runs", "run_train_net", "run_checkpoints"]


def emit_json(report: Any, path: Optional[Union[str, os.PathLike]] = None) -> str:
    """Print ``report`` as indented JSON and, when ``path`` is given, also write it there (with a final
    newline; parent folders created). Returns the text."""
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    return text


def machine_environment() -> Dict[str, str]:
    """What a tool's numbers depend on besides the code and the command: the CPU and the versions of the
    libraries that compute them. Training is deterministic on one machine, but another CPU or library version
    moves the last digits of a run (docs/RESULTS.md, "(c) at 10 labels again, on a fresh machine")."""
    import platform

    import cv2
    import open_clip
    import torch

    cpu = platform.machine()  # (platform.processor() would start a subprocess)
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:  # not Linux: platform's name is all there is
        pass
    return {"cpu": cpu, "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "opencv": cv2.__version__, "open_clip": open_clip.__version__}


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """``{"mean", "std"}`` of ``values`` rounded to 2 decimals; the population standard deviation, 0.0 for
    a single value."""
    return {"mean": round(statistics.mean(values), 2),
            "std": round(statistics.pstdev(values), 2) if len(values) > 1 else 0.0}


def iou_table(confusion: np.ndarray, names: Sequence[str], ignore: Sequence[int] = ()) -> Dict[str, float]:
    """Per-class IoU (%) from a ``K x K`` confusion matrix (rows: ground truth), skipping ``ignore`` rows."""
    keep = [k for k in range(len(names)) if k not in ignore]
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    return {names[k]: float(100.0 * inter[k] / max(union[k], 1)) for k in keep}


def confusion_of(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_label: int = 255) -> np.ndarray:
    """``K x K`` counts of (label, prediction) over the pixels whose label is not ``ignore_label``."""
    valid = label != ignore_label
    return np.bincount(label[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64),
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def resolved_cfg(config: Path, opts: Sequence[str]):
    """The full (frozen) config that ``config`` + ``opts`` resolve to, ``_BASE_`` files and defaults included."""
    import argparse

    from hvlformer import setup_cfg

    return setup_cfg(argparse.Namespace(config_file=str(config), opts=list(opts)))


def clip_weights_id(cfg, root: Path) -> Dict[str, Optional[str]]:
    """What ``MODEL.HVLFORMER.CLIP.PRETRAINED`` of ``cfg`` loads: ``{"pretrained": value, "sha256": hex}``, the
    hash of the file for a local path (a relative one taken from ``root``, where the tools run
    ``train_net.py``), None for an open_clip tag or ``""`` (random weights)."""
    weights = cfg.MODEL.HVLFORMER.CLIP.PRETRAINED
    path = Path(weights) if Path(weights).is_absolute() else root / weights
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if weights and path.is_file() else None
    return {"pretrained": weights, "sha256": digest}


#: Config keys added after runs were made, with the value that gives the behaviour of the code those runs were
#: trained with: a dumped config.yaml without the key gets this value back (:func:`settings_of_older_runs`),
#: and :func:`config_id` leaves the key out at that value.
KEYS_ADDED_LATER = {
    ("MODEL", "HVLFORMER", "QUERY_NORM"): "False",          # HQG output LayerNorm, docs/DESIGN.md
    ("SEMI", "CLASS_CONSISTENCY_MIXED"): "True",             # l_class and CutMix, docs/DESIGN.md
    ("MODEL", "HVLFORMER", "QUERY_ZERO_BIAS"): "False",      # HQG biases start at zero, docs/DESIGN.md
    ("SEMI", "MASK_CONSISTENCY_CLASS_GRADIENT"): "True",     # l_mask and the class decision, docs/DESIGN.md
    ("SEMI", "UNLABELED_START_ITER"): "0",                   # supervised burn-in, docs/DESIGN.md
    ("TEST", "CLIP_ENSEMBLE", "LEVEL"): "mask",              # open vocabulary per pixel, docs/DESIGN.md
    ("DATASETS", "SHAPES", "CLASSES_FILE"): "",              # another shapes class table, docs/GETTING_STARTED.md
    ("SEMI", "CLIP_GUIDANCE_WEIGHT"): "0.0",                 # dense CLIP guidance, docs/DESIGN.md
    ("SEMI", "CLIP_GUIDANCE_FINAL_WEIGHT"): "0.0",
    ("SEMI", "CLIP_GUIDANCE_THRESHOLD"): "0.9",
    ("SEMI", "CLIP_GUIDANCE_TEMPLATE"): "a photo of a {}.",
    ("SEMI", "CLIP_GUIDANCE_EDGE_MARGIN"): "0",
    ("SEMI", "CLIP_RELABEL_OBJECTS"): "False",
    ("SEMI", "ORACLE_LABELS"): "False",
    ("SEMI", "MASK_CONSISTENCY_PIXELS"): "0",                # l_mask at image pixels, docs/DESIGN.md
    ("SEMI", "ORACLE_COVERAGE"): "all",                      # the oracle at the teacher's coverage, docs/DESIGN.md
    ("SEMI", "LABEL_REFINEMENT_ITERATIONS"): "0",            # pseudo-label refinement, docs/DESIGN.md
    ("SEMI", "LABEL_REFINEMENT_DILATIONS"): "(1, 2, 4, 8)",
    ("SEMI", "LABEL_REFINEMENT_COLOUR_SCALE"): "0.3",
    ("SEMI", "LABEL_REFINEMENT_POSITION_WEIGHT"): "0.01",
    ("DATASETS", "SHAPES", "RARE_CLASS"): "",               # a class in few labeled images, docs/RESULTS.md
    ("DATASETS", "SHAPES", "RARE_CLASS_LABELED_IMAGES"): "2",  # (no effect without RARE_CLASS)
    ("TEST", "BEST_CHECKPOINT", "METRIC"): "",               # keep the best checkpoint, docs/GETTING_STARTED.md
    ("TEST", "BEST_CHECKPOINT", "MODE"): "max",
    ("SOLVER", "LR_MULTIPLIERS"): "[]",                      # per-module learning rates, docs/DESIGN.md
}


def _parent_of(tree: Dict, path: Sequence[str]) -> Optional[Dict]:
    """The mapping that holds ``path[-1]`` in a nested config (a CfgNode or a loaded YAML dict), or None when a
    level on the way is missing."""
    node = tree
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def config_id(cfg) -> str:
    """sha256 of the dump of a resolved config, so that editing a config file, or a default, is noticed though
    the command line is the same. A :data:`KEYS_ADDED_LATER` key at its old-behaviour value is left out: the
    run trains exactly as one made before the key existed, so that run is still the same run."""
    cfg = cfg.clone()
    cfg.defrost()
    for path, old_value in KEYS_ADDED_LATER.items():
        node = _parent_of(cfg, path)
        if node is not None and path[-1] in node and str(node[path[-1]]) == old_value:
            del node[path[-1]]
            if not node and len(path) > 2:  # a group added with its keys (TEST.BEST_CHECKPOINT) goes too
                del _parent_of(cfg, path[:-1])[path[-2]]
    return hashlib.sha256(cfg.dump().encode("utf-8")).hexdigest()


def _leaves(tree: Dict, prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
    """``{path: value}`` of every leaf of a nested config mapping."""
    leaves: Dict[Tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves.update(_leaves(value, (*prefix, key)))
        else:
            leaves[(*prefix, key)] = value
    return leaves


def same_config_as_run(cfg, config_yaml: Path) -> bool:
    """Whether the run that dumped ``config_yaml`` trained with ``cfg``: every key of the run's config holds the
    value ``cfg`` has, and every key of ``cfg`` the run lacks is a :data:`KEYS_ADDED_LATER` key at its old
    behaviour. Unlike a :func:`config_id` hash stored at launch, this does not depend on when a key was listed
    there (a run made after a key existed but before it was listed hashed it in)."""
    import yaml

    now = _leaves(yaml.safe_load(cfg.dump()))
    then = _leaves(yaml.safe_load(config_yaml.read_text()) or {})
    if set(then) - set(now):
        return False  # a key the config no longer has
    for path, value in now.items():
        if path in then:
            if then[path] != value:
                return False
        elif path not in KEYS_ADDED_LATER or str(_parent_of(cfg, path)[path[-1]]) != KEYS_ADDED_LATER[path]:
            return False
    return True


def settings_of_older_runs(config_yaml: Path) -> List[str]:
    """``KEY VALUE`` options restoring, for a run's dumped ``config.yaml``, each :data:`KEYS_ADDED_LATER` key it
    lacks (a run trained before the key existed), so its checkpoint loads into the model it was trained as."""
    import yaml

    dumped = yaml.safe_load(config_yaml.read_text()) or {}
    opts: List[str] = []
    for path, value in KEYS_ADDED_LATER.items():
        node = _parent_of(dumped, path)
        if node is None or path[-1] not in node:
            opts += [".".join(path), value]
    return opts


def finished_run_cfg(run_dir: Path, weights: Optional[Path] = None, opts: Sequence[str] = ()):
    """The frozen config of a finished ``train_net.py`` run (its dumped ``config.yaml``, with
    :func:`settings_of_older_runs`) with ``MODEL.WEIGHTS`` set to its ``model_final.pth``, or to ``weights``
    (another checkpoint of the run), then ``opts`` (inference switches, which win); ``FileNotFoundError``
    naming the file when either is missing."""
    for needed in ("config.yaml", "model_final.pth"):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(f"{run_dir / needed} not found: pass the OUTPUT_DIR of a finished train_net.py run")
    return resolved_cfg(run_dir / "config.yaml", [*settings_of_older_runs(run_dir / "config.yaml"),
                                                  "MODEL.WEIGHTS", str(weights or run_dir / "model_final.pth"), *opts])


def _dumped_clip_weights(out: Path) -> Optional[str]:
    """``MODEL.HVLFORMER.CLIP.PRETRAINED`` of the ``config.yaml`` a run dumped (None without one)."""
    import yaml

    try:
        dumped = yaml.safe_load((out / "config.yaml").read_text())
        return dumped["MODEL"]["HVLFORMER"]["CLIP"]["PRETRAINED"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None


def run_train_net(train_net: Path, config: Path, opts: Sequence[str], out: Path, root: Path, threads: int,
                  finished: Callable[[Path], bool]) -> Optional[subprocess.CompletedProcess]:
    """Run ``train_net.py --config-file config *opts`` in ``root`` (``opts`` set ``OUTPUT_DIR`` to ``out``),
    unless ``out`` already holds a run that ``finished(out)`` accepts, made with the same command line
    (``benchmark_opts.json``) from the same CLIP weights (``benchmark_clip.json``: path and sha256, so a
    checkpoint retrained in place is noticed; for runs from before that file, the weights path of the run's
    dumped ``config.yaml``) and the same resolved config (``benchmark_config.json``: :func:`config_id`, so an
    edited config file is noticed; on a differing hash the run's dumped ``config.yaml`` is compared key by key,
    :func:`same_config_as_run`; runs from before that file are judged without it). Returns the finished
    process, or None when the run is reused; the caller checks its return code."""
    opts = [str(o) for o in opts]
    command, weights, resolved = out / "benchmark_opts.json", out / "benchmark_clip.json", out / "benchmark_config.json"
    cfg = resolved_cfg(config, opts)
    current, current_config = clip_weights_id(cfg, root), {"config_sha256": config_id(cfg)}
    if command.exists() and json.loads(command.read_text()) == opts and finished(out):
        if weights.exists():
            same = json.loads(weights.read_text()) == current
        else:
            same = _dumped_clip_weights(out) == current["pretrained"]
        if resolved.exists() and json.loads(resolved.read_text()) != current_config:
            # the hash differs: a config file or default was edited, or a key was listed in KEYS_ADDED_LATER after
            # the run hashed it; the run's own dumped config tells which
            same = same and (out / "config.yaml").exists() and same_config_as_run(cfg, out / "config.yaml")
        if same:
            return None
    out.mkdir(parents=True, exist_ok=True)
    command.write_text(json.dumps(opts))
    weights.write_text(json.dumps(current))
    resolved.write_text(json.dumps(current_config))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.run([sys.executable, str(train_net), "--config-file", str(config), *opts], cwd=root,
                          env=env, capture_output=True, text=True)


def run_checkpoints(run_dir: Path) -> List[Tuple[int, Path]]:
    """``(iteration, path)`` of every periodic checkpoint of a run, in training order: detectron2 names the
    model after ``n`` steps ``model_{n-1:07d}.pth``. ``model_final.pth`` is left out (it repeats the last
    periodic one when ``MAX_ITER`` is a multiple of the period)."""
    found = []
    for path in run_dir.glob("model_*.pth"):
        match = re.fullmatch(r"model_(\d+)\.pth", path.name)
        if match:
            found.append((int(match.group(1)) + 1, path))
    return sorted(found)
