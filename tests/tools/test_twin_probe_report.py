"""tools/twin_probe_report.py: the tokens it probes are the tower's own, the patches are the pure ones with
their pixels, the probes tell apart what differs and not what does not, and a smoke run of the tool."""
from __future__ import annotations

import json

import pytest
import tiny_clip_pretraining as tiny  # tools/tiny_clip_pretraining/ (tests/conftest.py puts tools/ on sys.path)
import torch


@pytest.fixture(scope="module")
def report_tool(load_tool):
    return load_tool("twin_probe_report")


def test_pure_patch_owners_by_hand():
    labels = torch.zeros(1, 16, 16, dtype=torch.uint8)
    labels[0, :8, :8] = 2  # patch 0: all kind 2
    labels[0, :8, 8:] = 5
    labels[0, :2, 8:] = 0  # patch 1: 48 / 64 = 75 % kind 5
    labels[0, 8:, :8] = 2
    labels[0, 8:11, :8] = 5  # patch 2: 40 / 64 = 62.5 % kind 2 -> not pure
    labels[0, 8:, 8:] = 3  # patch 3: pure, but not a requested kind
    owners = tiny.pure_patch_owners(labels, 8, (2, 5))
    assert owners.tolist() == [[2, 5, -1, -1]]


def test_tower_tokens_are_the_towers_own(report_tool, single_thread):
    model = report_tool.load_tower("random")
    images = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    stages = report_tool.tower_tokens(model, images)
    layers = len(model.clip.visual.transformer.resblocks)
    assert len(stages) == layers + 2
    assert all(s.shape[:2] == (2, 256) for s in stages)  # 16 x 16 patch tokens, class token dropped
    with torch.no_grad():
        _, dense, grid = model.encode_image(images)
        # the first stage is the patch embedding of the pixels (+ position, ln_pre): patch 0 from pixels 0-7
        patch0 = model.clip.visual.conv1(((images.float() - model.pixel_mean) / model.pixel_std)[:, :, :8, :8])
    assert grid == (16, 16)
    assert torch.allclose(stages[-1], dense, atol=1e-6)
    expected = model.clip.visual.ln_pre(patch0.flatten(1) + model.clip.visual.positional_embedding[1])
    assert torch.allclose(stages[0][:, 0], expected, atol=1e-5)


def test_tower_tokens_of_the_conv_stem_tower(report_tool, single_thread):
    """--model HVL-Tiny-ConvViT-P8: the timm tower's stages; the first is its stem's token for patch 0 plus
    its position, then norm_pre."""
    model = report_tool.load_tower("random", "HVL-Tiny-ConvViT-P8")
    trunk = model.clip.visual.trunk
    images = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    stages = report_tool.tower_tokens(model, images)
    assert len(stages) == len(trunk.blocks) + 2 and all(s.shape[:2] == (2, 256) for s in stages)
    with torch.no_grad():
        x = (images.float() - model.pixel_mean) / model.pixel_std
        patch0 = trunk.patch_embed.proj(x)[:, :, 0, 0]
        expected = trunk.norm_pre(patch0 + trunk.pos_embed[0, 1])
    assert torch.allclose(stages[0][:, 0], expected, atol=1e-5)


def test_pure_patch_data_holds_the_pixels_of_the_pure_patches(report_tool):
    kinds = (2, 5)
    pixels, owners, tokens = report_tool.pure_patch_data(report_tool.draw_split("probe", 6, batch_size=4), kinds)
    assert tokens == [] and pixels.shape == (owners.numel(), 3, 8, 8) and owners.numel() > 10
    images, labels, _, _ = tiny.draw_batch(range(6), "probe", 0, 128, tiny.ALL_KINDS)
    owner = tiny.pure_patch_owners(labels, 8, kinds)
    image, row = torch.nonzero(owner >= 0)[0].tolist()
    y, x = divmod(row, 16)
    assert torch.equal(pixels[0], images[image, :, 8 * y:8 * y + 8, 8 * x:8 * x + 8].float() / 255.0)
    assert owners[0] == owner[image, row]


def test_probes_separate_what_differs_and_not_noise(report_tool, single_thread):
    """Positive control: red circle vs blue square patches; negative control: random labels."""
    tiny = report_tool.tiny
    names = tiny.vocabulary()
    circle, square = names.index("circle"), names.index("square")
    fit_pixels, fit_owner, _ = report_tool.pure_patch_data(report_tool.draw_split("probe", 40), (circle, square))
    test_pixels, test_owner, _ = report_tool.pure_patch_data(report_tool.draw_split("clipval", 40), (circle, square))
    fit_y, test_y = fit_owner == square, test_owner == square
    assert report_tool.cnn_probe_accuracy(fit_pixels, fit_y, test_pixels, test_y, steps=100) >= 95.0
    assert report_tool.layer_probes([fit_pixels], fit_y, [test_pixels], test_y)[0] >= 95.0
    noise = torch.Generator().manual_seed(0)
    random_fit = torch.rand(fit_y.shape, generator=noise) < 0.5
    random_test = torch.rand(test_y.shape, generator=noise) < 0.5
    assert report_tool.cnn_probe_accuracy(fit_pixels, random_fit, test_pixels, random_test, steps=100) <= 65.0


def test_tool_smoke_run(report_tool, tmp_path, single_thread):
    out = tmp_path / "report.json"
    result = report_tool.main(["--checkpoints", "random", "--num-images", "30", "--cnn-steps", "20",
                               "--direct-steps", "4", "--json-out", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["pixels"]) == {"square/cross", "star/ellipse"}
    tower = result["towers"]["random"]
    assert tower["stages"][0] == "patch_embedding" and tower["stages"][-1] == "dense_embedding"
    assert all(len(v) == len(tower["stages"]) for v in tower["linear_probe"].values())
    assert [h["step"] for h in result["direct"]["history"]] == [1, 2, 3, 4]
    patches = result["patches"]["square/cross"]
    assert patches["test_patches"] > 0 and 50.0 <= patches["constant_guess"] <= 100.0


def test_conv_stem_replaces_the_patch_embedding(report_tool, single_thread):
    stem = report_tool.project_conv_stem(3, 64, report_tool.PATCH, report_tool.TINY_STEM_LAYERS)
    assert stem(torch.zeros(2, 3, 128, 128)).shape == (2, 64, 16, 16)  # the same grid as the 8 px patches
    seen = []
    history = report_tool.train_direct(2, lambda model: seen.append(model.clip.visual.conv1) or {}, stem="conv")
    assert [h["step"] for h in history] == [1, 2]
    assert isinstance(seen[0], torch.nn.Sequential) and len(seen[0]) == 5  # two 3 x 3 convolutions, then the patch one
    seen.clear()
    report_tool.train_direct(1, lambda model: seen.append(model.clip.visual.conv1) or {}, stem="strided")
    strides = [m.stride for m in seen[0] if isinstance(m, torch.nn.Conv2d)]
    assert strides == [(2, 2)] * 3 + [(1, 1)]  # the HVL-Tiny-ConvViT-P8 stem: three stride-2 3 x 3, then 1 x 1
    with pytest.raises(ValueError, match="stem must be"):
        report_tool.train_direct(1, lambda model: {}, stem="resnet")
