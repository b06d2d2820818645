"""Tests of the multi-scale deformable attention core, its dispatch and the MSDeformAttn module."""
import math

import pytest
import torch

from hvlformer.modeling.pixel_decoder import ms_deform_attn_triton as msda_triton
from hvlformer.modeling.pixel_decoder.ms_deform_attn import (
    MS_DEFORM_ATTN_IMPL_ENV,
    MSDeformAttn,
    get_fast_kernel,
    ms_deform_attn,
    ms_deform_attn_core_pytorch,
    register_fast_kernel,
    resolve_impl,
    triton_kernel,
)

# Where the Triton kernels run in this process: CPU in the interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1 without CUDA), else the GPU.
KERNEL_DEVICE = torch.device("cpu") if msda_triton.INTERPRETED else torch.device("cuda")

SHAPES = [(5, 7), (3, 4), (2, 1)]  # three levels of different (and odd) sizes


def _level_start(shapes):
    sizes = torch.tensor([h * w for h, w in shapes])
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))


def _random_inputs(shapes=SHAPES, B=2, Lq=4, nH=2, Dh=3, P=2, dtype=torch.float64, seed=0,
                   away_from_kinks=False, outside=True):
    g = torch.Generator().manual_seed(seed)
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, nH, Dh, generator=g, dtype=dtype)
    lo, hi = (-0.15, 1.15) if outside else (0.0, 1.0)
    loc = lo + (hi - lo) * torch.rand(B, Lq, nH, L, P, 2, generator=g, dtype=dtype)
    if away_from_kinks:
        # Bilinear interpolation has kinks where the pixel coordinate ``loc * size - 0.5`` is an integer
        # (pixel centres, and the -1 / size borders of the zero padding): snap the fractional part into
        # [0.2, 0.8] so finite differences with eps=1e-6 never cross one.
        size = torch.tensor([[w, h] for h, w in shapes], dtype=dtype).view(1, 1, 1, L, 1, 2)
        coord = loc * size - 0.5
        frac = coord - coord.floor()
        coord = coord.floor() + 0.2 + 0.6 * frac
        loc = (coord + 0.5) / size
    weights = torch.rand(B, Lq, nH, L, P, generator=g, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, torch.tensor(shapes, dtype=torch.long), loc, weights


def _naive(value, shapes, loc, weights):
    """Explicit per-sample bilinear interpolation, align_corners=False, zeros outside the map."""
    B, S, nH, Dh = value.shape
    _, Lq, _, L, P, _ = loc.shape
    starts = _level_start(shapes).tolist()
    out = torch.zeros(B, Lq, nH * Dh, dtype=value.dtype)
    for b in range(B):
        for q in range(Lq):
            for h in range(nH):
                acc = torch.zeros(Dh, dtype=value.dtype)
                for lvl in range(L):
                    H, W = shapes[lvl]
                    for p in range(P):
                        # pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H)
                        x = loc[b, q, h, lvl, p, 0].item() * W - 0.5
                        y = loc[b, q, h, lvl, p, 1].item() * H - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        sample = torch.zeros(Dh, dtype=value.dtype)
                        for yi, wy in ((y0, 1.0 - fy), (y0 + 1, fy)):
                            for xi, wx in ((x0, 1.0 - fx), (x0 + 1, fx)):
                                if 0 <= yi < H and 0 <= xi < W:
                                    sample += wy * wx * value[b, starts[lvl] + yi * W + xi, h]
                        acc += weights[b, q, h, lvl, p] * sample
                out[b, q, h * Dh:(h + 1) * Dh] = acc
    return out


@pytest.fixture
def no_fast_kernel():
    """Run with no fast kernel registered, restoring whatever was registered before."""
    previous = register_fast_kernel(None)
    yield
    register_fast_kernel(previous)


# ---------------------------------------------------------------- core


@pytest.mark.parametrize("seed", [0, 1])
def test_core_matches_naive_bilinear_loop(seed):
    value, shapes, loc, weights = _random_inputs(seed=seed)
    out = ms_deform_attn_core_pytorch(value, shapes, loc, weights)
    ref = _naive(value, SHAPES, loc, weights)
    assert out.shape == (2, 4, 2 * 3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_core_pixel_centre_and_outside_samples():
    # A location exactly at a pixel centre returns that pixel; a location beyond the half-pixel border
    # (more than one pixel outside) returns zero.
    shapes = [(3, 4)]
    value = torch.arange(12, dtype=torch.float64).view(1, 12, 1, 1)
    loc = torch.tensor([[(1 + 0.5) / 4, (2 + 0.5) / 3], [-0.3, 0.5]], dtype=torch.float64)
    loc = loc.view(1, 2, 1, 1, 1, 2)
    weights = torch.ones(1, 2, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn_core_pytorch(value, torch.tensor(shapes), loc, weights)
    torch.testing.assert_close(out.view(-1), torch.tensor([2 * 4 + 1, 0.0], dtype=torch.float64))


def test_core_gradcheck_float64():
    value, shapes, loc, weights = _random_inputs(B=1, Lq=3, nH=2, Dh=2, P=2, away_from_kinks=True, seed=3)
    value.requires_grad_(True)
    loc.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, l, w: ms_deform_attn_core_pytorch(v, shapes, l, w), (value, loc, weights),
        eps=1e-6, atol=1e-5, rtol=1e-4,
    )


def test_core_rejects_inconsistent_shapes():
    value, shapes, loc, weights = _random_inputs()
    with pytest.raises(ValueError, match="tokens"):
        ms_deform_attn_core_pytorch(value[:, :-1], shapes, loc, weights)
    with pytest.raises(ValueError, match="levels"):
        ms_deform_attn_core_pytorch(value, shapes[:2], loc, weights)


# ---------------------------------------------------------------- dispatch


def test_dispatch_pytorch_and_auto_agree_on_cpu(no_fast_kernel):
    value, shapes, loc, weights = _random_inputs(dtype=torch.float32)
    start = _level_start(SHAPES)
    a = ms_deform_attn(value, shapes, start, loc, weights, impl="auto")
    p = ms_deform_attn(value, shapes, start, loc, weights, impl="pytorch")
    torch.testing.assert_close(a, p, rtol=0, atol=0)
    torch.testing.assert_close(p, ms_deform_attn_core_pytorch(value, shapes, loc, weights))


def test_dispatch_unknown_impl_raises():
    value, shapes, loc, weights = _random_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="impl"):
        ms_deform_attn(value, shapes, _level_start(SHAPES), loc, weights, impl="cuda_please")
    with pytest.raises(ValueError, match="impl"):
        MSDeformAttn(16, 1, 2, 1, impl="cuda")


def test_registered_kernel_is_not_used_for_cpu_tensors():
    calls = []

    def fake_kernel(*args):
        calls.append(args)
        raise AssertionError("the fast kernel must not be called for CPU tensors")

    previous = register_fast_kernel(fake_kernel)
    try:
        assert get_fast_kernel() is fake_kernel
        value, shapes, loc, weights = _random_inputs(dtype=torch.float32)
        ms_deform_attn(value, shapes, _level_start(SHAPES), loc, weights, impl="auto")
        ms_deform_attn(value, shapes, _level_start(SHAPES), loc, weights, impl="pytorch")
    finally:
        register_fast_kernel(previous)
    assert calls == []
    with pytest.raises(TypeError):
        register_fast_kernel("not callable")


def test_dispatch_half_precision_is_sampled_in_float32():
    value, shapes, loc, weights = _random_inputs(dtype=torch.float32, seed=5)
    start = _level_start(SHAPES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(value.bfloat16(), shapes, start, loc, weights.bfloat16(), impl="pytorch")
    assert out.dtype == torch.bfloat16
    # Same result as float32 sampling of the bf16 values at the float32 locations (only the final cast
    # rounds), which would not hold if the locations had been rounded to bf16.
    ref = ms_deform_attn_core_pytorch(value.bfloat16().float(), shapes, loc, weights.bfloat16().float())
    torch.testing.assert_close(out.float(), ref.bfloat16().float(), rtol=0, atol=0)


def test_fast_kernel_matches_core_forward_and_backward():
    # The registered fast kernel is the Triton one; run it where it can run here (the GPU, or the CPU in
    # Triton's interpreter) against the reference, on the shapes of the old CUDA-only comparison.
    kernel = get_fast_kernel()
    assert kernel is triton_kernel
    shapes = [(16, 20), (8, 10), (4, 5)]
    value, sh, loc, weights = _random_inputs(shapes=shapes, B=2, Lq=30, nH=4, Dh=8, P=4, dtype=torch.float32,
                                             away_from_kinks=True)
    dev = KERNEL_DEVICE
    inputs = [t.to(dev).requires_grad_(True) for t in (value, loc, weights)]
    sh, start = sh.to(dev), _level_start(shapes).to(dev)
    fast = kernel(inputs[0], sh, start, inputs[1], inputs[2])
    grad_out = torch.randn_like(fast)
    fast_grads = torch.autograd.grad(fast, inputs, grad_out)
    core = ms_deform_attn(inputs[0], sh, start, inputs[1], inputs[2], impl="pytorch")
    core_grads = torch.autograd.grad(core, inputs, grad_out)
    torch.testing.assert_close(fast, core, rtol=1e-5, atol=1e-5)
    for gf, gc in zip(fast_grads, core_grads):
        torch.testing.assert_close(gf, gc, rtol=1e-5, atol=1e-4)


def test_resolve_impl_explicit_device_check_and_env_override(monkeypatch):
    monkeypatch.delenv(MS_DEFORM_ATTN_IMPL_ENV, raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_impl("auto", cpu) == "pytorch"
    assert resolve_impl("auto", cuda) == "fast"  # a device check only: no CUDA tensor is made
    assert resolve_impl("pytorch", cuda) == "pytorch"
    assert resolve_impl("triton", cpu) == "triton"
    monkeypatch.setenv(MS_DEFORM_ATTN_IMPL_ENV, "pytorch")
    assert resolve_impl("auto", cuda) == "pytorch"  # the switch that forces the reference
    assert resolve_impl("triton", cuda) == "triton"  # an explicit impl is not overridden
    monkeypatch.setenv(MS_DEFORM_ATTN_IMPL_ENV, "cuda_please")
    with pytest.raises(ValueError, match=MS_DEFORM_ATTN_IMPL_ENV):
        resolve_impl("auto", cpu)
    previous = register_fast_kernel(None)
    try:
        monkeypatch.delenv(MS_DEFORM_ATTN_IMPL_ENV)
        assert resolve_impl("auto", cuda) == "pytorch"
    finally:
        register_fast_kernel(previous)


def test_dispatch_triton_impl_matches_pytorch_impl(single_thread):
    value, shapes, loc, weights = (t.to(KERNEL_DEVICE) for t in _random_inputs(dtype=torch.float32, seed=7))
    start = _level_start(SHAPES).to(KERNEL_DEVICE)
    t = ms_deform_attn(value, shapes, start, loc, weights, impl="triton")
    p = ms_deform_attn(value, shapes, start, loc, weights, impl="pytorch")
    torch.testing.assert_close(t, p, rtol=1e-5, atol=1e-6)


def test_module_triton_and_pytorch_cores_agree_with_gradients(single_thread):
    torch.manual_seed(0)
    x, sh, start = _flatten_levels(SHAPES, B=1, D=16)
    query, ref = torch.randn(1, 6, 16), torch.rand(1, 6, 3, 2)
    results = {}
    for impl in ("triton", "pytorch"):
        torch.manual_seed(1)
        m = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=2, impl=impl).to(KERNEL_DEVICE)
        with torch.no_grad():  # non-trivial offsets and weights
            m.sampling_offsets.weight.normal_(0, 0.5)
            m.attention_weights.weight.normal_(0, 0.5)
        out = m(*(t.to(KERNEL_DEVICE) for t in (query, ref, x, sh, start)))
        out.square().sum().backward()
        results[impl] = (out, {n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["pytorch"][0], rtol=1e-5, atol=1e-5)
    for name, grad in results["pytorch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- module


def _flatten_levels(shapes, B, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    return torch.randn(B, S, D, generator=g), torch.tensor(shapes), _level_start(shapes)


def test_module_output_shape_and_init():
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    x, sh, start = _flatten_levels(SHAPES, B=2, D=32)
    ref = torch.rand(2, 6, 3, 2)
    out = m(torch.randn(2, 6, 32), ref, x, sh, start)
    assert out.shape == (2, 6, 32)
    # Deformable-DETR offset init: head 0 looks along +x, head 1 (90 deg) along +y, point p at p+1 px.
    bias = m.sampling_offsets.bias.view(4, 3, 2, 2)
    torch.testing.assert_close(bias[0, :, 1], torch.tensor([[2.0, 0.0]] * 3))
    torch.testing.assert_close(bias[1, 2, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    assert torch.count_nonzero(m.sampling_offsets.weight) == 0
    assert torch.count_nonzero(m.attention_weights.weight) == 0


def test_module_rejects_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)


def _zero_offset_module(d_model, n_levels, n_heads):
    m = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=1)
    with torch.no_grad():
        m.sampling_offsets.weight.zero_()
        m.sampling_offsets.bias.zero_()
    return m


def test_module_zero_offsets_single_level_reads_reference_pixel():
    torch.manual_seed(0)
    shapes = [(5, 6)]
    m = _zero_offset_module(16, 1, 4)
    x, sh, start = _flatten_levels(shapes, B=2, D=16, seed=1)
    # queries at random pixels, reference points exactly at those pixel centres
    rows = torch.tensor([[0, 4, 2], [3, 1, 4]])
    cols = torch.tensor([[0, 5, 3], [2, 2, 1]])
    ref = torch.stack(((cols + 0.5) / 6, (rows + 0.5) / 5), -1)[:, :, None, :]  # B x 3 x 1 x 2
    query = torch.randn(2, 3, 16)
    out = m(query, ref, x, sh, start)
    idx = rows * 6 + cols
    picked = torch.stack([x[b, idx[b]] for b in range(2)])
    expected = m.output_proj(m.value_proj(picked))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_module_offsets_are_in_pixels_of_the_level():
    # Offset bias (+1, 0) px for every head: a query at the centre of pixel (r, c) of a non-square map
    # reads pixel (r, c + 1); (0, -2) reads pixel (r - 2, c). Checks the (x, y) order and the per-level
    # normalisation by (W, H).
    torch.manual_seed(0)
    shapes = [(5, 6)]
    x, sh, start = _flatten_levels(shapes, B=1, D=8, seed=4)
    rows, cols = torch.tensor([2, 4]), torch.tensor([1, 3])
    ref = torch.stack(((cols + 0.5) / 6, (rows + 0.5) / 5), -1).view(1, 2, 1, 2)
    for (dx, dy), (r2, c2) in (((1.0, 0.0), (rows, cols + 1)), ((0.0, -2.0), (rows - 2, cols))):
        m = _zero_offset_module(8, 1, 2)
        with torch.no_grad():
            m.sampling_offsets.bias.copy_(torch.tensor([dx, dy]).repeat(2))
        out = m(torch.randn(1, 2, 8), ref, x, sh, start)
        expected = m.output_proj(m.value_proj(x[0, r2 * 6 + c2]))
        torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_module_zero_offsets_two_levels_average_and_padding_mask():
    torch.manual_seed(0)
    shapes = [(4, 4), (2, 2)]
    m = _zero_offset_module(8, 2, 2)  # attention weight logits are zero-initialised -> 1/2 per level
    x, sh, start = _flatten_levels(shapes, B=1, D=8, seed=2)
    # the centre of fine pixel (1, 2) is ((2.5)/4, (1.5)/4) = (0.625, 0.375): in the coarse 2x2 level that
    # is x = 0.625*2-0.5 = 0.75, y = 0.375*2-0.5 = 0.25: bilinear mix of the 4 coarse pixels.
    ref = torch.tensor([0.625, 0.375]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    out = m(torch.randn(1, 1, 8), ref, x, sh, start)
    v = m.value_proj(x[0])
    fine = v[1 * 4 + 2]
    coarse = v[16:].view(2, 2, 8)
    coarse_sample = (0.75 * 0.25 * coarse[0, 0] + 0.75 * 0.75 * coarse[0, 1]
                     + 0.25 * 0.25 * coarse[1, 0] + 0.25 * 0.75 * coarse[1, 1])
    expected = m.output_proj(0.5 * fine + 0.5 * coarse_sample)
    torch.testing.assert_close(out.view(-1), expected, rtol=1e-5, atol=1e-5)

    # Masking every token zeroes the values: only the output bias is left.
    mask = torch.ones(1, x.shape[1], dtype=torch.bool)
    out_masked = m(torch.randn(1, 1, 8), ref, x, sh, start, input_padding_mask=mask)
    torch.testing.assert_close(out_masked.view(-1), m.output_proj.bias, rtol=1e-6, atol=1e-6)


def test_module_gradients_reach_offsets_and_weights():
    m = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=2)
    x, sh, start = _flatten_levels(SHAPES, B=1, D=16)
    query = torch.randn(1, 5, 16)
    m(query, torch.rand(1, 5, 3, 2), x, sh, start).square().sum().backward()
    for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
        grad = getattr(m, name).weight.grad
        assert grad is not None and torch.count_nonzero(grad) > 0, name


def test_module_accepts_float64():
    m = MSDeformAttn(d_model=8, n_levels=3, n_heads=2, n_points=1).double()
    x, sh, start = _flatten_levels(SHAPES, B=1, D=8)
    out = m(x.double()[:, :4], torch.rand(1, 4, 3, 2, dtype=torch.float64), x.double(), sh, start)
    assert out.dtype == torch.float64

