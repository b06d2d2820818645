#!/usr/bin/env python
"""Benchmark the MSDeformAttn sampling cores on the pixel decoder's real shapes; prints JSON.

    python tools/benchmark_msdeformattn.py                          # CUDA: Triton vs PyTorch core vs CUDA op
    python tools/benchmark_msdeformattn.py --dtype bfloat16         # values in bf16, as under AMP
    python tools/benchmark_msdeformattn.py --device cpu --small     # CPU smoke run (tiny shapes)

Shapes (default): batch 8, levels 64x64 / 32x32 / 16x16 (a 512 x 512 crop at strides 8 / 16 / 32),
8 heads, 4 points, D = 256 (32 channels per head), queries = all 5376 pixels of the three levels, as in the
pixel decoder's encoder. Locations are the query's pixel centre plus offsets of a few pixels (N(0, 2 px)),
some outside the map; attention weights are a softmax over levels x points.

For every core (same inputs, same run): forward time, forward + backward time (median of ``--iters``
after ``--warmup``), peak CUDA memory above the inputs during forward + backward, achieved bandwidth
(compulsory bytes -- every input read once, every output written once -- over the time; the gathers
re-read ``value``, so real traffic is higher) and the largest difference to the PyTorch core of the
output and the three gradients. Figures of merit: the ratios to the PyTorch core and to the CUDA op.

Cores:

* ``pytorch``: the ``F.grid_sample`` reference (``ms_deform_attn(..., impl="pytorch")``).
* ``triton``: the Triton kernels (``impl="triton"``). On CPU they only run in Triton's interpreter
  (``TRITON_INTERPRET=1``), whose timing says nothing about speed: there the entry reports only the
  correctness check (``--small``), never a time.
* ``cuda_op``: Deformable-DETR's CUDA op from the PyPI package ``ms-deform-attn`` (module
  ``MultiScaleDeformableAttention``), float32 only, when it imports against this PyTorch; otherwise the
  entry says why it is unavailable.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hvlformer.modeling.pixel_decoder.ms_deform_attn import ms_deform_attn

from _common import emit_json  # tools/_common.py (this folder is on sys.path when the tool runs)

REAL = dict(batch=8, levels=[(64, 64), (32, 32), (16, 16)], heads=8, points=4, d_model=256)
SMALL = dict(batch=1, levels=[(8, 8), (4, 4), (2, 2)], heads=2, points=2, d_model=16)
TARGETS = {"fwd_bwd_speedup_vs_pytorch_min": 3.0, "fwd_bwd_speedup_vs_cuda_op_min": 1.0,
           "peak_memory_fraction_of_pytorch_max": 0.2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Inputs = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def make_inputs(shape: Dict[str, Any], dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """``(value, spatial_shapes, level_start_index, locations, weights, grad_out)`` for ``shape``.

    ``value`` ``B x S x nH x Dh`` in ``dtype``; locations ``B x S x nH x L x P x 2`` and weights in float32;
    ``grad_out`` ``B x S x D`` in ``dtype``.
    """
    g = torch.Generator().manual_seed(seed)
    levels = shape["levels"]
    B, nH, P, D = shape["batch"], shape["heads"], shape["points"], shape["d_model"]
    L = len(levels)
    S = sum(h * w for h, w in levels)
    centres = []
    for h, w in levels:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack((xs.flatten(), ys.flatten()), -1))
    reference = torch.cat(centres)  # S x 2: every pixel of every level is a query
    size = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32)  # L x 2 as (W, H)
    offsets = 2.0 * torch.randn(B, S, nH, L, P, 2, generator=g) / size.view(1, 1, 1, L, 1, 2)
    locations = reference.view(1, S, 1, 1, 1, 2) + offsets
    weights = torch.randn(B, S, nH, L * P, generator=g).softmax(-1).view(B, S, nH, L, P)
    value = torch.randn(B, S, nH, D // nH, generator=g)
    grad_out = torch.randn(B, S, D, generator=g)
    shapes = torch.tensor(levels, dtype=torch.long)
    start = torch.cat((shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]))
    to = lambda t, dt=None: t.to(device=device, dtype=dt) if dt is not None else t.to(device)  # noqa: E731
    return (to(value, dtype), to(shapes), to(start), to(locations), to(weights), to(grad_out, dtype))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _CudaOpFunction(torch.autograd.Function):
    """Deformable-DETR's CUDA op as an autograd function (``im2col_step`` = the batch)."""

    @staticmethod
    def forward(ctx, module, value, shapes, start, locations, weights):
        ctx.module = module
        ctx.save_for_backward(value, shapes, start, locations, weights)
        return module.ms_deform_attn_forward(value, shapes, start, locations, weights, value.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        value, shapes, start, locations, weights = ctx.saved_tensors
        grads = ctx.module.ms_deform_attn_backward(value, shapes, start, locations, weights,
                                                   grad_out.contiguous(), value.shape[0])
        return None, grads[0], None, None, grads[1], grads[2]


def load_cuda_op() -> Tuple[Optional[Any], str]:
    """``(module, "loaded")`` or ``(None, reason)`` for the ``ms-deform-attn`` package's CUDA op."""
    try:
        import MultiScaleDeformableAttention as module  # noqa: N813 - the package's module name
    except (ImportError, OSError) as error:  # not installed, or built against another torch / CUDA
        return None, f"{type(error).__name__}: {error}"
    return module, "loaded"


def _cores(device: torch.device, dtype: torch.dtype, small: bool) -> Dict[str, Dict[str, Any]]:
    """Per core: ``fn`` (value, shapes, start, loc, weights -> out) or None, and ``status``."""
    from hvlformer.modeling.pixel_decoder import ms_deform_attn_triton as msda_triton

    cores: Dict[str, Dict[str, Any]] = {
        "pytorch": {"fn": lambda v, s, st, l, w: ms_deform_attn(v, s, st, l, w, impl="pytorch"), "status": "measured"},
    }
    triton_fn = lambda v, s, st, l, w: ms_deform_attn(v, s, st, l, w, impl="triton")  # noqa: E731
    if device.type == "cuda" and msda_triton.triton_can_run(device):
        cores["triton"] = {"fn": triton_fn, "status": "measured"}
    elif device.type == "cpu" and msda_triton.triton_can_run(device):
        cores["triton"] = {"fn": triton_fn if small else None, "timed": False,
                           "status": "not measured: on CPU the Triton kernels run in Triton's interpreter, whose "
                                     "timing says nothing about speed" + (
                                         "; correctness checked against the PyTorch core" if small else "")}
    else:
        cores["triton"] = {"fn": None, "status": f"unavailable: the Triton kernels cannot run on {device.type} here "
                                                  f"(CUDA, or CPU with TRITON_INTERPRET=1)"}
    module, reason = load_cuda_op()
    if module is None:
        cores["cuda_op"] = {"fn": None, "status": f"unavailable: the ms-deform-attn CUDA op did not load ({reason})"}
    elif device.type != "cuda":
        cores["cuda_op"] = {"fn": None, "status": "unavailable: the CUDA op needs CUDA tensors"}
    else:
        def cuda_op(v, s, st, l, w):
            # float32 only: a bf16 / fp16 value is upcast (the copy is part of the measured time)
            return _CudaOpFunction.apply(module, v.float().contiguous(), s, st, l.contiguous(), w.contiguous())
        cores["cuda_op"] = {"fn": cuda_op, "status": "measured" + ("" if dtype == torch.float32 else
                                                                  " (float32 inputs: the op has no bf16/fp16)")}
    return cores


def _run_core(fn: Callable, inputs: Inputs, device: torch.device, iters: int, warmup: int, timed: bool,
              reference: Optional[Tuple[Tensor, List[Tensor]]]) -> Tuple[Dict[str, Any], Tuple[Tensor, List[Tensor]]]:
    value, shapes, start, locations, weights, grad_out = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]

    def forward() -> Tensor:
        with torch.no_grad():
            return fn(leaves[0], shapes, start, leaves[1], leaves[2])

    def forward_backward() -> Tuple[Tensor, List[Tensor]]:
        out = fn(leaves[0], shapes, start, leaves[1], leaves[2])
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
        return out, list(grads)

    result: Dict[str, Any] = {}
    out, grads = forward_backward()
    if timed:
        fwd_ms = _median_ms(forward, device, iters, warmup)
        fwd_bwd_ms = _median_ms(forward_backward, device, iters, warmup)
        fwd_bytes = _nbytes(value, locations, weights, out)
        bwd_bytes = _nbytes(value, locations, weights, grad_out, *grads)
        result.update(forward_ms=round(fwd_ms, 4), forward_backward_ms=round(fwd_bwd_ms, 4),
                      forward_gb_per_s=round(fwd_bytes / fwd_ms / 1e6, 2),
                      forward_backward_gb_per_s=round((fwd_bytes + bwd_bytes) / fwd_bwd_ms / 1e6, 2))
        if device.type == "cuda":
            del out, grads
            _sync(device)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out, grads = forward_backward()
            _sync(device)
            result["peak_memory_mb"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 2)
        else:
            result["peak_memory_mb"] = None  # per-op peaks are only tracked by the CUDA allocator
    if reference is not None:
        ref_out, ref_grads = reference
        diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip([out, *grads], [ref_out, *ref_grads])]
        result["max_abs_diff_vs_pytorch"] = dict(zip(("output", "grad_value", "grad_locations", "grad_weights"),
                                                     [float(f"{d:.3g}") for d in diffs]))
    return result, (out.detach(), [g.detach() for g in grads])


