"""Config setup shared by train_net.py, the demo and the tools."""
from __future__ import annotations

import logging
from argparse import Namespace
from typing import List, Type

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer

from ..config import add_hvlformer_config, merge_config_file


def setup_cfg(args: Namespace, freeze: bool = True) -> CfgNode:
    """detectron2 config with the HVLFormer keys, merged from ``args.config_file`` and ``args.opts``.

    An unknown key in the YAML file or in the overrides raises a KeyError naming it.
    """
    cfg = get_cfg()
    add_hvlformer_config(cfg)
    if getattr(args, "config_file", ""):
        merge_config_file(cfg, args.config_file)
    opts = list(getattr(args, "opts", []) or [])
    check_override_keys(cfg, opts)
    cfg.merge_from_list(opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        # detectron2 defaults to CUDA; on a machine without a GPU run on the CPU instead of failing.
        logging.getLogger("hvlformer").warning("MODEL.DEVICE=%s but CUDA is not available: using the CPU",
                                               cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if freeze:
        cfg.freeze()
    return cfg


def check_override_keys(cfg: CfgNode, opts: List[str]) -> None:
    """Raise a KeyError naming the first ``KEY VALUE`` override whose key does not exist."""
    if len(opts) % 2:
        raise ValueError(f"config overrides must be KEY VALUE pairs, got an odd number: {opts}")
    for key in opts[0::2]:
        if cfg.key_is_renamed(key):
            cfg.raise_key_rename_error(key)  # "Key <old> was renamed to <new>; ..." (hvlformer.config.RENAMED_KEYS)
        node = cfg
        for part in key.split("."):
            if not isinstance(node, CfgNode) or part not in node:
                raise KeyError(f"unknown config key {key!r} (see hvlformer/config.py for the HVLFormer keys)")
            node = node[part]


def build_trainer_class(cfg: CfgNode) -> Type[DefaultTrainer]:
    """The trainer the config asks for (the supervised one unless semi-supervised training is configured)."""
    if cfg.DATASETS.TRAIN_UNLABELED:
        from .semi_trainer import SemiSupervisedTrainer

        return SemiSupervisedTrainer
    from .trainer import Trainer

    return Trainer
