"""LSMSeg (thesis chapter 5): category filter top-k (eqs. 5.2-5.6), class-level linear-attention refinement
(eq. 5.8), visual feature fusion with a registered frozen encoder (eq. 5.1), the attribute-order prompt style."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

from conftest import REPO_ROOT
from hvlformer import add_hvlformer_config
from hvlformer.modeling.text.descriptions import ATTRIBUTE_ORDER, load_class_descriptions
from hvlformer.modeling.thesis import (
    AUXILIARY_ENCODER_REGISTRY,
    CategoryFilter,
    ClassLinearAttentionRefinement,
    TinyConvEncoder,
    VisualFeatureFusion,
    build_auxiliary_encoder,
    linear_attention,
    scatter_filtered_scores,
)


# ------------------------------------------------------------------------------------------ category filter
def test_category_filter_top_k_by_hand():
    text = torch.eye(5)                                    # class n = axis n of a 5-d joint space
    dense = torch.zeros(1, 5, 2, 2)
    # unit pixel vectors; best cosine per class: c0 0.2, c1 0.9, c2 0.5, c3 1.0, c4 max(0.98, 0.44, 0.87) = 0.98
    pixels = {(0, 0): [0.2, 0.0, 0.0, 0.0, math.sqrt(0.96)], (0, 1): [0.0, 0.9, 0.0, 0.0, math.sqrt(0.19)],
              (1, 0): [0.0, 0.0, 0.5, 0.0, math.sqrt(0.75)], (1, 1): [0.0, 0.0, 0.0, 1.0, 0.0]}
    for (i, j), vec in pixels.items():
        dense[0, :, i, j] = torch.tensor(vec) * 3.0        # the scale does not matter (cosine)
    out = CategoryFilter(top_k=3)(dense, text)
    assert out["indices"].tolist() == [[1, 3, 4]]          # c4 (its maximum 0.98 at pixel (0, 0)) beats c2
    assert out["scores"][0].tolist() == pytest.approx([0.2, 0.9, 0.5, 1.0, math.sqrt(0.96)], abs=1e-6)
    # eq. 5.6: the kept cost map is the full one at the kept classes; eq. 5.5: the gathered text is normalised
    full = CategoryFilter.cost_map(dense, text)
    assert torch.allclose(out["cost"], full[:, [1, 3, 4]])
    assert torch.allclose(out["text"].norm(dim=-1), torch.ones(1, 3))
    assert torch.equal(out["text"][0], text[[1, 3, 4]])


def test_category_filter_ranks_per_image_and_keeps_small_vocabularies():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(40, 8), dim=-1)
    dense = torch.randn(2, 8, 3, 3)
    dense[1] = text[7][:, None, None] * 5                  # image 1 is class 7 everywhere
    out = CategoryFilter(top_k=32)(dense, text)
    assert out["indices"].shape == (2, 32) and out["text"].shape == (2, 32, 8) and out["cost"].shape == (2, 32, 3, 3)
    expected = out["scores"].topk(32, dim=1).indices.sort(dim=1).values
    assert torch.equal(out["indices"], expected)
    assert 7 in out["indices"][1].tolist()
    assert (out["indices"][:, 1:] > out["indices"][:, :-1]).all()   # ascending class order
    small = CategoryFilter(top_k=32)(dense, text[:10])              # K <= k: nothing filtered
    assert small["indices"].tolist() == [list(range(10))] * 2


def test_category_filter_at_two_input_sizes():
    torch.manual_seed(0)
    text = torch.randn(50, 8)
    cfm = CategoryFilter(top_k=5)
    for h, w in ((4, 4), (6, 9)):
        dense = torch.randn(2, 8, h, w)
        out = cfm(dense, text)
        assert out["cost"].shape == (2, 5, h, w) and out["indices"].shape == (2, 5)
        # every kept class scores at least as high as every filtered one
        for b in range(2):
            kept = set(out["indices"][b].tolist())
            worst_kept = min(out["scores"][b, i] for i in kept)
            assert all(out["scores"][b, i] <= worst_kept for i in range(50) if i not in kept)


def test_scatter_filtered_scores_round_trip():
    scores = torch.rand(2, 3, 4, 4)
    indices = torch.tensor([[0, 2, 5], [1, 3, 4]])
    full = scatter_filtered_scores(scores, indices, 6)
    assert full.shape == (2, 6, 4, 4)
    assert torch.equal(full[0, [0, 2, 5]], scores[0]) and torch.equal(full[1, [1, 3, 4]], scores[1])
    assert full[0, [1, 3, 4]].abs().sum() == 0 and full[1, [0, 2, 5]].abs().sum() == 0


# ------------------------------------------------------------------------------------------ class refinement
def test_linear_attention_matches_the_explicit_sum():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 6)
    out = linear_attention(q, k, v)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    for b in range(2):
        for h in range(3):
            for i in range(5):
                weights = torch.stack([phi_q[b, i, h] @ phi_k[b, j, h] for j in range(5)])
                expected = (weights[:, None] * v[b, :, h]).sum(0) / weights.sum()
                assert torch.allclose(out[b, i, h], expected, atol=1e-5)


def test_refinement_identity_at_init_and_permutation_equivariant():
    torch.manual_seed(0)
    queries = torch.randn(2, 3, 7, 16)                     # B x E x K x D
    block = ClassLinearAttentionRefinement(dim=16)
    assert torch.equal(block(queries), queries)
    block = ClassLinearAttentionRefinement(dim=16, zero_init=False)
    out = block(queries)
    assert out.shape == queries.shape and not torch.allclose(out, queries)
    perm = torch.randperm(7)
    assert torch.allclose(block(queries[:, :, perm]), out[:, :, perm], atol=1e-5)
    # classes really interact: changing class 0 changes class 1's output
    changed = queries.clone()
    changed[:, :, 0] = torch.randn(2, 3, 16) * 3  # (a constant shift would be removed by the LayerNorm)
    assert not torch.allclose(block(changed)[:, :, 1], out[:, :, 1])


def test_refinement_loss_decreases_and_gradients_flow():
    torch.manual_seed(0)
    block = ClassLinearAttentionRefinement(dim=16, num_heads=2)
    queries, target = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    optimizer = torch.optim.Adam(block.parameters(), lr=1e-2)
    first = F.mse_loss(block(queries), target).item()
    for step in range(40):
        optimizer.zero_grad()
        F.mse_loss(block(queries), target).backward()
        if step == 1:  # after the first step the zero-initialised projections have moved: all get gradients
            for name, p in block.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        optimizer.step()
    assert F.mse_loss(block(queries), target).item() < 0.8 * first


# ------------------------------------------------------------------------------------------ feature fusion
def test_fusion_by_hand_with_identity_projection():
    encoder = build_auxiliary_encoder("TinyConvEncoder", width=4, depth=1)
    fusion = VisualFeatureFusion(in_channels={"res4": 4}, encoder=encoder)
    with torch.no_grad():
        fusion.projections["res4"].weight.copy_(torch.eye(4)[:, :, None, None])
        fusion.projections["res4"].bias.zero_()
    assert fusion.fusion_weight("res4").item() == pytest.approx(0.5)
    clip = torch.randn(1, 4, 3, 3)
    aux = torch.randn(1, 4, 6, 6)
    out = fusion(torch.zeros(1, 3, 12, 12), {"res4": clip, "res5": clip * 2}, auxiliary=aux)
    expected = 0.5 * clip + 0.5 * F.interpolate(aux, size=(3, 3), mode="bilinear", align_corners=False)
    assert torch.allclose(out["res4"], expected, atol=1e-6)
    assert torch.equal(out["res5"], clip * 2)              # not a fused level: passes through


def test_fusion_two_sizes_frozen_encoder_and_training():
    torch.manual_seed(0)
    encoder = build_auxiliary_encoder("TinyConvEncoder", width=8, depth=2)
    fusion = VisualFeatureFusion(in_channels={"res3": 6, "res4": 6}, encoder=encoder, init_weight=0.5)
    fusion.train()
    assert not encoder.training and all(not p.requires_grad for p in encoder.parameters())
    assert not any(k.startswith("_encoder") for k in fusion.state_dict())      # not in checkpoints
    assert {n for n, _ in fusion.named_parameters()} == {"projections.res3.weight", "projections.res3.bias",
                                                         "projections.res4.weight", "projections.res4.bias",
                                                         "weight_logits.res3", "weight_logits.res4"}
    for size in (32, 48):
        images = torch.randn(2, 3, size, size)
        feats = {"res3": torch.randn(2, 6, size // 8, size // 8), "res4": torch.randn(2, 6, size // 16, size // 16)}
        out = fusion(images, feats)
        assert out["res3"].shape == feats["res3"].shape and out["res4"].shape == feats["res4"].shape
    # the fusion weight and projections learn; the encoder does not move
    images = torch.randn(2, 3, 32, 32)
    feats = {"res3": torch.randn(2, 6, 4, 4), "res4": torch.randn(2, 6, 2, 2)}
    target = {k: torch.randn_like(v) for k, v in feats.items()}
    before = [p.clone() for p in encoder.parameters()]
    optimizer = torch.optim.Adam(fusion.parameters(), lr=5e-2)

    def loss():
        out = fusion(images, feats)
        return sum(F.mse_loss(out[k], target[k]) for k in feats)

    first = loss().item()
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.8 * first
    assert fusion.fusion_weight("res3").item() != pytest.approx(0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, encoder.parameters()))


def test_auxiliary_encoder_weights_from_path(tmp_path):
    torch.manual_seed(0)
    source = TinyConvEncoder(width=4, depth=1)
    path = tmp_path / "enc.pth"
    torch.save({"model": source.state_dict()}, path)
    loaded = build_auxiliary_encoder("TinyConvEncoder", str(path), width=4, depth=1)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(loaded(x), source(x))
    with pytest.raises(FileNotFoundError):
        build_auxiliary_encoder("TinyConvEncoder", str(tmp_path / "missing.pth"))
    with pytest.raises(KeyError):
        build_auxiliary_encoder("NoSuchEncoder")

    class NeedsWeights(torch.nn.Module):
        allows_random_weights = False

    AUXILIARY_ENCODER_REGISTRY.register(NeedsWeights)
    try:
        with pytest.raises(ValueError, match="weights path"):
            build_auxiliary_encoder("NeedsWeights")
    finally:
        AUXILIARY_ENCODER_REGISTRY._obj_map.pop("NeedsWeights")


# ------------------------------------------------------------------------------------------ config
def test_config_and_plain_arguments_agree():
    cfg = get_cfg()
    add_hvlformer_config(cfg)
    lsm = cfg.MODEL.HVLFORMER.LSMSEG
    assert not (lsm.CATEGORY_FILTER or lsm.CLASS_REFINEMENT or lsm.FUSION)
    assert cfg.MODEL.HVLFORMER.TEXT.PROMPT_STYLE == "descriptions" and lsm.CATEGORY_FILTER_TOP_K == 32
    assert CategoryFilter(cfg).top_k == 32 and CategoryFilter(top_k=32).top_k == 32
    cfg.MODEL.HVLFORMER.HIDDEN_DIM = 16
    a, b = ClassLinearAttentionRefinement(cfg), ClassLinearAttentionRefinement(dim=16, num_heads=4)
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]
    cfg.MODEL.HVLFORMER.LSMSEG.FUSION_LEVELS = ["res4"]
    fusion = VisualFeatureFusion(cfg, in_channels={"res3": 8, "res4": 16, "res5": 32})
    assert fusion.levels == ["res4"] and fusion.projections["res4"].out_channels == 16
    assert isinstance(fusion.encoder, TinyConvEncoder)
    cfg.MODEL.HVLFORMER.LSMSEG.FUSION_LEVELS = ["res9"]
    with pytest.raises(ValueError, match="res9"):
        VisualFeatureFusion(cfg, in_channels={"res4": 16})


# ------------------------------------------------------------------------------------------ prompt style
def test_attribute_prompt_style_order_and_errors(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"classes": {"cat": ["a cat."], "dog": ["a dog."]}, "attribute_descriptions": {
        "cat": {"colour": "C.", "texture": "T.", "shape": "S.", "size": "Z."},
        "dog": {"color": "c2.", "size": "z2.", "shape": "s2.", "texture": "t2."}}}))
    out = load_class_descriptions(str(path), ["cat", "dog"], style="attributes")
    assert ATTRIBUTE_ORDER == ("size", "shape", "texture", "colour")
    assert out.prompts == [["Z. S. T. C."], ["z2. s2. t2. c2."]]
    assert load_class_descriptions(str(path), ["cat"]).prompts == [["a cat."]]   # default style unchanged
    with pytest.raises(ValueError, match="prompt style"):
        load_class_descriptions(str(path), ["cat"], style="fancy")
    with pytest.raises(ValueError, match="needs a descriptions file"):
        load_class_descriptions(None, ["cat"], style="attributes")
    path.write_text(json.dumps({"classes": {"cat": ["a."]}, "attribute_descriptions": {"cat": {"size": "Z."}}}))
    with pytest.raises(ValueError, match="'shape'"):
        load_class_descriptions(str(path), ["cat"], style="attributes")
    # without the table inside: attributes/<file name> next to the descriptions file
    path.write_text(json.dumps({"classes": {"cat": ["a cat."]}}))
    with pytest.raises(ValueError, match="attribute_descriptions"):
        load_class_descriptions(str(path), ["cat"], style="attributes")
    (tmp_path / "attributes").mkdir()
    (tmp_path / "attributes" / "d.json").write_text(json.dumps({"classes": {
        "cat": {"size": "small.", "shape": "agile.", "texture": "fluffy.", "colour": "grey."}}}))
    assert load_class_descriptions(str(path), ["cat"], style="attributes").prompts == [["small. agile. fluffy. grey."]]


@pytest.mark.parametrize("dataset", ["shapes", "voc"])
def test_shipped_attribute_prompts_fit_the_text_context(dataset):
    import open_clip

    path = REPO_ROOT / f"datasets/descriptions/{dataset}.json"
    names = list(json.loads(path.read_text())["classes"])
    prompts = load_class_descriptions(str(path), names, style="attributes").prompts
    assert len(prompts) == len(names) and all(len(p) == 1 for p in prompts)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    # 77 tokens minus the 8 learnable context tokens of the text encoder: nothing is truncated
    lengths = [int((tokenizer([p[0]], context_length=200)[0] != 0).sum()) for p in prompts]
    assert max(lengths) <= 77 - 8