def run(device: str = "cuda", small: bool = False, dtype: str = "float32", iters: int = 20, warmup: int = 5,
        seed: int = 0) -> Dict[str, Any]:
    """All cores on one set of inputs; the JSON-ready report."""
    dev = torch.device(device)
    shape = SMALL if small else REAL
    inputs = make_inputs(shape, DTYPES[dtype], dev, seed)
    cores = _cores(dev, DTYPES[dtype], small)
    report: Dict[str, Any] = {
        "benchmark": "msdeformattn",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "shapes": {**shape, "queries": inputs[0].shape[1], "head_dim": shape["d_model"] // shape["heads"],
                   "small": small},
        "value_dtype": dtype,
        "iters": iters, "warmup": warmup,
        "bandwidth": "compulsory bytes (inputs read once, outputs written once) / time",
        "targets": TARGETS,
        "cores": {},
    }
    reference = None
    for name in ("pytorch", "triton", "cuda_op"):
        core = cores[name]
        entry: Dict[str, Any] = {"status": core["status"]}
        if core["fn"] is not None:
            timed = core.get("timed", True)
            measured, result = _run_core(core["fn"], inputs, dev, iters, warmup, timed, reference)
            entry.update(measured)
            if name == "pytorch":
                reference = result
        report["cores"][name] = entry
    report["ratios"] = _ratios(report["cores"])
    return report


