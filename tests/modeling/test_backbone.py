"""CLIP vision backbone (hvlformer.modeling.backbone.clip_vit) and the open_clip loader."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never wait for a model hub

import copy
import logging

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import open_clip
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from hvlformer.config import add_hvlformer_config
from hvlformer.modeling import clip_loader
from hvlformer.modeling.backbone import CLIPViTBackbone, interpolate_pos_embed
from hvlformer.modeling.clip_loader import build_clip_model, register_project_model_configs

TINY = "HVL-Tiny-ViT"
TINY_EVA = "HVL-Tiny-EVA"
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    model, _ = build_clip_model(TINY)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_eva_model():
    torch.manual_seed(0)
    model, _ = build_clip_model(TINY_EVA)
    return model.eval()


def make_backbone(model, **kwargs):
    kwargs.setdefault("out_indices", [0, 1, 2, 3])
    return CLIPViTBackbone(visual=copy.deepcopy(model.visual), **kwargs)


def check_shapes(bb, out, B, H, W):
    shapes = bb.output_shape()
    assert set(shapes) == set(STRIDES)
    for name, stride in STRIDES.items():
        assert shapes[name].stride == stride
        assert out[name].shape == (B, shapes[name].channels, H // stride, W // stride), name
    assert out["clip_global"].shape == (B, bb.embed_dim)
    assert out["clip_dense"].shape == (B, bb.embed_dim, H // 16, W // 16)


# ------------------------------------------------------------------------------------------ loader
def test_tiny_config_registered_and_fast():
    register_project_model_configs()
    register_project_model_configs()  # idempotent
    assert TINY in open_clip.list_models() and TINY_EVA in open_clip.list_models()
    cfg = open_clip.get_model_config(TINY)
    assert cfg["embed_dim"] == 64 and cfg["vision_cfg"]["width"] == 64 and cfg["text_cfg"]["layers"] == 2


def test_random_init_logs_one_warning(caplog):
    with caplog.at_level(logging.INFO):
        model, tokenizer = build_clip_model(TINY)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].name.startswith("hvlformer") and "RANDOMLY INITIALISED" in warnings[0].getMessage()
    assert tokenizer(["a cat"]).shape == (1, 77)


def test_local_checkpoint_path_is_loaded(tiny_clip, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_clip.state_dict(), path)
    loaded, _ = build_clip_model(TINY, str(path))
    for (name, a), b in zip(tiny_clip.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_pretrained_values_fail_fast(monkeypatch):
    with pytest.raises(ValueError, match="No-Such-Arch"):
        build_clip_model("No-Such-Arch")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        build_clip_model(TINY, "no_such_dir/weights.pt")
    with pytest.raises(ValueError, match="not_a_tag"):
        build_clip_model("ViT-B-16", "not_a_tag")

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights")

    monkeypatch.setattr(clip_loader.open_clip, "create_model", offline)
    with pytest.raises(RuntimeError, match="local file path") as info:
        build_clip_model("ViT-B-16-quickgelu", "openai")
    assert isinstance(info.value.__cause__, RuntimeError)


# ------------------------------------------------------------------------------------------ ViT backbone
@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_shapes_and_strides(tiny_clip, size):
    bb = make_backbone(tiny_clip).eval()
    H, W = size
    with torch.no_grad():
        out = bb(torch.randn(2, 3, H, W))
    check_shapes(bb, out, 2, H, W)
    assert (bb.width, bb.embed_dim, bb.patch_size) == (64, 64, 16)


def test_native_size_matches_open_clip(tiny_clip):
    bb = make_backbone(tiny_clip, out_indices=[0, 1, 2, -1]).eval()
    visual = copy.deepcopy(tiny_clip.visual)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        out = bb(x)
        torch.testing.assert_close(out["clip_global"], visual(x), atol=1e-5, rtol=0)
        visual.output_tokens = True
        _, tokens = visual(x)  # ln_post(patch tokens of the last block)
        dense = (tokens @ visual.proj).transpose(1, 2).reshape(2, -1, 8, 8)
        torch.testing.assert_close(out["clip_dense"], dense, atol=1e-5, rtol=0)
        # res4 is the identity of block out_indices[2] = 2 (0-based)
        block2 = visual.forward_intermediates(x, indices=[2], intermediates_only=True)["image_intermediates"][0]
        torch.testing.assert_close(out["res4"], block2, atol=1e-5, rtol=0)
        # res5 = MaxPool2 of the last block's patch tokens
        last = visual.forward_intermediates(x, indices=[3], intermediates_only=True)["image_intermediates"][0]
        torch.testing.assert_close(out["res5"], F.max_pool2d(last, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_8px_patches_run_natively(size):
    """HVL-Tiny-ViT-P8: tokens every 8 px on the input as it is (no resize), the pyramid keeps the strides
    and channels, clip_dense is at stride 8 and equals open_clip's own tokens at the native size."""
    torch.manual_seed(0)
    model, _ = build_clip_model("HVL-Tiny-ViT-P8")
    bb = make_backbone(model.eval(), out_indices=[0, 1, 2, -1]).eval()
    assert (bb.patch_size, bb.token_stride) == (8, 8)
    H, W = size
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        out = bb(x)
    shapes = bb.output_shape()
    for name, stride in STRIDES.items():
        assert shapes[name].stride == stride
        assert out[name].shape == (2, shapes[name].channels, H // stride, W // stride), name
    assert out["clip_dense"].shape == (2, 64, H // 8, W // 8)
    visual = copy.deepcopy(model.visual).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        out = bb(x)
        torch.testing.assert_close(out["clip_global"], visual(x), atol=1e-5, rtol=0)
        # res3 = Conv1x1 of block 1's tokens, res4 / res5 = max pools of blocks 2 / 3 (stride 8 -> 16 / 32)
        blocks = visual.forward_intermediates(x, indices=[1, 2, 3], intermediates_only=True)["image_intermediates"]
        torch.testing.assert_close(out["res3"], bb.pyramid["res3"](blocks[0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["res4"], F.max_pool2d(blocks[1], 2), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["res5"], F.max_pool2d(blocks[2], 4), atol=1e-5, rtol=0)


def test_position_interpolation():
    torch.manual_seed(0)
    pos = torch.randn(1 + 8 * 8, 16)
    assert torch.equal(interpolate_pos_embed(pos, 1, (8, 8), (8, 8)), pos)  # identity at the native grid
    # orientation (row-major, H then W) on a non-square target: channel 0 = row, channel 1 = column
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    ramp = torch.cat([torch.full((1, 16), 7.0), torch.stack([rows, cols], -1).reshape(64, 2).repeat(1, 8)])
    out = interpolate_pos_embed(ramp, 1, (8, 8), (4, 12))
    assert out.shape == (1 + 4 * 12, 16)
    assert torch.equal(out[0], ramp[0])  # the class position is kept
    grid = out[1:].reshape(4, 12, 16)
    assert torch.allclose(grid[:, :, 0], grid[:, :1, 0]) and (grid[1:, 0, 0] > grid[:-1, 0, 0]).all()
    assert torch.allclose(grid[:, :, 1], grid[:1, :, 1]) and (grid[0, 1:, 1] > grid[0, :-1, 1]).all()
    # bicubic interpolation keeps a constant field constant
    const = torch.cat([torch.zeros(1, 4), torch.full((64, 4), 3.0)])
    torch.testing.assert_close(interpolate_pos_embed(const, 1, (8, 8), (5, 13))[1:], torch.full((65, 4), 3.0))


def test_sizes_do_not_leak_between_calls(tiny_clip):
    bb = make_backbone(tiny_clip).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        first = bb(x)["clip_global"]
        bb(torch.randn(1, 3, 96, 160))
        torch.testing.assert_close(bb(x)["clip_global"], first, atol=0, rtol=0)
    with pytest.raises(ValueError, match="divisible"):
        bb(torch.randn(1, 3, 100, 128))


def test_gradient_checkpointing_same_outputs_and_grads(tiny_clip, monkeypatch):
    torch.manual_seed(0)
    plain = make_backbone(tiny_clip, frozen_reference=False).train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing = True
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    x = torch.randn(2, 3, 96, 128)
    outs = []
    for bb in (plain, ckpt):
        out = bb(x)
        loss = sum((v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum() for v in out.values())
        loss.backward()
        outs.append(out)
    assert calls == [False] * 4  # one non-reentrant checkpoint per block, only for the checkpointed copy
    for name in outs[0]:
        torch.testing.assert_close(outs[0][name], outs[1][name], atol=1e-6, rtol=0)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_frozen_reference(tiny_clip):
    bb = make_backbone(tiny_clip).train()
    ref = bb.reference_tower
    ref_ids = {id(p) for p in ref.parameters()}
    assert not ref_ids & {id(p) for p in bb.parameters()}
    n_visual = len(bb.visual.state_dict())
    assert not any(k.startswith("_reference") for k in bb.state_dict())
    assert len(bb.state_dict()) == n_visual + len(bb.pyramid.state_dict())
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())

    x = torch.randn(2, 3, 128, 128)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    f0, d0 = bb.reference_global_embedding(x), bb.reference_dense_embedding(x)
    assert not f0.requires_grad and not d0.requires_grad and d0.shape == (2, 64, 8, 8)
    bb.eval()
    with torch.no_grad():  # initially identical to the trained tower
        out = bb(x)
        torch.testing.assert_close(out["clip_global"], f0, atol=1e-6, rtol=0)
        torch.testing.assert_close(out["clip_dense"], d0, atol=1e-6, rtol=0)
    bb.train()
    opt = torch.optim.SGD(bb.parameters(), lr=1.0)
    out = bb(x)
    (out["clip_global"].square().sum() + out["res2"].sum()).backward()
    opt.step()
    assert not torch.equal(bb.visual.proj, ref.proj)  # the trained tower moved ...
    for k, v in ref.state_dict().items():  # ... the reference did not
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(bb.reference_global_embedding(x), f0, atol=0, rtol=0)
    torch.testing.assert_close(bb.reference_dense_embedding(x), d0, atol=0, rtol=0)
    assert not ref.training  # .train() on the backbone does not reach the reference

    bb.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in bb.reference_tower.parameters())
    assert bb.reference_global_embedding(x.double()).dtype == torch.float64

    no_ref = make_backbone(tiny_clip, frozen_reference=False)
    assert no_ref.reference_tower is None
    for method in (no_ref.reference_global_embedding, no_ref.reference_dense_embedding):
        with pytest.raises(RuntimeError, match="frozen_reference=False"):
            method(x)


def test_frozen_reference_survives_copies_moves_and_loading(tiny_clip):
    """E_I^0 is a frozen submodule: deepcopy keeps it, .to(dtype) / to_empty move it, state_dict, parameters()
    and the optimizer leave it out, strict loading of a checkpoint without it works and keeps its weights,
    and drop_reference removes it."""
    from hvlformer.engine.optimizer import get_parameter_groups

    bb = make_backbone(tiny_clip)
    ref_state = {k: v.clone() for k, v in bb.reference_tower.state_dict().items()}
    ref_ids = {id(p) for p in bb.reference_tower.parameters()}
    # not in the checkpoint, the parameters or the optimizer's groups
    assert set(bb.state_dict()) == {f"visual.{k}" for k in bb.visual.state_dict()} | {
        f"pyramid.{k}" for k in bb.pyramid.state_dict()}
    assert not ref_ids & {id(p) for p in bb.parameters()}
    groups = get_parameter_groups(bb, 1e-4, 0.01, 0.0, 0.0, 0.1)
    assert not ref_ids & {id(p) for g in groups for p in g["params"]}
    assert len(groups) == sum(1 for p in bb.parameters() if p.requires_grad)
    # requires_grad_ on the whole backbone does not unfreeze it
    bb.requires_grad_(True)
    assert not any(p.requires_grad for p in bb.reference_tower.parameters())

    # deepcopy keeps it (an independent copy with the same weights)
    twin = copy.deepcopy(bb)
    assert twin.reference_tower is not None and twin.reference_tower is not bb.reference_tower
    for k, v in twin.reference_tower.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(twin.reference_global_embedding(x), bb.reference_global_embedding(x), atol=0, rtol=0)

    # strict loading of a state dict (which never holds E_I^0) keeps E_I^0's own weights
    other = make_backbone(tiny_clip)
    with torch.no_grad():
        for p in other.visual.parameters():
            p.add_(1.0)
    incompatible = twin.load_state_dict(other.state_dict(), strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert torch.equal(twin.visual.proj, other.visual.proj)
    for k, v in twin.reference_tower.state_dict().items():
        assert torch.equal(v, ref_state[k]), k

    # .to(dtype) moves it with the backbone; to_empty keeps it (on the new device, same shapes)
    twin.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in twin.reference_tower.parameters())
    empty = copy.deepcopy(bb).to_empty(device="cpu")
    assert [p.shape for p in empty.reference_tower.parameters()] == [p.shape for p in bb.reference_tower.parameters()]

    # the public way to drop it (the EMA teacher)
    twin.drop_reference()
    assert twin.reference_tower is None
    with pytest.raises(RuntimeError, match="frozen_reference=False"):
        twin.reference_global_embedding(x.double())


def test_build_from_cfg():
    cfg = get_cfg()
    add_hvlformer_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "CLIPViTBackbone"
    cfg.MODEL.HVLFORMER.CLIP.MODEL_NAME = TINY
    cfg.MODEL.HVLFORMER.CLIP.OUT_INDICES = [0, 1, 2, 3]
    bb = build_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(bb, CLIPViTBackbone)
    assert bb.out_indices == [0, 1, 2, 3] and isinstance(bb.pyramid["res2"][1], nn.GroupNorm)
    assert bb.reference_tower is None  # no pretrained weights: no E_I^0 to anchor to
    with torch.no_grad():
        check_shapes(bb, bb.eval()(torch.randn(1, 3, 64, 96)), 1, 64, 96)

    cfg.MODEL.HVLFORMER.CLIP.OUT_INDICES = [3, 5, 7, 11]  # ViT-B indices do not fit a 4-block tower
    with pytest.raises(ValueError, match="out of range"):
        build_backbone(cfg)


def test_out_indices_and_syncbn_fallback(tiny_clip):
    assert not torch.distributed.is_initialized()
    bb = make_backbone(tiny_clip, out_indices=[-4, -3, -2, -1], pyramid_norm="SyncBN")
    assert bb.out_indices == [0, 1, 2, 3]
    norm = bb.pyramid["res2"][1]
    assert isinstance(norm, nn.BatchNorm2d) and not isinstance(norm, nn.SyncBatchNorm)
    out = bb.train()(torch.randn(2, 3, 64, 64))
    assert out["res2"].shape == (2, 16, 16, 16)
    assert make_backbone(tiny_clip, out_indices=[-1]).out_indices == [3] * 4
    with pytest.raises(ValueError, match="4 block indices"):
        make_backbone(tiny_clip, out_indices=[0, 1])


def test_unsupported_tower_is_rejected():
    with pytest.raises(TypeError, match="unsupported vision tower"):
        CLIPViTBackbone(visual=nn.Linear(3, 3))


# ------------------------------------------------------------------------------------------ EVA02 (timm)
def test_eva_tower(tiny_eva_model):
    bb = make_backbone(tiny_eva_model, out_indices=[2, 5, 8, 11]).eval()
    assert (bb.width, bb.embed_dim, bb.patch_size) == (192, 64, 14)
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 128, 96))
    check_shapes(bb, out, 1, 128, 96)

    # patch 14: the input is resized so the token grid is H/16 x W/16; 256 -> 224 = the native grid
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        expected = tiny_eva_model.visual(F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False))
        torch.testing.assert_close(bb(x)["clip_global"], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(bb.reference_global_embedding(x), expected, atol=1e-5, rtol=0)


def test_eva_non_native_grid_matches_timm_dynamic_size(tiny_eva_model):
    """At a non-native grid the rotary and absolute positions must match timm's own dynamic-size Eva."""
    import timm

    bb = make_backbone(tiny_eva_model).eval()
    trunk = bb.visual.trunk
    with torch.no_grad():  # a constant absolute grid: bicubic (ours) and timm's antialiased resampling agree
        trunk.pos_embed[:, 1:] = trunk.pos_embed[:, 1:].mean(dim=1, keepdim=True)
    dyn = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=64, global_pool="token",
                            dynamic_img_size=True).eval()
    dyn.load_state_dict(trunk.state_dict())
    x = torch.randn(1, 3, 320, 384)
    xr = F.interpolate(x, size=(280, 336), mode="bilinear", align_corners=False)  # grid 20 x 24
    with torch.no_grad():
        torch.testing.assert_close(bb._adapter._rope(trunk, (20, 24)), dyn.rope.get_embed(shape=[20, 24]))
        expected = dyn.forward_head(dyn.forward_features(xr))
        torch.testing.assert_close(bb(x)["clip_global"], expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ conv-stem ViT (timm)
def test_strided_conv_stem_layers_and_grid():
    """HVL-Tiny-ConvViT-P8's stem: 3 stride-2 3 x 3 convolutions (16, 32, 64 channels, ReLU), then a 1 x 1 one;
    the 8 px token grid; powers of two only."""
    from hvlformer.modeling.backbone.conv_stem_vit import strided_conv_stem

    stem = strided_conv_stem(3, 64, 8)
    convs = [m for m in stem if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 16, (3, 3), (2, 2)), (16, 32, (3, 3), (2, 2)), (32, 64, (3, 3), (2, 2)), (64, 64, (1, 1), (1, 1))]
    assert sum(isinstance(m, nn.ReLU) for m in stem) == 3
    assert stem(torch.randn(1, 3, 96, 160)).shape == (1, 64, 12, 20)
    assert len([m for m in strided_conv_stem(3, 64, 16) if isinstance(m, nn.Conv2d)]) == 5
    with pytest.raises(ValueError, match="power-of-two"):
        strided_conv_stem(3, 64, 14)


