"""Tests of the HVLFormer masked-attention transformer decoder (textual queries)."""

import pytest
import torch

from hvlformer.modeling.transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    HVLTransformerDecoder,
    build_transformer_decoder,
    compute_attention_mask,
)

B, E, K, D, C, MASK_DIM, IN_CH, N = 2, 3, 4, 32, 16, 24, 20, 3
LEVEL_SIZES = [(2, 4), (4, 8), (8, 16)]  # coarse -> fine (strides 32, 16, 8 of a 64 x 128 image)
MASK_SIZE = (16, 32)


def make_decoder(**kw):
    args = dict(in_channels=IN_CH, num_classes=K, hidden_dim=D, num_query_levels=E, num_instance_queries=0,
                nheads=4, dim_feedforward=48, dec_layers=N, pre_norm=False, mask_dim=MASK_DIM,
                enforce_input_project=False, classifier="linear", text_dim=C)
    args.update(kw)
    return HVLTransformerDecoder(**args)


def make_inputs(k=K, in_ch=IN_CH, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, in_ch, h, w, generator=g) for h, w in LEVEL_SIZES]
    mask_features = torch.randn(B, MASK_DIM, *MASK_SIZE, generator=g)
    text_queries = torch.randn(B, E * k, D, generator=g).requires_grad_(requires_grad)
    return feats, mask_features, text_queries


def check_pred(p, q, k, level_hw):
    assert p["pred_logits"].shape == (B, q, k + 1)
    assert p["pred_masks"].shape == (B, q, *MASK_SIZE)
    if level_hw is None:
        assert p["attn_maps"] is None
    else:
        assert p["attn_maps"].shape == (B, q, level_hw[0] * level_hw[1])


@pytest.mark.parametrize("m", [0, 5])
def test_output_shapes(m):
    torch.manual_seed(0)
    dec = make_decoder(num_instance_queries=m).eval()
    feats, mf, tq = make_inputs()
    out = dec(feats, mf, tq)
    q = E * K + m
    assert len(out["aux_outputs"]) == N
    check_pred(out["aux_outputs"][0], q, K, None)
    for n in range(1, N):
        # aux_outputs[n] is the output of layer n (1-based) which attended to level (n-1) % 3
        check_pred(out["aux_outputs"][n], q, K, LEVEL_SIZES[(n - 1) % 3])
    check_pred(out, q, K, LEVEL_SIZES[(N - 1) % 3])
    for p in out["aux_outputs"][1:] + [out]:
        assert torch.allclose(p["attn_maps"].sum(-1), torch.ones(B, q), atol=1e-5)
        assert (p["attn_maps"] >= 0).all()
    # the mask logits are the einsum of the mask embedding with mask_features
    assert torch.isfinite(out["pred_masks"]).all() and torch.isfinite(out["pred_logits"]).all()


def test_instance_queries_are_learned_and_appended():
    torch.manual_seed(0)
    dec = make_decoder(num_instance_queries=5, dec_layers=1).eval()
    feats, mf, tq = make_inputs()
    out = dec(feats, mf, tq)
    # the initial prediction of the instance queries does not depend on the image's text queries
    out2 = dec(feats, mf, torch.randn_like(tq))  # (not tq + c: LayerNorm is shift invariant)
    init1, init2 = out["aux_outputs"][0]["pred_logits"], out2["aux_outputs"][0]["pred_logits"]
    assert torch.allclose(init1[:, E * K:], init2[:, E * K:])
    assert not torch.allclose(init1[:, :E * K], init2[:, :E * K])


def test_initial_prediction_is_head_of_text_queries():
    """aux_outputs[0] = heads applied to (decoder_norm of) the given text queries."""
    torch.manual_seed(0)
    dec = make_decoder().eval()
    feats, mf, tq = make_inputs()
    out = dec(feats, mf, tq)
    x = dec.decoder_norm(tq)
    exp_logits = dec.class_embed(x)
    exp_masks = torch.einsum("bqc,bchw->bqhw", dec.mask_embed(x), mf)
    assert torch.allclose(out["aux_outputs"][0]["pred_logits"], exp_logits, atol=1e-5)
    assert torch.allclose(out["aux_outputs"][0]["pred_masks"], exp_masks, atol=1e-5)


def test_query_positional_embedding_is_per_level():
    """Permuting the classes inside a level (content + no positional difference) permutes the outputs."""
    torch.manual_seed(0)
    dec = make_decoder(dec_layers=2).eval()
    feats, mf, tq = make_inputs()
    perm_k = torch.tensor([2, 0, 3, 1])
    perm = torch.cat([e * K + perm_k for e in range(E)])
    out = dec(feats, mf, tq)
    out_p = dec(feats, mf, tq[:, perm])
    assert torch.allclose(out_p["pred_masks"], out["pred_masks"][:, perm], atol=1e-4)
    assert torch.allclose(out_p["pred_logits"], out["pred_logits"][:, perm], atol=1e-4)
    # ... but swapping two levels does not (they have different positional embeddings)
    perm_e = torch.cat([1 * K + torch.arange(K), 0 * K + torch.arange(K), 2 * K + torch.arange(K)])
    out_e = dec(feats, mf, tq[:, perm_e])
    assert not torch.allclose(out_e["pred_masks"], out["pred_masks"][:, perm_e], atol=1e-3)
    assert dec.query_level_pos.weight.shape == (E, D)