def _ratios(cores: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Speed-ups (``other / triton`` time) and memory fractions (``triton / other``); None where a figure
    is missing, with ``targets_met`` only when every figure it needs exists."""
    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return round(a / b, 3) if a is not None and b is not None and b > 0 else None

    t, p, c = cores.get("triton", {}), cores.get("pytorch", {}), cores.get("cuda_op", {})
    ratios = {
        "forward_speedup_vs_pytorch": ratio(p.get("forward_ms"), t.get("forward_ms")),
        "fwd_bwd_speedup_vs_pytorch": ratio(p.get("forward_backward_ms"), t.get("forward_backward_ms")),
        "forward_speedup_vs_cuda_op": ratio(c.get("forward_ms"), t.get("forward_ms")),
        "fwd_bwd_speedup_vs_cuda_op": ratio(c.get("forward_backward_ms"), t.get("forward_backward_ms")),
        "peak_memory_fraction_of_pytorch": ratio(t.get("peak_memory_mb"), p.get("peak_memory_mb")),
        "peak_memory_fraction_of_cuda_op": ratio(t.get("peak_memory_mb"), c.get("peak_memory_mb")),
    }
    checks = {
        "fwd_bwd_speedup_vs_pytorch": (ratios["fwd_bwd_speedup_vs_pytorch"], TARGETS["fwd_bwd_speedup_vs_pytorch_min"], 1),
        "fwd_bwd_speedup_vs_cuda_op": (ratios["fwd_bwd_speedup_vs_cuda_op"], TARGETS["fwd_bwd_speedup_vs_cuda_op_min"], 1),
        "peak_memory_fraction_of_pytorch": (ratios["peak_memory_fraction_of_pytorch"],
                                            TARGETS["peak_memory_fraction_of_pytorch_max"], -1),
    }
    ratios["targets_met"] = {k: (None if v is None else (v >= bound if sign > 0 else v <= bound))
                             for k, (v, bound, sign) in checks.items()}
    return ratios


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of value / grad_out")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    report = run(args.device, args.small, args.dtype, args.iters, args.warmup, args.seed)
    emit_json(report, args.output)
    return report


if __name__ == "__main__":
    main()