def test_conv_stem_spec_and_layers():
    """conv_stem: one 3 x 3 convolution per (channels, stride), ReLU after each, then the patch projection
    whose kernel = stride = patch / prod(strides); parse_stem reads 'channels[/stride],...'."""
    from hvlformer.modeling.backbone.conv_stem_vit import TINY_STEM_LAYERS, conv_stem, parse_stem

    assert parse_stem("16, 32/2") == [(16, 1), (32, 2)]
    for bad in ("", "16,x", "16/0"):
        with pytest.raises(ValueError, match="bad stem spec"):
            parse_stem(bad)
    stem = conv_stem(3, 64, 8, [(16, 1), (32, 2)], bias=False)
    convs = [m for m in stem if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (3, 16, (3, 3), (1, 1), (1, 1)), (16, 32, (3, 3), (2, 2), (1, 1)), (32, 64, (4, 4), (4, 4), (0, 0))]
    assert convs[-1].bias is None and sum(isinstance(m, nn.ReLU) for m in stem) == 2
    assert stem(torch.randn(1, 3, 96, 160)).shape == (1, 64, 12, 20)
    with pytest.raises(ValueError, match="must divide the patch size"):
        conv_stem(3, 64, 8, [(16, 3)])
    # the tiny tower's stem is the one the constant names, in front of an 8 x 8 projection
    model, _ = build_clip_model("HVL-Tiny-ConvViT-P8")
    tower_convs = [m for m in model.visual.trunk.patch_embed.proj if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.stride[0]) for c in tower_convs[:-1]] == list(TINY_STEM_LAYERS)
    assert tower_convs[-1].kernel_size == (8 // np.prod([st for _, st in TINY_STEM_LAYERS]),) * 2


def test_conv_stem_tower_loads_through_open_clip_and_matches_timm(tmp_path):
    """The conv-stem tower is a plain open_clip architecture (timm tower): a checkpoint round-trips through
    build_clip_model's PRETRAINED path, and the backbone's clip_global / clip_dense / pyramid equal timm's own
    forward of the same trunk (a wrong stem, position or head in the adapter would differ)."""
    from open_clip.timm_model import TimmModel

    from hvlformer.modeling.backbone.conv_stem_vit import ConvStemPatchEmbed

    torch.manual_seed(0)
    model, _ = build_clip_model("HVL-Tiny-ConvViT-P8")
    visual = model.visual.eval()
    assert isinstance(visual, TimmModel) and isinstance(visual.trunk.patch_embed, ConvStemPatchEmbed)
    path = tmp_path / "conv.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)
    loaded, _ = build_clip_model("HVL-Tiny-ConvViT-P8", str(path))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)

    bb = make_backbone(model, out_indices=[0, 1, 2, -1]).eval()
    assert (bb.width, bb.embed_dim, bb.patch_size, bb.token_stride) == (64, 64, 8, 8)
    trunk = visual.trunk
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        out = bb(x)
        check = trunk.forward_features(x)  # B x (1 + 256) x 64, after the final norm
        torch.testing.assert_close(out["clip_global"], visual(x), atol=1e-5, rtol=0)
        dense = trunk.head(check[:, 1:]).transpose(1, 2).reshape(2, 64, 16, 16)
        torch.testing.assert_close(out["clip_dense"], dense, atol=1e-5, rtol=0)
        blocks = trunk.forward_intermediates(x, indices=[2, 3], intermediates_only=True, norm=False)
        torch.testing.assert_close(out["res4"], F.max_pool2d(blocks[0], 2), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["res5"], F.max_pool2d(blocks[1], 4), atol=1e-5, rtol=0)
        # another input size runs natively (8 px tokens, interpolated positions)
        other = bb(torch.randn(1, 3, 96, 160))
    assert other["clip_dense"].shape == (1, 64, 12, 20)
