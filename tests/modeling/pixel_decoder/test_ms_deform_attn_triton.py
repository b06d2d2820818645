"""The Triton MSDeformAttn kernels against the PyTorch ``grid_sample`` reference.

Without CUDA, ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before the kernels are imported, so they
run on CPU tensors in Triton's interpreter; with CUDA the same tests run the compiled kernels on the GPU.
Shapes are tiny: the interpreter executes every Triton op with NumPy.

Tolerances: float64 1e-12 (same formula, different summation order). float32 1e-5 relative and
1e-5 x (widest level) absolute, since location gradients carry the factor W or H of their level
(grid_sample computes the pixel coordinate as ``(((2x - 1) + 1) * W - 1) / 2``, the kernel as
``x * W - 0.5``: a few float32 ulps apart). bfloat16 values: the output and ``grad_value`` are rounded
once to bfloat16 from float32 sums in both implementations, so they agree to one bfloat16 ulp (2^-8 to
2^-7 relative); the location and weight gradients stay float32 and match to 1e-5 relative. (Triton 3.8's
interpreter truncates the float32 -> bfloat16 cast of the stored output instead of rounding to nearest
even, which stays within that one ulp.)
"""
import os
import subprocess
import sys

import pytest
import torch

from hvlformer.modeling.pixel_decoder import ms_deform_attn_triton as msda_triton
from hvlformer.modeling.pixel_decoder.ms_deform_attn import ms_deform_attn, ms_deform_attn_core_pytorch

DEVICE = torch.device("cpu") if msda_triton.INTERPRETED else torch.device("cuda")


def test_kernels_can_run_here():
    # Not a skip: without CUDA the suite must run the kernels in the interpreter (tests/conftest.py).
    assert msda_triton.triton_can_run(DEVICE), (
        "the Triton kernels cannot run here: no CUDA device and TRITON_INTERPRET was not set at import")


# (levels (H, W), B, Lq, nH, Dh, P): non-square levels, a 1 x 1 level (every sample of it hits the same
# pixel: concurrent atomic adds), a head dim that is not a power of two, a single level and point.
CASES = {
    "four_levels_1x1": ([(5, 7), (1, 1), (3, 4), (2, 1)], 2, 5, 2, 3, 2),
    "one_level_one_point": ([(4, 6)], 1, 7, 1, 1, 1),
    "wide_head": ([(3, 8), (2, 2)], 1, 3, 2, 16, 3),
}


