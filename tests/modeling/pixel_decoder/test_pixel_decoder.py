"""Tests of the MSDeformAttn pixel decoder (Mask2Former encoder + FPN, HierVL text cross-attention)."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from hvlformer.config import add_hvlformer_config
from hvlformer.modeling.pixel_decoder import MSDeformAttn, MSDeformAttnPixelDecoder, build_pixel_decoder

INPUT_SHAPE = {
    "res2": ShapeSpec(channels=16, stride=4),
    "res3": ShapeSpec(channels=24, stride=8),
    "res4": ShapeSpec(channels=32, stride=16),
    "res5": ShapeSpec(channels=40, stride=32),
}
CONV_DIM, MASK_DIM = 32, 16


def _decoder(text_cross_attention=False, seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(
        transformer_dropout=0.0, transformer_nheads=2, transformer_dim_feedforward=64,
        transformer_enc_layers=2, transformer_n_points=2, conv_dim=CONV_DIM, mask_dim=MASK_DIM, norm="GN",
        transformer_in_features=["res3", "res4", "res5"], common_stride=4,
        text_cross_attention=text_cross_attention, msdeform_attn_impl="pytorch",
    )
    kwargs.update(overrides)
    return MSDeformAttnPixelDecoder(INPUT_SHAPE, **kwargs)


def _features(H, W, B=2, seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(B, s.channels, H // s.stride, W // s.stride, generator=g).requires_grad_(requires_grad)
        for k, s in INPUT_SHAPE.items()
    }


@pytest.mark.parametrize("H,W", [(128, 128), (96, 160)])
def test_output_shapes_and_strides(H, W):
    dec = _decoder()
    mask_features, zs = dec.forward_features(_features(H, W))
    assert mask_features.shape == (2, MASK_DIM, H // 4, W // 4)
    assert [tuple(z.shape) for z in zs] == [(2, CONV_DIM, H // s, W // s) for s in (32, 16, 8)]
    assert all(torch.isfinite(z).all() for z in [mask_features, *zs])


def test_structure_matches_mask2former():
    dec = _decoder()
    assert dec.in_features == ["res2", "res3", "res4", "res5"]
    assert dec.transformer_in_features == ["res3", "res4", "res5"]
    assert dec.num_fpn_levels == 1
    # input projections coarse to fine: res5 (40 ch) first
    assert [p[0].in_channels for p in dec.input_proj] == [40, 32, 24]
    assert all(isinstance(p[1], torch.nn.GroupNorm) and p[1].num_groups == 32 for p in dec.input_proj)
    assert len(dec.transformer.layers) == 2
    attn = dec.transformer.layers[0].self_attn
    assert (attn.n_levels, attn.n_heads, attn.n_points) == (3, 2, 2)
    assert dec.transformer.level_embed.shape == (3, CONV_DIM)
    # Mask2Former parameter names of the FPN convs (checkpoint compatibility)
    names = {n for n, _ in dec.named_parameters()}
    assert {"adapter_1.weight", "layer_1.weight", "mask_features.weight"} <= names


def test_reference_points_are_pixel_centres():
    from hvlformer.modeling.pixel_decoder import MSDeformAttnTransformerEncoderOnly

    ref = MSDeformAttnTransformerEncoderOnly.get_reference_points([(2, 3), (1, 2)], 2, torch.device("cpu"))
    assert ref.shape == (2, 8, 2, 2)
    expected = torch.tensor([[1 / 6, 1 / 4], [3 / 6, 1 / 4], [5 / 6, 1 / 4],
                             [1 / 6, 3 / 4], [3 / 6, 3 / 4], [5 / 6, 3 / 4],
                             [1 / 4, 1 / 2], [3 / 4, 1 / 2]])  # (x, y), row-major per level
    for b in range(2):
        for lvl in range(2):
            torch.testing.assert_close(ref[b, :, lvl], expected)


def test_forward_equals_forward_features():
    dec = _decoder().eval()
    f = _features(64, 64)
    a, za = dec(f)
    b, zb = dec.forward_features(f)
    torch.testing.assert_close(a, b)


def test_build_from_cfg():
    cfg = get_cfg()
    add_hvlformer_config(cfg)
    head = cfg.MODEL.SEM_SEG_HEAD
    head.CONVS_DIM, head.MASK_DIM = 32, 24
    head.TRANSFORMER_ENC_LAYERS, head.TRANSFORMER_ENC_NHEADS, head.TRANSFORMER_ENC_POINTS = 1, 2, 3
    head.TRANSFORMER_ENC_DIM_FEEDFORWARD = 48
    head.MSDEFORM_ATTN_IMPL = "pytorch"
    assert SEM_SEG_HEADS_REGISTRY.get("MSDeformAttnPixelDecoder") is MSDeformAttnPixelDecoder
    shapes = dict(INPUT_SHAPE, stem=ShapeSpec(channels=8, stride=2))  # not in IN_FEATURES: filtered out
    dec = build_pixel_decoder(cfg, shapes)
    assert isinstance(dec, MSDeformAttnPixelDecoder)
    assert dec.in_features == ["res2", "res3", "res4", "res5"]
    assert len(dec.transformer.layers) == 1
    assert dec.transformer.layers[0].self_attn.n_points == 3
    assert dec.transformer.layers[0].self_attn.impl == "pytorch"
    assert dec.transformer.layers[0].linear1.out_features == 48
    assert dec.transformer.layers[0].text_attn is None
    mask_features, zs = dec.forward_features(_features(64, 96, B=1))
    assert mask_features.shape == (1, 24, 16, 24)
    assert len(zs) == 3

    # HierVL's text cross-attention (MODEL.HIERVL.TEXT_CROSS_ATTENTION) is passed by its meta-architecture
    assert build_pixel_decoder(cfg, shapes, text_cross_attention=True).text_cross_attention

    head.MSDEFORM_ATTN_IMPL = "bogus"
    with pytest.raises(ValueError, match="MSDEFORM_ATTN_IMPL"):
        build_pixel_decoder(cfg, shapes)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="divisible by 32"):
        _decoder(conv_dim=48)
    with pytest.raises(ValueError, match="transformer_in_features"):
        _decoder(transformer_in_features=["res3", "res6"])


def test_gradients_flow_to_inputs_and_offsets():
    dec = _decoder()
    # The offset / attention-weight projections start with zero weights (Deformable-DETR), so at init the
    # position + level embedding has no effect on the output; perturb them so that path is exercised too.
    with torch.no_grad():
        for layer in dec.transformer.layers:
            layer.self_attn.sampling_offsets.weight.normal_(0.0, 0.02)
            layer.self_attn.attention_weights.weight.normal_(0.0, 0.02)
    f = _features(64, 64, B=1, requires_grad=True)
    mask_features, zs = dec.forward_features(f)
    (mask_features.square().mean() + sum(z.square().mean() for z in zs)).backward()
    for name, x in f.items():
        assert x.grad is not None and torch.count_nonzero(x.grad) > 0, name
    for layer in dec.transformer.layers:
        for lin in (layer.self_attn.sampling_offsets, layer.self_attn.attention_weights):
            assert lin.weight.grad is not None and torch.count_nonzero(lin.weight.grad) > 0
    assert torch.count_nonzero(dec.transformer.level_embed.grad) > 0


def test_text_cross_attention():
    f = _features(64, 96)
    dec = _decoder(text_cross_attention=True)
    assert all(isinstance(layer.text_attn, torch.nn.Module) for layer in dec.transformer.layers)
    with pytest.raises(ValueError, match="text_centers"):
        dec.forward_features(f)
    with pytest.raises(ValueError, match="text_centers"):
        dec.forward_features(f, torch.randn(2, 5, CONV_DIM + 1))

    g = torch.Generator().manual_seed(3)
    centers_a = torch.randn(2, 5, CONV_DIM, generator=g)
    centers_b = torch.randn(2, 5, CONV_DIM, generator=g)
    m_a, z_a = dec.forward_features(f, centers_a)
    m_b, z_b = dec.forward_features(f, centers_b)
    assert m_a.shape == (2, MASK_DIM, 16, 24)
    # the text centres change every level of the output
    assert not torch.allclose(m_a, m_b, atol=1e-4)
    for za, zb in zip(z_a, z_b):
        assert not torch.allclose(za, zb, atol=1e-4)

    # off: text centres are ignored; same weights as the "on" decoder minus the text layers -> the text
    # attention really changes the output
    dec_off = _decoder(text_cross_attention=False)
    dec_off.load_state_dict(dec.state_dict(), strict=False)
    m_off, _ = dec_off.forward_features(f, centers_a)
    m_off_none, _ = dec_off.forward_features(f)
    torch.testing.assert_close(m_off, m_off_none)
    assert not torch.allclose(m_off, m_a, atol=1e-4)

    # gradients reach the text centres
    centers = centers_a.clone().requires_grad_(True)
    dec.forward_features(f, centers)[0].square().mean().backward()
    assert centers.grad is not None and torch.count_nonzero(centers.grad) > 0


def test_text_cross_attention_per_level_centers():
    f = _features(64, 64, B=1)
    dec = _decoder(text_cross_attention=True).eval()
    shared = torch.randn(1, 4, CONV_DIM)
    # identical centres on all 3 levels == shared centres
    m_shared, _ = dec.forward_features(f, shared)
    m_levels, _ = dec.forward_features(f, shared[:, None].expand(1, 3, 4, CONV_DIM))
    torch.testing.assert_close(m_shared, m_levels, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="per-level"):
        dec.forward_features(f, shared[:, None].expand(1, 2, 4, CONV_DIM))

    # With a single encoder layer nothing mixes the levels after the text attention (only the per-token
    # FFN follows), so changing the centres of level l changes z^l and no other level.
    dec1 = _decoder(text_cross_attention=True, transformer_enc_layers=1).eval()
    base = shared[:, None].repeat(1, 3, 1, 1)
    _, z_base = dec1.forward_features(f, base)
    for lvl in range(3):
        changed = base.clone()
        changed[:, lvl] = torch.randn(1, 4, CONV_DIM)
        _, z = dec1.forward_features(f, changed)
        for other in range(3):
            if other == lvl:
                assert not torch.allclose(z[other], z_base[other], atol=1e-4), (lvl, other)
            else:
                torch.testing.assert_close(z[other], z_base[other])


def test_text_layer_requires_centers():
    dec = _decoder(text_cross_attention=True, transformer_enc_layers=1)
    layer = dec.transformer.layers[0]
    src = torch.randn(1, 5, CONV_DIM)
    ref = torch.rand(1, 5, 3, 2)
    shapes = torch.tensor([[1, 1], [1, 2], [1, 2]])
    with pytest.raises(ValueError, match="text_centers"):
        layer(src, torch.zeros_like(src), ref, shapes, torch.tensor([0, 1, 3]))


def test_autocast_bf16():
    dec = _decoder(text_cross_attention=True).eval()
    f = _features(96, 160, B=1)
    centers = torch.randn(1, 5, CONV_DIM)
    with torch.no_grad():
        ref, ref_z = dec.forward_features(f, centers)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, zs = dec.forward_features(f, centers)
    assert out.shape == ref.shape and [z.shape for z in zs] == [z.shape for z in ref_z]
    assert torch.isfinite(out.float()).all() and all(torch.isfinite(z.float()).all() for z in zs)
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.99


def test_autocast_bf16_backward():
    dec = _decoder()
    f = _features(64, 64, B=1, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask_features, zs = dec.forward_features(f)
        loss = mask_features.float().square().mean()
    loss.backward()
    assert all(torch.isfinite(x.grad).all() for x in f.values())
    assert isinstance(dec.transformer.layers[0].self_attn, MSDeformAttn)
