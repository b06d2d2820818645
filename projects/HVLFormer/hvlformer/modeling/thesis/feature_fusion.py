"""LSMSeg's visual feature fusion, thesis chapter 5, Sec. 5.2.4 (eq. 5.1): a learnable weighted sum of the
CLIP features and the features of a second, FROZEN visual encoder (SAM's image encoder in the thesis).

Shapes: ``B`` batch, images ``B x 3 x H x W`` (normalised as the CLIP backbone sees them); per fused level
``l``: CLIP features ``F_c^l``: ``B x C_l x h_l x w_l``; the second encoder's map ``F_s``:
``B x D_s x h_s x w_s``.

``E^l = w_l * F_c^l + (1 - w_l) * Proj_l(Resize(F_s))`` with ``Proj_l`` a 1x1 conv ``D_s -> C_l`` (the
"linear layer" aligning the channels), ``Resize`` bilinear to ``h_l x w_l`` and ``w_l = sigmoid(omega_l)``,
``omega_l = 0`` at initialisation (``w = 0.5``, the thesis's initial weight).

The second encoder is built by name from ``AUXILIARY_ENCODER_REGISTRY`` (:func:`build_auxiliary_encoder`),
its weights loaded from a path, frozen (``requires_grad False``, kept in eval mode). A registered encoder
is an ``nn.Module`` with an ``out_channels`` attribute whose ``forward(images)`` returns ``B x D_s x h x w``.
``TinyConvEncoder`` (random or from a path) is the one registered here, for tests and CPU runs. SAM is
not a dependency of this project; registering it is a few lines in the user's code (docs/THESIS_MODULES.md).

Decisions:

- ``w`` through a sigmoid (a convex combination at any value of the parameter; the thesis gives ``w`` in
  the equation but no constraint), one scalar per fused level.
- The frozen encoder runs under ``torch.no_grad`` and stays in eval mode when the model trains (the thesis
  does not fine-tune SAM, Table 5.10); it is not saved in checkpoints (``state_dict`` skips it: its weights
  come from their own path, like CLIP's frozen reference tower).
- Missing weights path: an error unless the encoder explicitly allows random weights (``TinyConvEncoder``
  with ``weights=""`` for tests): silently fusing a random "SAM" would only add noise.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import Tensor, nn

__all__ = ["AUXILIARY_ENCODER_REGISTRY", "build_auxiliary_encoder", "TinyConvEncoder", "VisualFeatureFusion"]

AUXILIARY_ENCODER_REGISTRY = Registry("HVLFORMER_AUXILIARY_ENCODER")
AUXILIARY_ENCODER_REGISTRY.__doc__ = """Frozen second visual encoders for LSMSeg's feature fusion.
Registered classes are built as ``cls(**kwargs)``, have ``out_channels`` and ``forward(images) -> B x D x h x w``
and a class attribute ``allows_random_weights`` (False: a weights path is required)."""


@AUXILIARY_ENCODER_REGISTRY.register()
class TinyConvEncoder(nn.Module):
    """A small strided conv encoder (``depth`` stride-2 3x3 convs with ReLU): ``B x 3 x H x W`` ->
    ``B x width x H / 2^depth x W / 2^depth`` (ceil). Stands in for SAM in tests."""

    allows_random_weights = True

    def __init__(self, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        channels = 3
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            channels = width
        self.body = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, images: Tensor) -> Tensor:
        return self.body(images)


def build_auxiliary_encoder(name: str, weights: str = "", **kwargs: Any) -> nn.Module:
    """Build ``name`` from the registry, load ``weights`` (a ``state_dict`` file, or a checkpoint dict with
    a ``"model"`` / ``"state_dict"`` entry; strict), freeze it and put it in eval mode."""
    cls = AUXILIARY_ENCODER_REGISTRY.get(name)
    encoder = cls(**kwargs)
    if weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"auxiliary encoder weights not found: {weights}")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        encoder.load_state_dict(state, strict=True)
    elif not getattr(cls, "allows_random_weights", False):
        raise ValueError(f"auxiliary encoder {name!r} needs a weights path (MODEL.HVLFORMER.LSMSEG.FUSION_WEIGHTS)")
    encoder.requires_grad_(False)
    return encoder.eval()


class VisualFeatureFusion(nn.Module):
    """Eq. 5.1 on several named feature levels (module docstring)."""

    @configurable
    def __init__(self, *, in_channels: Dict[str, int], encoder: nn.Module, init_weight: float = 0.5) -> None:
        """
        Args:
            in_channels: ``{level name: C_l}`` of the CLIP features to fuse (e.g. ``{"res4": 64}``).
            encoder: the frozen second encoder (``out_channels`` attribute).
            init_weight: initial ``w`` (0 < w < 1).
        """
        super().__init__()
        if not 0.0 < init_weight < 1.0:
            raise ValueError(f"init_weight must be in (0, 1), got {init_weight}")
        # kept out of the module tree: frozen, not in checkpoints, not moved by the optimizer
        self._encoder = [encoder]
        self.levels = list(in_channels)
        self.projections = nn.ModuleDict({name: nn.Conv2d(encoder.out_channels, c, 1) for name, c in in_channels.items()})
        logit = float(torch.logit(torch.tensor(init_weight)))
        self.weight_logits = nn.ParameterDict({name: nn.Parameter(torch.tensor(logit)) for name in in_channels})

    @classmethod
    def from_config(cls, cfg, in_channels: Dict[str, int]) -> Dict[str, Any]:
        """``in_channels``: ``{level: width}`` of the backbone outputs named in ``FUSION_LEVELS``."""
        lsm = cfg.MODEL.HVLFORMER.LSMSEG
        missing = [name for name in lsm.FUSION_LEVELS if name not in in_channels]
        if missing:
            raise ValueError(f"MODEL.HVLFORMER.LSMSEG.FUSION_LEVELS {missing} are not backbone outputs")
        encoder = build_auxiliary_encoder(lsm.FUSION_ENCODER, lsm.FUSION_WEIGHTS)
        return {"in_channels": {name: in_channels[name] for name in lsm.FUSION_LEVELS}, "encoder": encoder,
                "init_weight": lsm.FUSION_INIT_WEIGHT}

    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    def _apply(self, fn, *args, **kwargs):
        # keep the frozen encoder on the module's device / dtype although it is outside the module tree
        super()._apply(fn, *args, **kwargs)
        self._encoder[0]._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> "VisualFeatureFusion":
        super().train(mode)
        self.encoder.eval()
        return self

    def fusion_weight(self, name: str) -> Tensor:
        """``w_l`` in (0, 1)."""
        return self.weight_logits[name].sigmoid()

    def forward(self, images: Tensor, features: Dict[str, Tensor],
                auxiliary: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """
        Args:
            images: ``B x 3 x H x W`` input of the second encoder (ignored when ``auxiliary`` is given).
            features: ``{level: B x C_l x h_l x w_l}`` CLIP features; levels not fused pass through.
            auxiliary: precomputed second-encoder map ``B x D_s x h_s x w_s`` (optional).

        Returns ``features`` with every fused level replaced by ``E^l`` (same shape).
        """
        if auxiliary is None:
            with torch.no_grad():
                auxiliary = self.encoder(images)
        out = dict(features)
        for name in self.levels:
            clip = features[name]
            aligned = self.projections[name](F.interpolate(auxiliary.to(clip.dtype), size=clip.shape[-2:],
                                                           mode="bilinear", align_corners=False))
            w = self.fusion_weight(name)
            out[name] = w * clip + (1.0 - w) * aligned
        return out