def _inputs(case, dtype, seed=0, far=True):
    shapes, B, Lq, nH, Dh, P = CASES[case]
    g = torch.Generator().manual_seed(seed)
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, nH, Dh, generator=g, dtype=torch.float64)
    # mostly inside, some up to 0.3 outside [0, 1] (partly padded samples)...
    loc = -0.3 + 1.6 * torch.rand(B, Lq, nH, L, P, 2, generator=g, dtype=torch.float64)
    if far:
        # ...and a few far away (both neighbours off the map; exercises the clamp before the int cast)
        loc[0, 0, 0, 0, 0] = torch.tensor([-1e6, 0.5])
        loc[-1, -1, -1, -1, -1] = torch.tensor([0.5, 3.0e9])
    weights = torch.rand(B, Lq, nH, L, P, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, Lq, nH * Dh, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return cast(value), torch.tensor(shapes, device=DEVICE), cast(loc), cast(weights), cast(grad_out)


def _forward_backward(fn, value, shapes, loc, weights, grad_out):
    inputs = [t.detach().clone().requires_grad_(True) for t in (value, loc, weights)]
    out = fn(inputs[0], shapes, inputs[1], inputs[2])
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return out, grads


def _triton(value, shapes, loc, weights):
    return msda_triton.ms_deform_attn_triton(value, shapes, None, loc, weights)


def _assert_all_close(triton_result, core_result, rtol, atol):
    (out_t, grads_t), (out_c, grads_c) = triton_result, core_result
    torch.testing.assert_close(out_t, out_c, rtol=rtol, atol=atol)
    for name, gt, gc in zip(("value", "sampling_locations", "attention_weights"), grads_t, grads_c):
        assert gt.dtype == gc.dtype and gt.shape == gc.shape, name
        torch.testing.assert_close(gt, gc, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_matches_core_float64(case):
    args = _inputs(case, torch.float64)
    _assert_all_close(_forward_backward(_triton, *args), _forward_backward(ms_deform_attn_core_pytorch, *args),
                      rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["four_levels_1x1", "wide_head"])
def test_triton_matches_core_float32(case):
    value, shapes, loc, weights, grad_out = _inputs(case, torch.float32, seed=1)
    args = (value, shapes, loc, weights, grad_out)
    triton_result = _forward_backward(_triton, *args)
    core_result = _forward_backward(ms_deform_attn_core_pytorch, *args)
    # location gradients carry the factor W or H of their level: compare them relative to their scale
    _assert_all_close(triton_result, core_result, rtol=1e-5, atol=1e-5 * max(w for _, w in CASES[case][0]))
    assert triton_result[0].abs().max() > 0.1  # not trivially zero


def test_triton_bfloat16_values_through_the_dispatch():
    """bf16 values (as under autocast): the reference upcasts them to float32, the kernel reads them as
    bf16 and accumulates in float32; both round the output and grad_value once to bf16."""
    value, shapes, loc, weights, grad_out = _inputs("four_levels_1x1", torch.float32, seed=2)
    value = value.bfloat16()
    start = torch.zeros(len(CASES["four_levels_1x1"][0]), dtype=torch.long, device=DEVICE)  # not read

    def run(impl):
        return lambda v, s, l, w: ms_deform_attn(v, s, start, l, w, impl=impl)

    (out_t, grads_t) = _forward_backward(run("triton"), value, shapes, loc, weights, grad_out)
    (out_c, grads_c) = _forward_backward(run("pytorch"), value, shapes, loc, weights, grad_out)
    assert out_t.dtype == out_c.dtype == torch.bfloat16
    assert grads_t[0].dtype == torch.bfloat16 and grads_t[1].dtype == grads_t[2].dtype == torch.float32
    # one bf16 ulp is 2^-8 to 2^-7 of the value (7 stored mantissa bits). Triton 3.8's interpreter
    # truncates float32 -> bfloat16 where compiled kernels round to nearest even, hence up to one ulp.
    bf16_ulp = 2.0 ** -7
    torch.testing.assert_close(out_t, out_c, rtol=bf16_ulp, atol=1e-6)
    torch.testing.assert_close(grads_t[0], grads_c[0], rtol=bf16_ulp, atol=1e-6)
    torch.testing.assert_close(grads_t[1], grads_c[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads_t[2], grads_c[2], rtol=1e-5, atol=1e-5)


def test_triton_float16_accumulates_in_float32():
    """The mean of the 16 float16 values ``1000 + k``: the values, the weighted samples ``62.5 + k / 16``
    and the mean 1007.5 are float16 numbers, but the running sums are not (ulp 1/16 above 64, 1/8 above
    128, ...), so a float16 accumulator would round on the way; the float32 one gives the mean exactly."""
    shapes = torch.tensor([[1, 16]], device=DEVICE)
    value = (1000.0 + torch.arange(16, device=DEVICE)).view(1, 16, 1, 1)
    loc = torch.stack([(torch.arange(16, device=DEVICE) + 0.5) / 16, torch.full((16,), 0.5, device=DEVICE)], -1)
    weights = torch.full((1, 1, 1, 1, 16), 1.0 / 16, device=DEVICE)
    out = _triton(value.half(), shapes, loc.view(1, 1, 1, 1, 16, 2), weights)
    assert out.dtype == torch.float16
    assert float(out) == 1007.5


def test_triton_far_outside_reads_zero_and_has_zero_gradient():
    value, shapes, loc, weights, grad_out = _inputs("one_level_one_point", torch.float32)
    loc = torch.full_like(loc, -7.0)
    loc[..., 1] = 1e8
    out, grads = _forward_backward(_triton, value, shapes, loc, weights, grad_out)
    assert out.abs().max() == 0
    for grad in grads:
        assert grad.abs().max() == 0


def test_triton_rejects_bad_inputs():
    value, shapes, loc, weights, _ = _inputs("one_level_one_point", torch.float32)
    with pytest.raises(TypeError, match="float32 or float64"):
        _triton(value, shapes, loc.bfloat16(), weights)
    with pytest.raises(ValueError, match="spatial_shapes"):
        _triton(value, torch.cat([shapes, shapes]), loc, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        _triton(value, shapes, loc, weights[..., :0])
    if msda_triton.INTERPRETED:
        # interpreted kernels cannot run on a CUDA tensor and vice versa: say so instead of crashing
        with pytest.raises(RuntimeError, match="cannot run"):
            msda_triton._check_inputs(value.to("meta"), shapes.to("meta"), loc.to("meta"), weights.to("meta"))


_COMPILE_SCRIPT = """
import importlib.util, sys
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile

spec = importlib.util.spec_from_file_location("msda_triton", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert not module.INTERPRETED
fwd, bwd = module._ms_deform_attn_fwd_kernel, module._ms_deform_attn_bwd_kernel
for kernel, n_pointers, value_type, acc in ((fwd, 5, "*bf16", tl.float32), (bwd, 8, "*bf16", tl.float32)):
    constants = dict(N_HEADS=8, HEAD_DIM=32, N_LEVELS=1, N_POINTS=1, BLOCK_Q=64, BLOCK_D=32, ACC_DTYPE=acc)
    float_type = "*fp64" if acc == tl.float64 else "*fp32"
    names = kernel.arg_names
    signature = {}
    for index, name in enumerate(names):
        if name in constants:
            signature[name] = "constexpr"
        elif index >= n_pointers:
            signature[name] = "i32"
        elif name == "shapes_ptr":
            signature[name] = "*i32"
        else:
            signature[name] = value_type if name in ("value_ptr", "out_ptr", "grad_out_ptr") else float_type
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in range(n_pointers)})
    compiled = triton_compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"], kernel
    if value_type == "*bf16":
        assert "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx, "Dh-contiguous gathers are not vectorised"
    if n_pointers == 8:
        assert "atom.global" in ptx or "red.global" in ptx
    print(kernel.__name__, value_type, "ok")
"""


def test_kernels_compile_for_an_sm90_gpu(tmp_path):
    """The interpreter does not type-check like the compiler: compile both kernels to a cubin for an
    H100-class GPU (no GPU needed; Triton's bundled ptxas runs on the CPU), with bf16 values and
    float32 accumulation as under AMP. In a subprocess, because the kernels of this process are interpreted
    and the interpreter patches ``triton.language``. One level and one point keep it to a few seconds;
    more only unroll the same code."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, msda_triton.__file__], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [f"_ms_deform_attn_{k}_kernel *bf16 ok" for k in ("fwd", "bwd")]
    assert result.stdout.splitlines() == expected
