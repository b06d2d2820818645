"""Triton forward and backward kernels of multi-scale deformable attention sampling.

Same contract and semantics as :func:`~.ms_deform_attn.ms_deform_attn_core_pytorch` (the reference):
bilinear sampling with zero padding and the ``align_corners=False`` convention of ``F.grid_sample``
(pixel ``j`` of a level of width ``W`` has its centre at ``(j + 0.5) / W``, so the continuous pixel
coordinate of a normalised location ``x`` is ``x * W - 0.5``), any number of levels of any size (1 x 1
and non-square included), locations anywhere (samples outside the map read zeros).

Layout (all tensors contiguous): ``value`` ``B x S x nH x Dh``; ``sampling_locations``
``B x Lq x nH x L x P x 2`` as ``(x, y)``; ``attention_weights`` ``B x Lq x nH x L x P``; output
``B x Lq x nH*Dh`` (head-major channels). One program handles ``BLOCK_Q`` query rows (of the flattened
``B * Lq``) for one head and all ``Dh`` channels of that head, over all levels and points (loops
unrolled at compile time); every corner read is a ``BLOCK_Q x Dh`` gather of contiguous ``Dh``-channel
rows of ``value`` (vectorised loads).

Precision (see also ``docs/DESIGN.md``):

* ``value`` and ``grad_output`` may be float16 / bfloat16 / float32 / float64 and are read in their own
  dtype (no upcast copy in memory); every product and sum runs in the accumulator dtype, float32 (float64
  for float64 inputs). The output is rounded once, to ``value``'s dtype, when it is stored.
* ``sampling_locations`` and ``attention_weights`` must be float32 or float64 (the dispatch upcasts
  half-precision ones): sub-pixel positions need float32.
* ``grad_value`` is accumulated with atomic adds into a float32 (float64) buffer, then cast to
  ``value``'s dtype; the order of the atomic adds is not deterministic, so float32 ``grad_value`` can
  differ between runs in the last bits. ``grad_sampling_locations`` and ``grad_attention_weights`` each
  belong to one program and are written without atomics, in their input dtype.

The level starts are recomputed inside the kernel as the running sum of ``H_l * W_l`` (the
``level_start_index`` argument of the dispatch is not read, as in the reference), and every gathered
token index is also checked against ``S``, so inconsistent ``spatial_shapes`` cannot read outside
``value``. No host synchronisation happens in either pass.

Kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` was
set before this module was imported (the kernels are decorated at import); :func:`triton_can_run` says
which applies. The launch configuration (``BLOCK_Q``, ``num_warps``) is a fixed heuristic, not tuned
on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["ms_deform_attn_triton", "MSDeformAttnTritonFunction", "triton_can_run", "INTERPRETED"]


@triton.jit
def _sample_position(loc_x, loc_y, width, height):
    """Normalised sampling locations -> ``(x0, y0, lx, ly)``: the top-left neighbour (int32) and the
    fractional offsets towards the right and lower neighbours, for ``grid_sample``'s pixel-centre convention
    (``px = x * W - 0.5``, ``align_corners=False``)."""
    # clamped to [-2, size + 1] (far outside either way: both neighbours are off the map, the sample and its
    # gradient are 0) so the int cast is safe
    px = tl.minimum(tl.maximum(loc_x * width - 0.5, -2.0), width + 1.0)
    py = tl.minimum(tl.maximum(loc_y * height - 0.5, -2.0), height + 1.0)
    fx0 = tl.floor(px)
    fy0 = tl.floor(py)
    return fx0.to(tl.int32), fy0.to(tl.int32), px - fx0, py - fy0


@triton.jit
def _corner(x0, y0, lx, ly, width, height, level_start, S, dy: tl.constexpr, dx: tl.constexpr):
    """Corner ``(dy, dx)`` of the sample: ``(token index in the flattened value, inside the map, wx, wy)``,
    the bilinear weight being ``wx * wy``; zero padding outside the map, as ``grid_sample``."""
    x = x0 + dx
    y = y0 + dy
    token = level_start + y * width + x
    ok = (x >= 0) & (x < width) & (y >= 0) & (y < height) & (token >= 0) & (token < S)
    wx = lx if dx == 1 else 1.0 - lx
    wy = ly if dy == 1 else 1.0 - ly
    return token, ok, wx, wy


@triton.jit
def _ms_deform_attn_fwd_kernel(
    value_ptr, shapes_ptr, loc_ptr, attn_ptr, out_ptr,
    n_rows, n_queries, S,
    N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, N_LEVELS: tl.constexpr, N_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Grid ``(cdiv(B * Lq, BLOCK_Q), nH)``; writes ``out[b, q, h*Dh:(h+1)*Dh]`` for its rows."""
    pid_q = tl.program_id(0)
    head = tl.program_id(1)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # flattened (b, q)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    batch = rows64 // n_queries
    chans = tl.arange(0, BLOCK_D)
    chan_ok = chans < HEAD_DIM
    tile_ok = row_ok[:, None] & chan_ok[None, :]

    # value[b, s, h, d] = value_ptr + ((b * S + s) * nH + h) * Dh + d
    value_base = (batch * S * N_HEADS + head) * HEAD_DIM  # BLOCK_Q, int64
    # locations / weights of (row, head): L * P samples, contiguous
    sample_base = (rows64 * N_HEADS + head) * (N_LEVELS * N_POINTS)

    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC_DTYPE)
    level_start = 0
    for level in tl.static_range(N_LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        for point in tl.static_range(N_POINTS):
            sample = sample_base + level * N_POINTS + point
            loc_x = tl.load(loc_ptr + 2 * sample, mask=row_ok, other=0.0).to(ACC_DTYPE)
            loc_y = tl.load(loc_ptr + 2 * sample + 1, mask=row_ok, other=0.0).to(ACC_DTYPE)
            weight = tl.load(attn_ptr + sample, mask=row_ok, other=0.0).to(ACC_DTYPE)
            x0, y0, lx, ly = _sample_position(loc_x, loc_y, width, height)
            sampled = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC_DTYPE)
            for corner in tl.static_range(4):
                token, ok, wx, wy = _corner(x0, y0, lx, ly, width, height, level_start, S, corner // 2, corner % 2)
                ok = ok & row_ok
                bilinear = wx * wy
                ptrs = value_ptr + (value_base + token.to(tl.int64) * (N_HEADS * HEAD_DIM))[:, None] + chans[None, :]
                v = tl.load(ptrs, mask=ok[:, None] & chan_ok[None, :], other=0.0).to(ACC_DTYPE)
                sampled += bilinear[:, None] * v
            acc += weight[:, None] * sampled
        level_start += height * width

    out_ptrs = out_ptr + ((rows64 * N_HEADS + head) * HEAD_DIM)[:, None] + chans[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _ms_deform_attn_bwd_kernel(
    value_ptr, shapes_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    n_rows, n_queries, S,
    N_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, N_LEVELS: tl.constexpr, N_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Grid ``(cdiv(B * Lq, BLOCK_Q), nH)``.

    With ``g = grad_out[b, q, h]`` (``Dh``), ``w`` the attention weight and ``c_k`` the bilinear weights
    of the four corners ``v_k`` of one sample ``s = sum_k c_k v_k``:

    * ``grad_attn = <g, s>``;
    * ``grad_value[v_k] += w * c_k * g`` (atomic: other rows and heads' programs hit the same pixels);
    * ``grad_loc_x = w * W * <g, ds/dpx>`` with ``ds/dpx = (1 - ly)(v01 - v00) + ly (v11 - v10)``, and
      ``grad_loc_y = w * H * <g, ds/dpy>`` with ``ds/dpy = (1 - lx)(v10 - v00) + lx (v11 - v01)``
      (``px = x * W - 0.5``; corner ``v_{dy dx}``).
    """
    pid_q = tl.program_id(0)
    head = tl.program_id(1)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    batch = rows64 // n_queries
    chans = tl.arange(0, BLOCK_D)
    chan_ok = chans < HEAD_DIM

    value_base = (batch * S * N_HEADS + head) * HEAD_DIM
    sample_base = (rows64 * N_HEADS + head) * (N_LEVELS * N_POINTS)
    grad_ptrs = grad_out_ptr + ((rows64 * N_HEADS + head) * HEAD_DIM)[:, None] + chans[None, :]
    grad = tl.load(grad_ptrs, mask=row_ok[:, None] & chan_ok[None, :], other=0.0).to(ACC_DTYPE)

    level_start = 0
    for level in tl.static_range(N_LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        for point in tl.static_range(N_POINTS):
            sample = sample_base + level * N_POINTS + point
            loc_x = tl.load(loc_ptr + 2 * sample, mask=row_ok, other=0.0).to(ACC_DTYPE)
            loc_y = tl.load(loc_ptr + 2 * sample + 1, mask=row_ok, other=0.0).to(ACC_DTYPE)
            weight = tl.load(attn_ptr + sample, mask=row_ok, other=0.0).to(ACC_DTYPE)
            x0, y0, lx, ly = _sample_position(loc_x, loc_y, width, height)

            sampled = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC_DTYPE)
            d_px = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC_DTYPE)
            d_py = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC_DTYPE)
            for corner in tl.static_range(4):
                dy = corner // 2
                dx = corner % 2
                token, ok, wx, wy = _corner(x0, y0, lx, ly, width, height, level_start, S, dy, dx)
                ok = ok & row_ok
                offsets = (value_base + token.to(tl.int64) * (N_HEADS * HEAD_DIM))[:, None] + chans[None, :]
                tile_ok = ok[:, None] & chan_ok[None, :]
                v = tl.load(value_ptr + offsets, mask=tile_ok, other=0.0).to(ACC_DTYPE)
                sampled += (wx * wy)[:, None] * v
                # d(wx)/dpx = +1 for the right column, -1 for the left; likewise wy in y
                sign_x = 1.0 if dx == 1 else -1.0
                sign_y = 1.0 if dy == 1 else -1.0
                d_px += (sign_x * wy)[:, None] * v
                d_py += (sign_y * wx)[:, None] * v
                tl.atomic_add(grad_value_ptr + offsets, (weight * wx * wy)[:, None] * grad, mask=tile_ok, sem="relaxed")

            tl.store(grad_attn_ptr + sample, tl.sum(grad * sampled, axis=1).to(grad_attn_ptr.dtype.element_ty),
                     mask=row_ok)
            grad_x = weight * width * tl.sum(grad * d_px, axis=1)
            grad_y = weight * height * tl.sum(grad * d_py, axis=1)
            tl.store(grad_loc_ptr + 2 * sample, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=row_ok)
            tl.store(grad_loc_ptr + 2 * sample + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=row_ok)
        level_start += height * width


#: True when the kernels were decorated for Triton's interpreter (``TRITON_INTERPRET=1`` at import):
#: they then run on CPU tensors (slowly, with NumPy) and no longer on CUDA tensors.
INTERPRETED: bool = type(_ms_deform_attn_fwd_kernel).__name__ == "InterpretedFunction"

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_can_run(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of ``device``: CUDA when compiled, CPU when interpreted."""
    return device.type == "cpu" if INTERPRETED else device.type == "cuda"


def _launch_config(head_dim: int) -> tuple[int, int, int]:
    """``(BLOCK_Q, BLOCK_D, num_warps)``: all ``Dh`` channels per program and about 2048 tile elements."""
    block_d = triton.next_power_of_2(head_dim)
    block_q = max(16, min(128, 2048 // block_d))
    return block_q, block_d, 4


def _check_inputs(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> None:
    if value.dim() != 4:
        raise ValueError(f"value must be B x S x nH x Dh, got shape {tuple(value.shape)}")
    B, _, n_heads, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be B x Lq x nH x L x P x 2, got {tuple(sampling_locations.shape)}")
    if sampling_locations.shape[0] != B or sampling_locations.shape[2] != n_heads:
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} does not match value "
                         f"{tuple(value.shape)} in batch or heads")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights {tuple(attention_weights.shape)} must be sampling_locations.shape[:-1] "
                         f"= {tuple(sampling_locations.shape[:-1])}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape != (sampling_locations.shape[3], 2):
        raise ValueError(f"spatial_shapes must be L x 2 with L = {sampling_locations.shape[3]}, "
                         f"got {tuple(spatial_shapes.shape)}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"value must be a floating tensor, got {value.dtype}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64 (sub-pixel positions), got {t.dtype}")
    devices = {t.device for t in (value, spatial_shapes, sampling_locations, attention_weights)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if not triton_can_run(value.device):
        where = "CPU tensors (interpreter)" if INTERPRETED else "CUDA tensors"
        raise RuntimeError(f"the Triton MSDeformAttn kernels were set up for {where} and cannot run on "
                           f"{value.device}; set TRITON_INTERPRET=1 before importing this module to run them on CPU")


def _acc_dtype(value: Tensor, sampling_locations: Tensor) -> tl.dtype:
    return tl.float64 if torch.float64 in (value.dtype, sampling_locations.dtype) else tl.float32


class MSDeformAttnTritonFunction(torch.autograd.Function):
    """Autograd function over the two kernels; differentiable w.r.t. value, locations and weights."""

    @staticmethod
    def forward(ctx, value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor,
                attention_weights: Tensor) -> Tensor:
        _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
        value = value.contiguous()
        shapes = spatial_shapes.to(torch.int32).contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        B, S, n_heads, head_dim = value.shape
        _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
        out = value.new_empty(B, n_queries, n_heads * head_dim)
        n_rows = B * n_queries
        block_q, block_d, num_warps = _launch_config(head_dim)
        if n_rows > 0:
            grid = (triton.cdiv(n_rows, block_q), n_heads)
            _ms_deform_attn_fwd_kernel[grid](
                value, shapes, sampling_locations, attention_weights, out,
                n_rows, n_queries, S,
                N_HEADS=n_heads, HEAD_DIM=head_dim, N_LEVELS=n_levels, N_POINTS=n_points,
                BLOCK_Q=block_q, BLOCK_D=block_d, ACC_DTYPE=_acc_dtype(value, sampling_locations),
                num_warps=num_warps,
            )
        ctx.save_for_backward(value, shapes, sampling_locations, attention_weights)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        value, shapes, sampling_locations, attention_weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        B, S, n_heads, head_dim = value.shape
        _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
        acc = _acc_dtype(value, sampling_locations)
        acc_torch = torch.float64 if acc == tl.float64 else torch.float32
        grad_value = torch.zeros(value.shape, dtype=acc_torch, device=value.device)
        grad_loc = torch.empty_like(sampling_locations)
        grad_attn = torch.empty_like(attention_weights)
        n_rows = B * n_queries
        block_q, block_d, num_warps = _launch_config(head_dim)
        if n_rows > 0:
            grid = (triton.cdiv(n_rows, block_q), n_heads)
            _ms_deform_attn_bwd_kernel[grid](
                value, shapes, sampling_locations, attention_weights, grad_out,
                grad_value, grad_loc, grad_attn,
                n_rows, n_queries, S,
                N_HEADS=n_heads, HEAD_DIM=head_dim, N_LEVELS=n_levels, N_POINTS=n_points,
                BLOCK_Q=block_q, BLOCK_D=block_d, ACC_DTYPE=acc,
                num_warps=num_warps,
            )
        return grad_value.to(value.dtype), None, grad_loc, grad_attn


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention sampling with the Triton kernels (the fast-kernel signature).

    Args:
        value: ``B x S x nH x Dh``, float16 / bfloat16 / float32 / float64.
        spatial_shapes: ``L x 2`` integer ``(H_l, W_l)`` on the same device.
        level_start_index: ``L`` level starts; not read (recomputed from ``spatial_shapes`` in the kernel).
        sampling_locations: ``B x Lq x nH x L x P x 2`` normalised ``(x, y)``, float32 / float64.
        attention_weights: ``B x Lq x nH x L x P``, float32 / float64.

    Returns:
        ``B x Lq x nH*Dh`` in ``value.dtype`` (accumulated in float32, or float64 for float64 inputs).
    """
    del level_start_index  # the kernels derive the level starts from spatial_shapes
    return MSDeformAttnTritonFunction.apply(value, spatial_shapes, sampling_locations, attention_weights)