def test_compute_attention_mask_hand_case():
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[0, 1, :, :2] = 5.0  # query 1: left half foreground
    logits[0, 2] = 5.0  # query 2: everything foreground
    # query 0: everything background -> fully masked -> reset to attend everywhere
    mask = compute_attention_mask(logits, (4, 4), num_heads=2)
    assert mask.shape == (2, 3, 16) and mask.dtype == torch.bool
    assert not mask[:, 0].any()
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    assert torch.equal(mask[0, 1], ~left.flatten()) and torch.equal(mask[1, 1], ~left.flatten())
    assert not mask[:, 2].any()
    # threshold is sigmoid < 0.5: logit exactly 0 is NOT masked, a small negative one is
    z = torch.zeros(1, 2, 2, 2)
    z[0, 1, 0, 0] = -1e-3
    m = compute_attention_mask(z, (2, 2), num_heads=1)
    assert not m[0, 0].any()
    assert m[0, 1].tolist() == [True, False, False, False]
    # bilinear resize to the level size (8 x 8 -> 4 x 4: a left-half mask stays a left-half mask)
    big = torch.full((1, 1, 8, 8), -5.0)
    big[..., :4] = 5.0
    m = compute_attention_mask(big, (4, 4), num_heads=1)
    assert torch.equal(m[0, 0], ~left.flatten())


def _constant_mask_decoder(bias):
    """Decoder whose mask embedding is constant (= bias) for every query at every layer."""
    torch.manual_seed(0)
    dec = make_decoder().eval()
    last = dec.mask_embed.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(bias)
    return dec


