"""HQG / L_div / SRE modes and PTRM (paper Sec. 3.1 and Sec. 3.2)."""
import math

import pytest
import torch
import torch.nn.functional as F

from hvlformer.modeling.htqg import HTQG, HierarchicalQueryGenerator, diversity_loss
from hvlformer.modeling.ptrm import PTRM, PTRMLevel


def test_hqg_shapes_and_independent_heads():
    torch.manual_seed(0)
    hqg = HierarchicalQueryGenerator(text_dim=12, hidden_dim=8, num_levels=3)
    t = torch.randn(5, 12)
    q = hqg(t)
    assert q.shape == (3, 5, 8)
    # level e is exactly MLP_e(t)
    for e in range(3):
        torch.testing.assert_close(q[e], hqg.heads[e](t))
        torch.testing.assert_close(q[e], F.layer_norm(hqg.heads[e][:3](t), (8,), hqg.heads[e][3].weight,
                                                      hqg.heads[e][3].bias))
    assert not torch.allclose(q[0], q[1])
    # with the output LayerNorm (default): every query has per-element zero mean and unit variance
    # (norm sqrt(D)), whatever the scale of t; without it the plain MLP_e(t)
    torch.testing.assert_close(q.mean(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    # (up to the LayerNorm's eps, which the small pre-norm output of zero-initialised biases feels at D = 8)
    torch.testing.assert_close(q.norm(dim=-1), torch.full((3, 5), math.sqrt(8)), atol=3e-2, rtol=0)
    plain = HierarchicalQueryGenerator(text_dim=12, hidden_dim=8, num_levels=3, output_norm=False)
    assert all(len(head) == 3 for head in plain.heads)
    plain.load_state_dict({k: v for k, v in hqg.state_dict().items() if not k.endswith(("3.weight", "3.bias"))})
    torch.testing.assert_close(torch.nn.functional.layer_norm(plain(t), (8,)), q)


def test_textual_queries_on_the_positional_scale():
    """The decoder adds a N(0, 1) level embedding (norm ~sqrt(D)) to each query: with the LayerNorm the
    textual queries are as long as that (a class's direction survives in q + pos); without it they are
    ~10x shorter and q + pos is nearly the same for every class (the defect the LayerNorm mends)."""
    torch.manual_seed(0)
    dim, t = 64, F.normalize(torch.randn(6, 32), dim=-1)  # unit-norm class embeddings, as the text encoder's
    pos = torch.randn(dim)
    # at init the MLP's shared biases already make the classes' queries alike (cosine ~0.85 here); the
    # positional embedding on top makes them the same vector without the LayerNorm
    for output_norm, low, high in ((True, 7.9, 8.1), (False, 0.0, 1.0)):
        q = HierarchicalQueryGenerator(32, dim, 1, output_norm=output_norm)(t)[0]
        assert low < q.norm(dim=-1).mean().item() < high, (output_norm, q.norm(dim=-1))
        attended = F.normalize(q + pos, dim=-1)
        off = (attended @ attended.T)[~torch.eye(6, dtype=torch.bool)].mean().item()
        assert (off < 0.95) if output_norm else (off > 0.99), (output_norm, off)


def test_zero_bias_keeps_the_text_geometry_at_init():
    """QUERY_ZERO_BIAS: the same weights (the RNG stream is untouched), zero biases; the classes' queries then
    start as far apart as their text embeddings allow, where the default biases make them nearly one vector."""
    dim, t = 64, F.normalize(torch.randn(6, 32, generator=torch.Generator().manual_seed(1)), dim=-1)

    def off_diagonal_cosine(q):
        q = F.normalize(q, dim=-1)
        return (q @ q.T)[~torch.eye(6, dtype=torch.bool)].mean().item()

    torch.manual_seed(0)
    default = HierarchicalQueryGenerator(32, dim, 2, zero_bias=False)
    torch.manual_seed(0)
    zeroed = HierarchicalQueryGenerator(32, dim, 2)  # zero biases are the default
    for head_default, head_zeroed in zip(default.heads, zeroed.heads):
        for layer in (0, 2):
            torch.testing.assert_close(head_zeroed[layer].weight, head_default[layer].weight)
            assert head_zeroed[layer].bias.abs().max() == 0 and head_default[layer].bias.abs().max() > 0
    text_cosine = off_diagonal_cosine(t)
    for e in range(2):
        assert off_diagonal_cosine(default(t)[e]) > 0.75  # the shared biases dominate
        assert off_diagonal_cosine(zeroed(t)[e]) < text_cosine + 0.45 < 0.75
    # with zero biases, ReLU MLP_e is positively homogeneous: a longer t gives the same direction (up to the
    # LayerNorm's eps); with the default biases it does not
    assert F.cosine_similarity(zeroed(3.0 * t), zeroed(t), dim=-1).min() > 0.999
    assert F.cosine_similarity(default(3.0 * t), default(t), dim=-1).min() < 0.99


def test_diversity_loss_orthogonal_identical_and_value():
    eye = torch.eye(4)
    orthogonal = torch.stack([eye[:2], eye[2:]])  # E=2, K=2, D=4: levels orthogonal per class
    assert diversity_loss(orthogonal).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.randn(1, 3, 6).repeat(3, 1, 1)   # identical levels
    assert diversity_loss(same).item() == pytest.approx(1.0, abs=1e-6)
    # hand case: two levels at 60 degrees -> cos^2 = 1/4
    a = torch.tensor([[[1.0, 0.0]]])
    b = torch.tensor([[[0.5, math.sqrt(3) / 2]]])
    assert diversity_loss(torch.cat([a, b])).item() == pytest.approx(0.25, abs=1e-6)
    assert diversity_loss(torch.randn(1, 3, 4)).item() == 0.0  # E = 1: no pair


def _features(batch=2):
    return [torch.randn(batch, 6, 8, 8), torch.randn(batch, 7, 4, 4), torch.randn(batch, 8, 2, 2)]


@pytest.mark.parametrize("mode", ["soft", "threshold", "none"])
def test_sre_modes(mode):
    torch.manual_seed(0)
    htqg = HTQG(text_dim=10, hidden_dim=16, num_levels=2, feature_channels=[6, 7, 8], sre_mode=mode)
    t = F.normalize(torch.randn(4, 10), dim=-1)
    weighted, q_hat, extras = htqg(t, _features())
    assert weighted.shape == (2, 2, 4, 16) and q_hat.shape == (2, 4, 16)
    relevance = extras["relevance"]
    assert relevance.shape == (2, 4)
    torch.testing.assert_close(weighted, q_hat[None] * relevance[:, None, :, None])
    if mode == "soft":
        torch.testing.assert_close(relevance, extras["sre_logits"].sigmoid())
    elif mode == "threshold":
        assert set(relevance.unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(relevance, (extras["sre_logits"].sigmoid() > 0.5).float())
    else:
        assert "sre_logits" not in extras and torch.all(relevance == 1)


def test_sre_clip_zero_shot_uses_gt_presence_or_clip_similarity():
    htqg = HTQG(text_dim=3, hidden_dim=4, num_levels=1, feature_channels=[6, 7, 8], sre_mode="clip_zero_shot")
    t = torch.eye(3)
    presence = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    _, _, extras = htqg(t, _features(), presence=presence)
    torch.testing.assert_close(extras["relevance"], presence)
    global_embedding = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    _, _, extras = htqg(t, _features(), global_embedding=global_embedding)
    # cos = 1 for the matching class, 0 otherwise: only the matching class is within the margin
    torch.testing.assert_close(extras["relevance"], torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))


def test_unknown_sre_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="SRE.MODE"):
        HTQG(4, 4, 1, [1, 1, 1], sre_mode="hard")


def test_ptrm_level_matches_equations():
    torch.manual_seed(0)
    level = PTRMLevel(dim=8, kernel_size=3, hidden_channels=4)
    queries, pixels = torch.randn(2, 5, 8), torch.randn(2, 8, 6, 7)
    update, refined, affinity = level(queries, pixels)
    assert update.shape == (2, 5, 8) and refined.shape == pixels.shape and affinity.shape == (2, 5, 6, 7)
    torch.testing.assert_close(affinity.sum(dim=1), torch.ones(2, 6, 7))  # softmax over the K classes
    # recompute steps 1-5 independently
    v = level.visual_proj(pixels)
    logits = torch.einsum("bkd,bdhw->bkhw", level.query_proj(queries), v) / math.sqrt(8)
    a = logits.softmax(1)
    t = torch.einsum("bkhw,bkd->bdhw", a, level.text_proj(queries))
    x = torch.stack([t.mean(1), v.mean(1), (t + v).mean(1)], 1)
    w = level.gate(x)
    t2 = t * w[:, 1:2] * w[:, 2:3]
    v2 = v * w[:, 0:1] * w[:, 2:3]
    pooled = (a.flatten(2) @ t2.flatten(2).transpose(1, 2)) / a.flatten(2).sum(-1, keepdim=True)
    torch.testing.assert_close(update, level.query_out(pooled))
    torch.testing.assert_close(refined, pixels + level.pixel_out(v2))


@pytest.mark.parametrize("num_levels", [1, 2, 3])
def test_ptrm_modes_and_extra_levels(num_levels):
    torch.manual_seed(0)
    queries = torch.randn(2, num_levels, 4, 16)
    pixels = [torch.randn(2, 16, s, s) for s in (2, 4, 8)]
    ptrm = PTRM(16, num_levels, mode="ptrm", kernel_size=3, hidden_channels=4, num_heads=2)
    refined_q, refined_z, affinities = ptrm(queries, pixels)
    assert refined_q.shape == queries.shape
    assert [z.shape for z in refined_z] == [z.shape for z in pixels]
    assert len(affinities) == 3
    for z_in, z_out in zip(pixels, refined_z):
        assert not torch.allclose(z_in, z_out)
    # extra pixel levels use the finest query level
    assert [ptrm.query_level_of(i) for i in range(3)] == [min(i, num_levels - 1) for i in range(3)]
    # gradients reach the queries through every level
    q = queries.clone().requires_grad_(True)
    out_q, out_z, _ = ptrm(q, pixels)
    (out_q.square().sum() + sum(z.square().sum() for z in out_z)).backward()
    assert torch.all(q.grad.abs().sum(dim=(0, 2, 3)) > 0)


def test_ptrm_none_is_identity_and_cross_attention_changes_queries_only():
    queries = torch.randn(2, 3, 4, 16)
    pixels = [torch.randn(2, 16, s, s) for s in (2, 4, 8)]
    q, z, a = PTRM(16, 3, mode="none")(queries, pixels)
    assert q is queries and all(x is y for x, y in zip(z, pixels)) and a == []
    q, z, a = PTRM(16, 3, mode="cross_attention", num_heads=2)(queries, pixels)
    assert not torch.allclose(q, queries)
    assert all(torch.equal(x, y) for x, y in zip(z, pixels))
    torch.testing.assert_close(a[2].flatten(2).sum(-1), torch.ones(2, 4))  # attention over pixels
    with pytest.raises(ValueError, match="PTRM.MODE"):
        PTRM(16, 3, mode="attention")


def test_learnable_queries_ignore_the_text_and_are_trained():
    """QUERY_SOURCE learnable (Table 4 baseline row): Q_hat is the E x K x D parameter whatever the class
    embeddings are; gradients reach it; another number of classes is refused."""
    torch.manual_seed(0)
    htqg = HTQG(text_dim=12, hidden_dim=8, num_levels=3, feature_channels=[4, 4, 4], sre_mode="none",
                query_source="learnable", num_classes=5)
    assert htqg.hqg is None and htqg.learned_queries.shape == (3, 5, 8)
    feats = [torch.randn(2, 4, 3, 3) for _ in range(3)]
    w1, q1, _ = htqg(torch.randn(5, 12), feats)
    w2, q2, _ = htqg(torch.randn(5, 12), feats)
    torch.testing.assert_close(q1, htqg.learned_queries)
    torch.testing.assert_close(w1, w2)
    w1.sum().backward()
    assert htqg.learned_queries.grad is not None and htqg.learned_queries.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="new vocabulary"):
        htqg(torch.randn(6, 12), feats)
    with pytest.raises(ValueError, match="QUERY_SOURCE"):
        HTQG(12, 8, 3, [4, 4, 4], query_source="visual")

