"""Config setup shared by train_net.py, the demo and the tools."""
from __future__ import annotations

from argparse import Namespace
from typing import Type

from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer

from ..config import add_hvlformer_config


def setup_cfg(args: Namespace, freeze: bool = True) -> CfgNode:
    """detectron2 config with the HVLFormer keys, merged from ``args.config_file`` and ``args.opts``.

    An unknown key in the YAML file or in the overrides raises a KeyError naming it.
    """
    cfg = get_cfg()
    add_hvlformer_config(cfg)
    if getattr(args, "config_file", ""):
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(getattr(args, "opts", []) or []))
    if freeze:
        cfg.freeze()
    return cfg


def build_trainer_class(cfg: CfgNode) -> Type[DefaultTrainer]:
    """The trainer the config asks for (the supervised one unless semi-supervised training is configured)."""
    from .trainer import Trainer

    return Trainer
