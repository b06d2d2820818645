"""Multi-scale deformable attention (Deformable-DETR, Zhu et al. 2021), as used by Mask2Former's encoder.

Three layers of API:

* :func:`ms_deform_attn_core_pytorch` -- the reference sampling + weighting in pure PyTorch
  (``F.grid_sample``). It runs on every device and dtype; it is the CPU path and what the fast kernel is
  tested against.
* :func:`ms_deform_attn` -- the single dispatch point. ``impl="auto"`` uses the registered fast kernel
  (by default the Triton kernels of :mod:`.ms_deform_attn_triton`, registered when ``triton`` is
  installed) only when the value tensor is on CUDA; otherwise it uses the reference. ``impl="pytorch"``
  always uses the reference, ``impl="triton"`` always the Triton kernels (on CPU only inside Triton's
  interpreter, for tests). The environment variable ``HVLFORMER_MSDEFORM_ATTN_IMPL`` (one of the impls)
  overrides ``"auto"``, e.g. ``=pytorch`` forces the reference without touching the config. The choice is
  an explicit check, never a try/except around the kernel, so a broken kernel fails loudly instead of
  silently falling back. Locations and weights are always sampled in at least float32 (autocast is
  disabled around the sampling); the result is cast back to the value dtype.
* :class:`MSDeformAttn` -- the attention module (value/offset/weight/output projections).

Shape conventions (Deformable-DETR): ``B`` batch, ``S = sum_l H_l * W_l`` flattened multi-level tokens,
``Lq`` queries, ``nH`` heads, ``Dh`` channels per head, ``L`` levels, ``P`` sampling points per level and
head. Sampling locations are normalised to ``[0, 1]`` as ``(x, y)`` with the ``align_corners=False``
convention: ``0`` is the left/top border of the map and pixel ``j`` has its centre at ``(j + 0.5) / W``.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MSDeformAttn",
    "ms_deform_attn",
    "ms_deform_attn_core_pytorch",
    "register_fast_kernel",
    "get_fast_kernel",
    "resolve_impl",
    "MS_DEFORM_ATTN_IMPLS",
    "MS_DEFORM_ATTN_IMPL_ENV",
    "triton_kernel",
]

#: Accepted values of ``impl`` (and of ``MODEL.SEM_SEG_HEAD.MSDEFORM_ATTN_IMPL``).
MS_DEFORM_ATTN_IMPLS = ("auto", "pytorch", "triton")

#: Environment variable that, when set to one of :data:`MS_DEFORM_ATTN_IMPLS`, replaces ``impl="auto"``.
MS_DEFORM_ATTN_IMPL_ENV = "HVLFORMER_MSDEFORM_ATTN_IMPL"

#: Signature of a fast kernel: ``fn(value, spatial_shapes, level_start_index, sampling_locations,
#: attention_weights) -> output`` with the shapes of :func:`ms_deform_attn`, all on the same CUDA device;
#: ``value`` comes in its own floating dtype (float16 / bfloat16 / float32 / float64), locations and
#: weights in float32 or float64. Returns ``value.dtype`` (or any dtype: the dispatch casts), and is
#: differentiable w.r.t. value, locations and weights.
FastKernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def triton_kernel(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> Tensor:
    """The Triton kernels (:func:`.ms_deform_attn_triton.ms_deform_attn_triton`), imported on first use.

    The import is deferred so that ``TRITON_INTERPRET`` (read when the kernels are decorated) only has to
    be set before the first call, and so that importing the model never needs ``triton``.
    """
    from .ms_deform_attn_triton import ms_deform_attn_triton

    return ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


# The Triton kernels are the default fast kernel wherever triton is installed (it ships with Linux
# builds of PyTorch); they are only ever called for CUDA tensors by impl="auto".
_FAST_KERNEL: Optional[FastKernel] = triton_kernel if importlib.util.find_spec("triton") is not None else None


def register_fast_kernel(fn: Optional[FastKernel]) -> Optional[FastKernel]:
    """Register the fast (CUDA) MSDeformAttn kernel used by ``impl="auto"``; ``None`` unregisters.

    The default is :func:`triton_kernel` when ``triton`` is installed.

    Returns the previously registered kernel so that callers (tests) can restore it.
    """
    global _FAST_KERNEL
    if fn is not None and not callable(fn):
        raise TypeError(f"register_fast_kernel expects a callable or None, got {type(fn).__name__}")
    previous = _FAST_KERNEL
    _FAST_KERNEL = fn
    return previous


def get_fast_kernel() -> Optional[FastKernel]:
    """The registered fast kernel, or ``None`` when none is registered."""
    return _FAST_KERNEL


def _level_sizes(spatial_shapes: Tensor) -> list[tuple[int, int]]:
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be L x 2 (H, W), got shape {tuple(spatial_shapes.shape)}")
    # One host read of L*2 integers; the sizes are needed as Python ints to split and reshape.
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def ms_deform_attn_core_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Reference multi-scale deformable attention sampling with ``F.grid_sample``.

    Args:
        value: ``B x S x nH x Dh`` per-head values of all levels, flattened level after level (row-major
            inside a level), ``S = sum_l H_l * W_l``.
        spatial_shapes: ``L x 2`` integer tensor of ``(H_l, W_l)``.
        sampling_locations: ``B x Lq x nH x L x P x 2`` normalised ``(x, y)`` in ``[0, 1]``
            (``align_corners=False`` convention; locations outside read zeros).
        attention_weights: ``B x Lq x nH x L x P`` weights of the samples (normally softmax-normalised over
            ``L * P``; not required here).

    Returns:
        ``B x Lq x nH*Dh``: for every query and head, ``sum_{l,p} w * bilinear(value_l, loc)``; the channels
        are head-major (``h * Dh + d``).

    Computed in the dtype of the inputs (no casting here; :func:`ms_deform_attn` handles precision).
    """
    B, S, n_heads, head_dim = value.shape
    _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
    sizes = _level_sizes(spatial_shapes)
    if len(sizes) != n_levels:
        raise ValueError(f"spatial_shapes has {len(sizes)} levels, sampling_locations has {n_levels}")
    if sum(h * w for h, w in sizes) != S:
        raise ValueError(f"value has {S} tokens but spatial_shapes sums to {sum(h * w for h, w in sizes)}")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights {tuple(attention_weights.shape)} must be sampling_locations.shape[:-1] "
            f"= {tuple(sampling_locations.shape[:-1])}"
        )

    value_list = value.split([h * w for h, w in sizes], dim=1)
    # grid_sample works on [-1, 1]; with align_corners=False, -1 / +1 are the outer borders of the map,
    # which is exactly the [0, 1] convention of the sampling locations.
    grids = 2.0 * sampling_locations - 1.0
    output = None
    for lvl, (h, w) in enumerate(sizes):
        # B x HW x nH x Dh -> (B*nH) x Dh x H x W
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(B * n_heads, head_dim, h, w)
        # B x Lq x nH x P x 2 -> (B*nH) x Lq x P x 2
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        # (B*nH) x Dh x Lq x P, weighted by (B*nH) x 1 x Lq x P and reduced over the points. Accumulating
        # level by level avoids materialising all L levels' samples at once.
        weights = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(B * n_heads, 1, n_queries, n_points)
        contrib = (sampled * weights).sum(-1)
        output = contrib if output is None else output + contrib
    # (B*nH) x Dh x Lq -> B x Lq x nH*Dh
    return output.view(B, n_heads * head_dim, n_queries).transpose(1, 2).contiguous()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16 / bfloat16 are upcast to float32; float32 / float64 are kept (float64 for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def resolve_impl(impl: str, device: torch.device) -> str:
    """The core :func:`ms_deform_attn` runs for ``impl`` on ``device``: ``"pytorch"``, ``"fast"`` (the
    registered kernel) or ``"triton"``.

    ``"auto"`` is first replaced by ``$HVLFORMER_MSDEFORM_ATTN_IMPL`` when that is set, then means the
    registered fast kernel for CUDA devices (when one is registered) and the reference elsewhere.
    """
    if impl not in MS_DEFORM_ATTN_IMPLS:
        raise ValueError(f"Unknown MSDeformAttn impl {impl!r}; expected one of {MS_DEFORM_ATTN_IMPLS}")
    if impl == "auto":
        impl = os.environ.get(MS_DEFORM_ATTN_IMPL_ENV, "") or "auto"
        if impl not in MS_DEFORM_ATTN_IMPLS:
            raise ValueError(f"${MS_DEFORM_ATTN_IMPL_ENV}={impl!r}; expected one of {MS_DEFORM_ATTN_IMPLS}")
    if impl == "auto":
        return "fast" if device.type == "cuda" and _FAST_KERNEL is not None else "pytorch"
    return impl


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    impl: str = "auto",
) -> Tensor:
    """Multi-scale deformable attention sampling: the dispatch between the fast kernel and the reference.

    Args:
        value: ``B x S x nH x Dh``.
        spatial_shapes: ``L x 2`` long ``(H_l, W_l)``.
        level_start_index: ``L`` long, start of each level in ``S`` (passed on to a registered kernel).
        sampling_locations: ``B x Lq x nH x L x P x 2`` normalised ``(x, y)``.
        attention_weights: ``B x Lq x nH x L x P``.
        impl: ``"auto"`` (the registered fast kernel iff ``value.is_cuda`` and one is registered, else
            PyTorch; see :func:`resolve_impl`), ``"pytorch"`` or ``"triton"``.

    Returns:
        ``B x Lq x nH*Dh`` in ``value.dtype``.

    The locations and the bilinear sampling run with autocast disabled and in float32 (or float64 if
    given): bf16 locations near 1 are quantised in steps of 1/256 of the map, a quarter to half a pixel on
    the stride-8 level of a 512-1024 px input, and Deformable-DETR's CUDA kernel only takes float32/64.
    The reference upcasts half-precision values to float32 in memory; the kernels read them in their own
    dtype and accumulate in float32, which computes the same sums without the upcast copy.
    """
    core = resolve_impl(impl, value.device)
    out_dtype = value.dtype
    dtype = _compute_dtype(torch.promote_types(value.dtype, sampling_locations.dtype))
    with torch.autocast(device_type=value.device.type, enabled=False):
        locations_c = sampling_locations.to(dtype)
        weights_c = attention_weights.to(dtype)
        if core == "pytorch":
            output = ms_deform_attn_core_pytorch(value.to(dtype), spatial_shapes, locations_c, weights_c)
        else:
            kernel = triton_kernel if core == "triton" else _FAST_KERNEL
            output = kernel(value, spatial_shapes, level_start_index, locations_c, weights_c)
    return output.to(out_dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable-DETR), for encoder self-attention.

    Every query predicts, per head, level and point, a 2-D offset (in pixels of that level, added to the
    query's reference point) and an attention weight (softmax over ``L * P``); the output is the weighted
    sum of the bilinearly sampled per-head values, followed by an output projection.

    Args:
        d_model: model width ``D`` (must be divisible by ``n_heads``).
        n_levels: number of feature levels ``L``.
        n_heads: number of heads ``nH``.
        n_points: sampling points per head and level ``P``.
        impl: core implementation passed to :func:`ms_deform_attn` (``"auto"``, ``"pytorch"`` or
            ``"triton"``).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 impl: str = "auto") -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if impl not in MS_DEFORM_ATTN_IMPLS:
            raise ValueError(f"Unknown MSDeformAttn impl {impl!r}; expected one of {MS_DEFORM_ATTN_IMPLS}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = impl

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Deformable-DETR initialisation.

        Offsets start at a fixed pattern: head ``h`` looks in direction ``angle = 2*pi*h/nH`` (scaled so the
        larger of |x|, |y| is 1), point ``p`` at distance ``p + 1`` pixels, identical on every level; the
        offset weights are zero so this pattern does not depend on the query at first. Attention weights
        start uniform (zero logits); value/output projections are Xavier-uniform with zero bias.
        """
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: ``B x Lq x D`` (for the encoder: the tokens plus positional/level embedding).
            reference_points: ``B x Lq x L x 2`` normalised ``(x, y)`` in ``[0, 1]``, one per level (the
                encoder uses the pixel centre of the query token, equal on all levels without padding).
            input_flatten: ``B x S x D`` flattened multi-level features the values come from.
            input_spatial_shapes: ``L x 2`` long ``(H_l, W_l)``.
            input_level_start_index: ``L`` long start offsets of the levels in ``S``.
            input_padding_mask: optional ``B x S`` bool, True = padding (its values are zeroed).

        Returns:
            ``B x Lq x D``.
        """
        B, n_queries, _ = query.shape
        _, S, _ = input_flatten.shape
        if reference_points.dim() != 4 or reference_points.shape[-1] != 2:
            raise ValueError(f"reference_points must be B x Lq x L x 2, got {tuple(reference_points.shape)}")
        if reference_points.shape[2] != self.n_levels or input_spatial_shapes.shape[0] != self.n_levels:
            raise ValueError(
                f"MSDeformAttn built for {self.n_levels} levels, got reference_points with "
                f"{reference_points.shape[2]} and spatial_shapes with {input_spatial_shapes.shape[0]}"
            )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(B, S, self.n_heads, self.d_model // self.n_heads)

        # The two small projections that produce locations and weights run outside autocast in (at least)
        # float32: bf16 offsets/reference points would quantise sub-pixel positions; the cost is negligible.
        loc_dtype = _compute_dtype(query.dtype)
        with torch.autocast(device_type=query.device.type, enabled=False):
            q = query.to(loc_dtype)
            offsets = F.linear(q, self.sampling_offsets.weight.to(loc_dtype), self.sampling_offsets.bias.to(loc_dtype))
            offsets = offsets.view(B, n_queries, self.n_heads, self.n_levels, self.n_points, 2)
            logits = F.linear(q, self.attention_weights.weight.to(loc_dtype),
                              self.attention_weights.bias.to(loc_dtype))
            attn = logits.view(B, n_queries, self.n_heads, self.n_levels * self.n_points).softmax(-1)
            attn = attn.view(B, n_queries, self.n_heads, self.n_levels, self.n_points)
            # Offsets are in pixels of each level: divide by (W_l, H_l) to get normalised units.
            normalizer = input_spatial_shapes.flip(-1).to(device=query.device, dtype=loc_dtype)
            sampling_locations = (
                reference_points.to(loc_dtype)[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )

        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, sampling_locations, attn,
                                impl=self.impl)
        return self.output_proj(output)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
                f"n_points={self.n_points}, impl={self.impl!r}")
