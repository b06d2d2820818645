"""Image-guided refinement of the teacher's pseudo-labels (``SEMI.LABEL_REFINEMENT_*``; not in the HVLFormer paper):
pixel-adaptive refinement, after the PAR of Ru et al., "Learning Affinity from Attention: End-to-End
Weakly-Supervised Semantic Segmentation with Transformers", CVPR 2022, Sec. 3.3.

Why: the teacher's per-class maps come from stride-4 masks, and where it is unsure (mostly object outlines, below
the 0.95 threshold) l_mask has no target. The image's own colours are a source of outlines that does not come
from the model (docs/RESULTS.md, "(c) where the oracle's +4.6 comes from").

How: the original view's per-class distributions, upsampled bilinearly to the image's pixels, are replaced
``iterations`` times by an affinity-weighted mean of each pixel's neighbours' distributions. The neighbours of a
pixel are the 8 pixels at distance ``d`` (horizontally, vertically, diagonally) for every ``d`` in
``dilations`` (beyond the image's border, the border pixel), so ``M = 8 * len(dilations)`` of them. The weight of
neighbour ``j`` of pixel ``i`` is

    a_ij = (softmax_j(-(c_ij / (s * sigma_i))^2) + w * softmax_j(-(r_ij / (s * rho))^2)) / (1 + w)

with ``c_ij`` the absolute colour difference and ``sigma_i`` the standard deviation of the ``M`` neighbours'
colours (both per channel; the ratio is averaged over the 3 channels), ``r_ij`` the neighbour's distance and
``rho`` the standard deviation of the ``M`` distances, ``s`` = ``colour_scale`` and ``w`` = ``position_weight``.
Neighbours of the same colour as the pixel take nearly all the weight, so a distribution spreads inside a region
of one colour and stops at a change of colour. The weights sum to 1, so each pixel keeps a distribution; the
threshold then applies to the refined maps. Padded pixels are nobody's neighbour and do not count in
``sigma_i`` (their own values, which no loss reads, are refined from their unpadded neighbours).

Decisions (docs/DESIGN.md, "Pseudo-label refinement"): the defaults are PAR's (10 iterations, ``s`` 0.3,
``w`` 0.01) with its dilations scaled from its 448-512 px crops to the tiny 96 px images (1, 2, 4, 8), fixed
before any run; the refinement is at image pixels and l_mask at the mask resolution reads each cell's centre
pixel, as the hidden labels of the oracle are read (:func:`~hvlformer.modeling.label_maps.downsample_labels`).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import Tensor, nn

__all__ = ["PixelAdaptiveRefinement", "neighbours", "shifted_maps", "refine_to"]

# the 8 directions (dy, dx) of a pixel's neighbours at one dilation
_DIRECTIONS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def shifted_maps(maps: Tensor, dilations: Sequence[int]) -> Iterator[Tensor]:
    """``B x C x H x W`` -> ``M`` maps ``B x C x H x W``, the ``m``-th holding at ``(y, x)`` the value of neighbour
    ``m`` of pixel ``(y, x)`` (``M = 8 * len(dilations)``, direction by direction for each dilation in turn);
    beyond the border, the border pixel's value (replicate padding). Views of one padded copy per dilation."""
    height, width = maps.shape[-2:]
    for d in dilations:
        padded = F.pad(maps, (d, d, d, d), mode="replicate")
        for dy, dx in _DIRECTIONS:
            yield padded[..., d + dy * d:d + dy * d + height, d + dx * d:d + dx * d + width]


def neighbours(maps: Tensor, dilations: Sequence[int]) -> Tensor:
    """``B x C x H x W`` -> ``B x C x M x H x W``: :func:`shifted_maps` stacked on dim 2."""
    return torch.stack(list(shifted_maps(maps, dilations)), dim=2)


class PixelAdaptiveRefinement(nn.Module):
    """Refines ``B x K x H x W`` class distributions with the colour affinities of their image; see the module
    docstring. No parameters: checkpoints are the same with or without it."""

    @configurable
    def __init__(self, *, iterations: int = 10, dilations: Sequence[int] = (1, 2, 4, 8), colour_scale: float = 0.3,
                 position_weight: float = 0.01) -> None:
        super().__init__()
        if iterations < 1:
            raise ValueError(f"SEMI.LABEL_REFINEMENT_ITERATIONS must be >= 1 to build the refinement, "
                             f"got {iterations}")
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(f"SEMI.LABEL_REFINEMENT_DILATIONS must be positive pixel distances, got {tuple(dilations)}")
        if colour_scale <= 0 or position_weight < 0:
            raise ValueError("SEMI.LABEL_REFINEMENT_COLOUR_SCALE must be > 0 and SEMI.LABEL_REFINEMENT_POSITION_WEIGHT "
                             f">= 0, got {colour_scale} and {position_weight}")
        self.iterations = iterations
        self.dilations = tuple(int(d) for d in dilations)
        self.colour_scale = colour_scale
        self.position_weight = position_weight

    @classmethod
    def from_config(cls, cfg) -> dict:
        semi = cfg.SEMI
        return {"iterations": semi.LABEL_REFINEMENT_ITERATIONS, "dilations": tuple(semi.LABEL_REFINEMENT_DILATIONS),
                "colour_scale": semi.LABEL_REFINEMENT_COLOUR_SCALE,
                "position_weight": semi.LABEL_REFINEMENT_POSITION_WEIGHT}

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cfg.SEMI.LABEL_REFINEMENT_ITERATIONS > 0

    def affinity(self, images: Tensor, padding: Optional[Tensor] = None, eps: float = 1e-8) -> Tensor:
        """``B x 3 x H x W`` images (any colour scale) and ``B x H x W`` bool padding -> ``B x M x H x W`` weights
        of each pixel's neighbours, summing to 1 over ``M`` (0 on padded neighbours; a pixel whose neighbours
        are all padded keeps nothing of them, see :meth:`forward`)."""
        images = images.float()
        around = neighbours(images, self.dilations)                                   # B x 3 x M x H x W
        padded_neighbour = None
        if padding is not None and bool(padding.any()):
            padded_neighbour = neighbours(padding[:, None].float(), self.dilations)[:, 0] > 0  # B x M x H x W
        spread = _neighbour_spread(around, padded_neighbour)                          # B x 3 x 1 x H x W
        colour = -((around - images[:, :, None]).abs() / (self.colour_scale * spread + eps)).pow(2).mean(dim=1)
        distance = torch.tensor([float(d * (dy * dy + dx * dx) ** 0.5)
                                 for d in self.dilations for dy, dx in _DIRECTIONS], device=images.device)
        position = -(distance / (self.colour_scale * distance.std())).pow(2)          # M
        position = position[None, :, None, None].expand_as(colour)
        if padded_neighbour is not None:
            colour = colour.masked_fill(padded_neighbour, float("-inf"))
            position = position.masked_fill(padded_neighbour, float("-inf"))
        weights = (_softmax(colour) + self.position_weight * _softmax(position)) / (1.0 + self.position_weight)
        return weights

    @torch.no_grad()
    def forward(self, probs: Tensor, images: Tensor, padding: Optional[Tensor] = None) -> Tensor:
        """``B x K x h x w`` class distributions of ``images`` (``B x 3 x H x W``; ``padding`` ``B x H x W`` bool)
        -> ``B x K x H x W`` refined distributions at the image's pixels (``probs`` upsampled bilinearly first)."""
        size = tuple(images.shape[-2:])
        refined = probs.float()
        if tuple(refined.shape[-2:]) != size:
            refined = F.interpolate(refined, size=size, mode="bilinear", align_corners=False)
        weights = self.affinity(images, padding)[:, :, None]                           # B x M x 1 x H x W
        kept = weights.sum(dim=1) > 0                                                  # B x 1 x H x W
        for _ in range(self.iterations):
            # a running sum over the M neighbours (a stacked B x K x M x H x W copy would be M times the maps)
            spread = torch.zeros_like(refined)
            for weight, neighbour in zip(weights.unbind(dim=1), shifted_maps(refined, self.dilations)):
                spread.addcmul_(weight, neighbour)
            refined = torch.where(kept, spread, refined)
        return refined.to(probs.dtype)


def _neighbour_spread(around: Tensor, padded_neighbour: Optional[Tensor]) -> Tensor:
    """``B x 3 x M x H x W`` neighbour colours -> ``B x 3 x 1 x H x W`` their standard deviation (unbiased, as
    :meth:`torch.Tensor.std`), over the unpadded neighbours only when ``padded_neighbour`` (``B x M x H x W``
    bool) is given: the padding's colour says nothing about how much the image varies around a pixel. Fewer than
    two unpadded neighbours give a spread of 0."""
    if padded_neighbour is None:
        return around.std(dim=2, keepdim=True)
    real = (~padded_neighbour)[:, None].to(around.dtype)                              # B x 1 x M x H x W
    count = real.sum(dim=2, keepdim=True)
    mean = (around * real).sum(dim=2, keepdim=True) / count.clamp_min(1.0)
    squares = ((around - mean).pow(2) * real).sum(dim=2, keepdim=True)
    return (squares / (count - 1.0).clamp_min(1.0)).sqrt() * (count > 1)


def _softmax(logits: Tensor) -> Tensor:
    """Softmax over dim 1 that gives 0 (not NaN) where every entry is -inf."""
    peak = logits.amax(dim=1, keepdim=True)
    finite_peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    exp = (logits - finite_peak).exp()
    return exp / exp.sum(dim=1, keepdim=True).clamp_min(1e-30)


def refine_to(probs: Tensor, refinement: PixelAdaptiveRefinement, images: Tensor, padding: Optional[Tensor],
              size: Tuple[int, int]) -> Tensor:
    """``refinement`` of ``B x K x h x w`` maps at the image's pixels, read back at ``size``: the image's own size
    keeps every pixel; a smaller one (the mask resolution) takes each cell's centre pixel (``nearest-exact``, as
    :func:`~hvlformer.modeling.label_maps.downsample_labels` reads labels)."""
    refined = refinement(probs, images, padding)
    if tuple(refined.shape[-2:]) == tuple(size):
        return refined
    return F.interpolate(refined, size=tuple(size), mode="nearest-exact")