def test_attention_mask_applied_in_forward():
    # mask channel 0 = +1 on the left half, -1 on the right half; embedding picks channel 0 -> every
    # query's mask is "left half" at every layer, so every layer's attention must be 0 on the right half
    bias = torch.zeros(MASK_DIM)
    bias[0] = 10.0
    dec = _constant_mask_decoder(bias)
    feats, _, tq = make_inputs()
    mf = torch.zeros(B, MASK_DIM, *MASK_SIZE)
    mf[:, 0, :, : MASK_SIZE[1] // 2] = 1.0
    mf[:, 0, :, MASK_SIZE[1] // 2:] = -1.0
    out = dec(feats, mf, tq)
    for n, p in enumerate(out["aux_outputs"][1:] + [out]):
        h, w = LEVEL_SIZES[n % 3]
        a = p["attn_maps"].reshape(B, E * K, h, w)
        assert torch.all(a[..., w // 2:] == 0), n
        assert torch.allclose(a[..., : w // 2].sum((-1, -2)), torch.ones(B, E * K), atol=1e-5)


def test_fully_masked_rows_are_reset_in_forward():
    # every mask logit is -10 -> every row fully masked; without the reset the softmax would be NaN
    bias = torch.zeros(MASK_DIM)
    bias[0] = -10.0
    dec = _constant_mask_decoder(bias)
    feats, _, tq = make_inputs()
    mf = torch.zeros(B, MASK_DIM, *MASK_SIZE)
    mf[:, 0] = 1.0
    out = dec(feats, mf, tq)
    for p in out["aux_outputs"][1:] + [out]:
        assert torch.isfinite(p["attn_maps"]).all()
        assert torch.allclose(p["attn_maps"].sum(-1), torch.ones(B, E * K), atol=1e-5)
        assert (p["attn_maps"] > 0).all()  # attends everywhere
    assert torch.isfinite(out["pred_logits"]).all()


def test_text_classifier_new_vocabulary():
    torch.manual_seed(0)
    dec = make_decoder(classifier="text", num_instance_queries=2).eval()
    feats, mf, tq = make_inputs()
    t = torch.randn(K, C)
    out = dec(feats, mf, tq, class_embeddings=t)
    assert out["pred_logits"].shape == (B, E * K + 2, K + 1)
    # logits are exp(logit_scale) * cosine, initial scale 1/0.07
    assert torch.allclose(dec.class_embed.logit_scale.exp(), torch.tensor(1 / 0.07))
    assert out["pred_logits"].abs().max() <= 1 / 0.07 + 1e-3
    # the same logits by hand for the initial prediction
    x = torch.nn.functional.normalize(dec.class_embed.proj(dec.decoder_norm(tq)), dim=-1)
    tt = torch.cat([t, dec.class_embed.no_object_embed.weight], 0)
    tt = torch.nn.functional.normalize(tt, dim=-1)
    exp = x @ tt.T / 0.07
    assert torch.allclose(out["aux_outputs"][0]["pred_logits"][:, : E * K], exp, atol=1e-4)

    # a new vocabulary of K' = 2 classes, no re-building
    k2 = 2
    feats, mf, tq2 = make_inputs(k=k2)
    out2 = dec(feats, mf, tq2, class_embeddings=torch.randn(B, k2, C))  # per-image embeddings
    assert out2["pred_logits"].shape == (B, E * k2 + 2, k2 + 1)
    assert out2["pred_masks"].shape == (B, E * k2 + 2, *MASK_SIZE)
    for p in out2["aux_outputs"]:
        assert p["pred_logits"].shape == (B, E * k2 + 2, k2 + 1)
    with pytest.raises(ValueError):
        dec(feats, mf, tq2)  # text classifier needs class embeddings
    with pytest.raises(ValueError):
        dec(feats, mf, tq2, class_embeddings=torch.randn(3, C))  # E*K' mismatch


def test_linear_classifier_checks_query_count():
    dec = make_decoder()
    feats, mf, tq = make_inputs(k=K + 1)
    with pytest.raises(ValueError):
        dec(feats, mf, tq)


def test_gradients_reach_text_queries_and_params():
    torch.manual_seed(0)
    dec = make_decoder(num_instance_queries=3, classifier="text", pre_norm=True)
    feats, mf, tq = make_inputs(requires_grad=True)
    t = torch.randn(K, C, requires_grad=True)
    out = dec(feats, mf, tq, class_embeddings=t)
    loss = out["pred_logits"].square().mean() + out["pred_masks"].sigmoid().mean() + out["attn_maps"].square().sum()
    loss = loss + sum(p["pred_masks"].mean() for p in out["aux_outputs"])
    loss.backward()
    assert tq.grad is not None and tq.grad.abs().sum() > 0
    assert t.grad is not None and t.grad.abs().sum() > 0
    for name in ["query_level_pos.weight", "instance_query_feat.weight", "instance_query_pos.weight",
                 "class_embed.logit_scale", "class_embed.no_object_embed.weight", "level_embed.weight",
                 "input_proj.0.weight"]:
        p = dict(dec.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_build_from_cfg():
    from detectron2.config import get_cfg
    from hvlformer.config import add_hvlformer_config

    cfg = get_cfg()
    add_hvlformer_config(cfg)
    cfg.MODEL.HVLFORMER.HIDDEN_DIM = D
    cfg.MODEL.HVLFORMER.DEC_LAYERS = 4
    cfg.MODEL.HVLFORMER.NHEADS = 4
    cfg.MODEL.HVLFORMER.DIM_FEEDFORWARD = 40
    cfg.MODEL.HVLFORMER.NUM_QUERY_LEVELS = 2
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = MASK_DIM
    assert "HVLTransformerDecoder" in TRANSFORMER_DECODER_REGISTRY
    # HierVL's instance queries (MODEL.HIERVL.NUM_INSTANCE_QUERIES) are passed by its meta-architecture
    dec = build_transformer_decoder(cfg, in_channels=IN_CH, num_classes=K, text_dim=C, num_instance_queries=3)
    assert isinstance(dec, HVLTransformerDecoder)
    assert dec.num_layers == 4 and dec.num_query_levels == 2 and dec.num_instance_queries == 3
    assert isinstance(dec.input_proj[0], torch.nn.Conv2d)  # IN_CH != D
    assert isinstance(dec.class_embed, torch.nn.Linear) and dec.class_embed.out_features == K + 1
    assert dec.transformer_ffn_layers[0].linear1.out_features == 40
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(B, IN_CH, h, w, generator=g) for h, w in LEVEL_SIZES]
    out = dec(feats, torch.randn(B, MASK_DIM, *MASK_SIZE), torch.randn(B, 2 * K, D))
    assert out["pred_logits"].shape == (B, 2 * K + 3, K + 1) and len(out["aux_outputs"]) == 4
    # no projection when the widths agree and it is not enforced
    dec2 = build_transformer_decoder(cfg, in_channels=D, num_classes=K, text_dim=C)
    assert isinstance(dec2.input_proj[0], torch.nn.Identity)
    cfg.MODEL.HVLFORMER.ENFORCE_INPUT_PROJ = True
    cfg.MODEL.HVLFORMER.CLASSIFIER = "text"
    dec3 = build_transformer_decoder(cfg, in_channels=D, num_classes=K, text_dim=C)
    assert isinstance(dec3.input_proj[0], torch.nn.Conv2d)
    assert dec3.class_embed.proj.out_features == C


def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    dec = make_decoder(num_instance_queries=2, classifier="text")
    feats, mf, tq = make_inputs(requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(feats, mf, tq, class_embeddings=torch.randn(K, C))
    for p in out["aux_outputs"][1:] + [out]:
        for key in ("pred_logits", "pred_masks", "attn_maps"):
            assert torch.isfinite(p[key].float()).all(), key
        assert torch.allclose(p["attn_maps"].float().sum(-1), torch.ones(B, E * K + 2), atol=2e-2)
    assert out["pred_logits"].dtype == torch.float32  # the cosine classifier runs in fp32
    out["pred_masks"].float().mean().backward()
    assert torch.isfinite(tq.grad).all()
