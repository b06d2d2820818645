"""Optimizer with HVLFormer's parameter groups (paper section 4.1) and Mask2Former's full-model gradient clipping."""
from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
from detectron2.config import CfgNode
from torch import nn

NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)
# Parameter names (last component) that are embeddings: no weight decay with WEIGHT_DECAY_EMBED = 0.
EMBEDDING_NAMES = ("positional_embedding", "class_embedding", "pos_embed", "cls_token", "level_embed",
                   "context", "logit_scale", "no_object_embedding")
# Parameter-name prefixes of the PRETRAINED encoder that BACKBONE_MULTIPLIER applies to: the CLIP vision
# tower only. The backbone's simple feature pyramid (``backbone.pyramid.*``, randomly initialised
# ConvTranspose / norm layers) is new and trains at the head LR, like every other new layer.
PRETRAINED_ENCODER_PREFIXES = ("backbone.visual.",)


def lr_multiplier_for(name: str, lr_multipliers: Sequence[Tuple[str, float]]) -> Optional[float]:
    """The multiplier of the longest prefix in ``lr_multipliers`` that ``name`` starts with; None if none does."""
    matches = [(len(prefix), float(multiplier)) for prefix, multiplier in lr_multipliers if name.startswith(prefix)]
    return max(matches)[1] if matches else None


def check_lr_multipliers(model: nn.Module, lr_multipliers: Sequence[Sequence[Any]]) -> List[Tuple[str, float]]:
    """``SOLVER.LR_MULTIPLIERS`` as ``(prefix, multiplier)`` pairs; a ValueError for a malformed entry, a
    negative multiplier, a prefix listed twice or a prefix that matches no trainable parameter (a typo would
    silently train at the base LR)."""
    pairs: List[Tuple[str, float]] = []
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    for entry in lr_multipliers:
        if len(entry) != 2 or not isinstance(entry[0], str) or not isinstance(entry[1], (int, float)):
            raise ValueError(f"SOLVER.LR_MULTIPLIERS entries must be [prefix, multiplier] pairs, got {entry!r}")
        prefix, multiplier = entry[0], float(entry[1])
        if multiplier < 0:
            raise ValueError(f"SOLVER.LR_MULTIPLIERS: the multiplier of {prefix!r} must be >= 0, got {multiplier}")
        if any(prefix == listed for listed, _ in pairs):
            raise ValueError(f"SOLVER.LR_MULTIPLIERS: {prefix!r} is listed twice")
        if not any(name.startswith(prefix) for name in names):
            roots = sorted({".".join(name.split(".")[:2]) for name in names})
            raise ValueError(f"SOLVER.LR_MULTIPLIERS: no trainable parameter starts with {prefix!r}; the model's "
                             f"parameters start with: {', '.join(roots)}")
        pairs.append((prefix, multiplier))
    return pairs


def get_parameter_groups(model: nn.Module, base_lr: float, weight_decay: float, weight_decay_norm: float,
                         weight_decay_embed: float, backbone_multiplier: float,
                         pretrained_prefixes: Sequence[str] = PRETRAINED_ENCODER_PREFIXES,
                         lr_multipliers: Sequence[Tuple[str, float]] = ()) -> List[Dict[str, Any]]:
    """One group per trainable parameter with its LR and weight decay.

    - parameters whose name starts with one of ``pretrained_prefixes`` (default ``backbone.visual.``: the
      fine-tuned, pretrained CLIP vision encoder E_I): LR x ``backbone_multiplier``; the new layers of the
      backbone (the simple feature pyramid ``backbone.pyramid.*``) and everything else: the base LR;
    - ``lr_multipliers`` (``SOLVER.LR_MULTIPLIERS``): ``(prefix, multiplier)`` pairs; a parameter whose name
      starts with a prefix trains at base LR x the multiplier of the longest such prefix, in place of the
      above. Multiplier 0 keeps a parameter at its initial value (as ``backbone_multiplier`` 0 does: it stays
      in the optimizer with LR 0, so full-model gradient clipping sees the same gradients);
    - normalisation layers: ``weight_decay_norm``; embeddings (``nn.Embedding``, position / class /
      level embeddings, the learnable text context, the logit scale): ``weight_decay_embed``;
    - frozen parameters (the CLIP text tower) are skipped, so they cost no optimizer state.
    """
    groups: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{name}" if module_name else name
            pretrained = full_name.startswith(tuple(pretrained_prefixes))
            multiplier = lr_multiplier_for(full_name, lr_multipliers)
            if multiplier is None:
                multiplier = backbone_multiplier if pretrained else 1.0
            lr = base_lr * multiplier
            decay = weight_decay
            if isinstance(module, NORM_TYPES):
                decay = weight_decay_norm
            elif isinstance(module, nn.Embedding) or name in EMBEDDING_NAMES:
                decay = weight_decay_embed
            groups.append({"params": [param], "lr": lr, "weight_decay": decay, "name": full_name})
    return groups


def _with_full_model_clipping(optimizer_cls: Type[torch.optim.Optimizer], max_norm: float):
    """Subclass of ``optimizer_cls`` whose ``step`` first clips the global gradient norm of all groups."""

    class FullModelGradientClippingOptimizer(optimizer_cls):
        def step(self, closure=None):
            all_params = itertools.chain(*[group["params"] for group in self.param_groups])
            torch.nn.utils.clip_grad_norm_(all_params, max_norm)
            return super().step(closure=closure)

    return FullModelGradientClippingOptimizer


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) over :func:`get_parameter_groups`; SOLVER.CLIP_GRADIENTS with CLIP_TYPE
    ``full_model`` clips the norm over the whole model, ``value``/``norm`` use detectron2's per-parameter clipping.
    """
    groups = get_parameter_groups(model, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.WEIGHT_DECAY_NORM,
                                  cfg.SOLVER.WEIGHT_DECAY_EMBED, cfg.SOLVER.BACKBONE_MULTIPLIER,
                                  lr_multipliers=check_lr_multipliers(model, cfg.SOLVER.LR_MULTIPLIERS))
    if not groups:
        raise ValueError("the model has no trainable parameters")
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer_cls, kwargs = torch.optim.AdamW, {"lr": cfg.SOLVER.BASE_LR}
    elif name == "SGD":
        optimizer_cls, kwargs = torch.optim.SGD, {"lr": cfg.SOLVER.BASE_LR, "momentum": cfg.SOLVER.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        return _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE)(groups, **kwargs)
    optimizer = optimizer_cls(groups, **kwargs)
    if clip.ENABLED:
        from detectron2.solver.build import maybe_add_gradient_clipping

        optimizer = maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer
