"""Learning-rate schedules: "WarmupPolyLR" (linear warm-up, then (1 - t)^power decay) plus detectron2's own."""
from __future__ import annotations

import torch
from detectron2.config import CfgNode
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler._LRScheduler:
    """``WarmupPolyLR``: LR factor ``(1 - iter / MAX_ITER) ** POLY_LR_POWER`` after ``WARMUP_ITERS`` of warm-up
    (``WARMUP_METHOD``, from ``WARMUP_FACTOR``). Other names go to detectron2's builder."""
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupPolyLR":
        return d2_build_lr_scheduler(cfg, optimizer)
    max_iter = cfg.SOLVER.MAX_ITER
    schedule = WarmupParamScheduler(
        PolynomialDecayParamScheduler(1.0, cfg.SOLVER.POLY_LR_POWER),
        cfg.SOLVER.WARMUP_FACTOR,
        min(cfg.SOLVER.WARMUP_ITERS / max_iter, 1.0),
        cfg.SOLVER.WARMUP_METHOD,
    )
    return LRMultiplier(optimizer, multiplier=schedule, max_iter=max_iter)
