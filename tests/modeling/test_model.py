"""The assembled HVLFormer meta-architecture on the tiny random-weight CLIP and the shapes dataset."""
import argparse

import pytest
import torch

from conftest import TINY_CONFIG
from hvlformer import setup_cfg
from hvlformer.modeling import inference

pytestmark = pytest.mark.usefixtures("single_thread")
# more sampled points than the tiny config's for the mask losses
POINTS = ["MODEL.HVLFORMER.TRAIN_NUM_POINTS", "256"]


def batch(num_classes=6, sizes=((64, 64), (64, 64)), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        label = torch.randint(0, num_classes, (h, w), generator=g)
        label[:4] = 255
        out.append({"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8), "sem_seg": label,
                    "height": h, "width": w})
    return out


# no loss_reg_vision: the tiny CLIP has no pretrained weights, so L^V has no E_I^0 and is switched off
EXPECTED_LOSSES = {"loss_ce", "loss_mask", "loss_dice", "loss_reg_language", "loss_reg_vision_language",
                   "loss_div", "loss_sre"}


def test_training_losses_and_gradients(tiny_model):
    model = tiny_model(*POINTS)
    losses = model(batch())
    assert EXPECTED_LOSSES <= set(losses) and "loss_reg_vision" not in losses
    assert {"loss_ce_0", "loss_mask_1", "loss_dice_1"} <= set(losses)  # deep supervision: N + 1 predictions
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # the text tower is frozen; only its learnable context trains
    text = model.text_encoder
    assert text.context.grad is not None and text.context.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in text.named_parameters() if n != "context")
    for name in ("backbone", "pixel_decoder", "htqg", "ptrm", "transformer_decoder"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    # the frozen encoder copy is not part of the checkpoint
    assert not any("reference" in key for key in model.state_dict())


def test_loss_weights_come_from_the_config(tiny_model):
    model = tiny_model(*POINTS, "MODEL.HVLFORMER.REG_LANGUAGE_WEIGHT", "0.0", "MODEL.HVLFORMER.DIV_WEIGHT", "3.0",
                       "MODEL.HVLFORMER.CLASS_WEIGHT", "0.5")
    torch.manual_seed(1)
    losses = model(batch())
    assert "loss_reg_language" not in losses
    from hvlformer.modeling.htqg import diversity_loss

    expected_div = 3.0 * diversity_loss(model.htqg.hqg(model.encode_text()))
    torch.testing.assert_close(losses["loss_div"], expected_div)
    assert model.criterion.seg_criterion.weight_dict["loss_ce"] == 0.5


def test_inference_output_at_original_size(tiny_model):
    model = tiny_model(*POINTS, train=False)
    inputs = [{"image": torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8), "height": 96, "width": 160},
              {"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64}]
    with torch.no_grad():
        outputs = model(inputs)
    assert outputs[0]["sem_seg"].shape == (6, 96, 160)
    assert outputs[1]["sem_seg"].shape == (6, 64, 64)
    # scores: sum over queries of p(class) * sigmoid(mask): non-negative, and summed over the classes at
    # most one per query (each query's class probabilities without no-object sum to <= 1)
    scores = outputs[1]["sem_seg"]
    assert scores.min() >= 0 and scores.sum(dim=0).max() <= model.num_query_levels * model.num_classes


def test_semantic_scores_sum_levels_of_a_class():
    from hvlformer.modeling.outputs import semantic_scores

    logits = torch.full((1, 4, 3), -30.0)  # K = 2, E = 2 -> 4 queries, + no-object
    logits[0, 0, 0] = logits[0, 2, 0] = 30.0  # queries 0 and 2 (levels 0, 1) say class 0
    logits[0, 1, 1] = logits[0, 3, 2] = 30.0  # query 1 says class 1, query 3 says no-object
    masks = torch.full((1, 4, 1, 1), 30.0)
    scores = semantic_scores(logits, masks)
    torch.testing.assert_close(scores[0, :, 0, 0], torch.tensor([2.0, 1.0]))


def test_sliding_window_equals_whole_image_for_one_window(tiny_model):
    model = tiny_model(*POINTS, "TEST.SLIDING_WINDOW.CROP_SIZE", "64", "TEST.SLIDING_WINDOW.STRIDE", "42", train=False)
    inputs = batch(sizes=((64, 64),))
    with torch.no_grad():
        whole = model(inputs)[0]["sem_seg"]
        model.sliding_window = True
        sliding = model(inputs)[0]["sem_seg"]
    torch.testing.assert_close(sliding, whole, rtol=1e-4, atol=1e-5)


def test_sliding_window_count_averaging(monkeypatch, tiny_model):
    model = tiny_model(*POINTS, "TEST.SLIDING_WINDOW.CROP_SIZE", "64", "TEST.SLIDING_WINDOW.STRIDE", "32", train=False)
    calls = []

    def fake_scores(model, images, text_embeddings, valid_sizes=None):  # each window scores the number of its call
        calls.append(images.shape[-2:])
        return torch.full((1, 6, *images.shape[-2:]), float(len(calls))), None

    monkeypatch.setattr(inference, "scores_and_alignment", fake_scores)
    scores, _ = inference.sliding_window_scores(model, torch.zeros(3, 64, 128), None)
    # windows at x = 0, 32, 64 -> values 1, 2, 3; columns 32..63 see windows 1,2; 64..95 see 2,3
    assert len(calls) == 3 and all(tuple(c) == (64, 64) for c in calls)
    expected = torch.tensor([1.0] * 32 + [1.5] * 32 + [2.5] * 32 + [3.0] * 32)
    torch.testing.assert_close(scores[0, 0], expected)
    # an image smaller than the window is padded to one window and cropped back
    small, _ = inference.sliding_window_scores(model, torch.zeros(3, 40, 50), None)
    assert small.shape == (6, 40, 50)


def test_text_classifier_accepts_a_new_vocabulary(tiny_model):
    model = tiny_model(*POINTS, "MODEL.HVLFORMER.CLASSIFIER", "text", train=False)
    names = ["cat", "dog", "grass"]
    model.set_vocabulary(names, [[f"a photo of a {n}."] for n in names], [f"a {n}" for n in names])
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), "height": 64, "width": 64}])
    assert out[0]["sem_seg"].shape == (3, 64, 64)


@pytest.mark.parametrize("opts, extra_losses", [
    # HierVL with instance queries only (its other options off)
    (["MODEL.META_ARCHITECTURE", "HierVL", "MODEL.HIERVL.NUM_INSTANCE_QUERIES", "3",
      "MODEL.HIERVL.TEXT_CROSS_ATTENTION", "False", "MODEL.HIERVL.PROMPT_WEIGHT", "0.0",
      "MODEL.HIERVL.MASKED_VL_WEIGHT", "0.0"], set()),
    (["MODEL.HVLFORMER.PTRM.MODE", "cross_attention"], set()),
    (["MODEL.HVLFORMER.PTRM.MODE", "none", "MODEL.HVLFORMER.SRE.MODE", "none"], set()),
    (["MODEL.HVLFORMER.SRE.MODE", "threshold", "MODEL.HVLFORMER.NUM_QUERY_LEVELS", "1"], set()),
    (["MODEL.META_ARCHITECTURE", "HierVL", "MODEL.HIERVL.TEXT_CROSS_ATTENTION", "True",
      "MODEL.HVLFORMER.SRE.MODE", "clip_zero_shot", "MODEL.HIERVL.PROMPT_WEIGHT", "1.0",
      "MODEL.HIERVL.MASKED_VL_WEIGHT", "1.0", "MODEL.HIERVL.NUM_INSTANCE_QUERIES", "2"], {"loss_prompt", "loss_masked_vl"}),
])
def test_config_variants_train(opts, extra_losses, tiny_model):
    model = tiny_model(*POINTS, *opts)
    losses = model(batch())
    assert extra_losses <= set(losses)
    if "none" in opts:
        assert "loss_sre" not in losses
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


def test_bad_label_value_is_a_clear_error(tiny_model):
    model = tiny_model(*POINTS)
    inputs = batch()
    inputs[0]["sem_seg"][10, 10] = 7  # K = 6, not the ignore value
    with pytest.raises(ValueError, match="7"):
        model(inputs)


def test_learnable_query_switch_builds_and_trains(tiny_model):
    """MODEL.HVLFORMER.QUERY_SOURCE learnable (the Table 4 baseline row): no HQG, E x K x D learned queries;
    a training step gives finite losses and moves them."""
    model = tiny_model(*POINTS, "MODEL.HVLFORMER.QUERY_SOURCE", "learnable")
    assert model.htqg.hqg is None and model.htqg.learned_queries.shape == (3, 6, 64)
    before = model.htqg.learned_queries.detach().clone()
    losses = model(batch())
    total = sum(losses.values())
    assert torch.isfinite(total)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    total.backward()
    opt.step()
    assert not torch.equal(before, model.htqg.learned_queries.detach())


def test_query_norm_switch(tiny_model):
    """MODEL.HVLFORMER.QUERY_NORM: the decoder's textual content queries are ~sqrt(D) long with the HQG's
    output LayerNorm (default) and much shorter without it (the plain MLP_e of the paper's equation)."""
    captured = {}

    def lengths(model):
        hook = model.transformer_decoder.register_forward_pre_hook(
            lambda module, args, kwargs: captured.update(q=kwargs.get("text_queries", args[2] if len(args) > 2 else None)),
            with_kwargs=True)
        with torch.no_grad():
            model(batch())
        hook.remove()
        return captured["q"].norm(dim=-1).mean().item()

    normed = tiny_model(*POINTS)
    plain = tiny_model(*POINTS, "MODEL.HVLFORMER.QUERY_NORM", "False")
    assert len(normed.htqg.hqg.heads[0]) == 4 and len(plain.htqg.hqg.heads[0]) == 3
    # D = 64: LayerNorm output ~8 long, scaled by the SRE's s_k (~0.5 untrained) and moved by PTRM
    assert lengths(normed) > 2.0 > 1.0 > lengths(plain)


def test_query_zero_bias_from_the_config(tiny_model):
    """MODEL.HVLFORMER.QUERY_ZERO_BIAS starts every HQG head's biases at zero and leaves the rest of the model
    as the default init builds it (the same seed gives the same weights everywhere else)."""
    torch.manual_seed(0)
    default = tiny_model(*POINTS, "MODEL.HVLFORMER.QUERY_ZERO_BIAS", "False")
    torch.manual_seed(0)
    zeroed = tiny_model(*POINTS)  # the default
    zeroed_state, default_state = zeroed.state_dict(), default.state_dict()
    hqg_biases = {k for k in zeroed_state if k.startswith("htqg.hqg.heads.") and k.endswith(("0.bias", "2.bias"))}
    assert len(hqg_biases) == 2 * zeroed.htqg.hqg.num_levels
    for key, value in zeroed_state.items():
        if key in hqg_biases:
            assert value.abs().max() == 0 and default_state[key].abs().max() > 0, key
        else:
            torch.testing.assert_close(value, default_state[key], msg=key)


def test_reference_text_buffer_follows_copies_and_resets(tiny_model):
    """T0 is a non-persistent buffer: empty until first use, then cached; deepcopy keeps it, .to(dtype) casts it,
    it is never saved, and a new vocabulary or loaded weights reset it (recomputed on next use)."""
    import copy

    model = tiny_model(*POINTS)
    assert model.reference_text_embeddings.numel() == 0
    t0 = model.reference_text()
    expected = model.text_encoder.reference_embeddings(model.reference_class_prompts)
    torch.testing.assert_close(t0, expected, atol=0, rtol=0)
    assert model.reference_text() is t0  # cached
    assert "reference_text_embeddings" not in model.state_dict()
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin.reference_text_embeddings, t0, atol=0, rtol=0)
    twin.to(torch.float64)
    assert twin.reference_text_embeddings.dtype == torch.float64
    twin.load_state_dict(model.state_dict())
    assert twin.reference_text_embeddings.numel() == 0
    names = ["cat", "dog"]
    model.set_vocabulary(names, [[f"a photo of a {n}."] for n in names], [f"a {n}" for n in names])
    assert model.reference_text_embeddings.numel() == 0 and model.reference_text().shape[0] == 2


def test_backbone_comes_from_the_registry_by_name(monkeypatch, tiny_model):
    """MODEL.BACKBONE.NAME is read (a name that is not a CLIP backbone is a clear error), and the CLIP model is
    loaded once for both towers (the backbone does not load it again)."""
    from hvlformer.modeling.backbone import clip_vit
    from hvlformer.modeling.meta_arch import hvlformer as meta

    with pytest.raises(ValueError, match="MODEL.BACKBONE.NAME"):
        tiny_model(*POINTS, "MODEL.BACKBONE.NAME", "build_resnet_backbone")
    calls = []
    original = meta.build_clip_model

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(meta, "build_clip_model", counting)
    monkeypatch.setattr(clip_vit, "build_clip_model", lambda *a, **k: pytest.fail("CLIP loaded a second time"))
    model = tiny_model(*POINTS)
    assert len(calls) == 1 and isinstance(model.backbone, clip_vit.CLIPViTBackbone)


@pytest.mark.parametrize("old, value, new", [
    ("MODEL.HVLFORMER.HIERVL.PROMPT_WEIGHT", "1.0", "MODEL.HIERVL.PROMPT_WEIGHT"),
    ("MODEL.HVLFORMER.NUM_INSTANCE_QUERIES", "3", "MODEL.HIERVL.NUM_INSTANCE_QUERIES"),
    ("MODEL.SEM_SEG_HEAD.TEXT_CROSS_ATTENTION", "True", "MODEL.HIERVL.TEXT_CROSS_ATTENTION"),
    ("SEMI.UNLABELED_LOSS", "entropy", "MODEL.HIERVL.UNLABELED_LOSS"),
])
def test_old_hiervl_keys_name_their_new_place(tmp_path, old, value, new):
    """A HierVL key in its old place fails, on the command line and in a YAML file, naming the new key."""
    with pytest.raises(KeyError, match=f"{old} was renamed to {new}"):
        setup_cfg(argparse.Namespace(config_file=TINY_CONFIG, opts=[old, value]))
    *parents, leaf = old.split(".")
    lines = [f"_BASE_: {TINY_CONFIG}"]
    for depth, part in enumerate(parents):
        lines.append("  " * depth + f"{part}:")
    lines.append("  " * len(parents) + f"{leaf}: {value}")
    path = tmp_path / "old.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(KeyError, match="was renamed to MODEL.HIERVL"):
        setup_cfg(argparse.Namespace(config_file=str(path), opts=[]))


def test_hvlformer_refuses_the_hiervl_zero_shot_relevance(tiny_model):
    with pytest.raises(ValueError, match="HierVL"):
        tiny_model(*POINTS, "MODEL.HVLFORMER.SRE.MODE", "clip_zero_shot")


def test_a_config_dumped_by_an_older_version_still_loads(tmp_path, caplog):
    """``output/*/config.yaml`` of a run made before the HierVL keys moved holds them at their old defaults
    (nothing selected): loading drops them with a warning; the rest of the file still applies."""
    old = setup_cfg(argparse.Namespace(config_file=TINY_CONFIG, opts=["SOLVER.MAX_ITER", "7"]))
    dumped = old.dump()
    # what the old version wrote, besides the current keys
    text = dumped.replace("  HVLFORMER:\n", "  HVLFORMER:\n    HIERVL:\n      MASKED_VL_WEIGHT: 0.0\n"
                          "      MASK_CONSISTENCY_WEIGHT: 1.0\n      PROMPT_WEIGHT: 0.0\n"
                          "    NUM_INSTANCE_QUERIES: 0\n", 1)
    text = text.replace("SEMI:\n", "SEMI:\n  ENTROPY_WEIGHT: 1.0\n  UNLABELED_LOSS: cmcr\n", 1)
    assert "    HIERVL:\n      MASKED_VL_WEIGHT: 0.0" in text and "UNLABELED_LOSS: cmcr" in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with caplog.at_level("WARNING"):
        cfg = setup_cfg(argparse.Namespace(config_file=str(path), opts=[]))
    assert cfg.SOLVER.MAX_ITER == 7 and cfg.INPUT.CROP.SIZE == old.INPUT.CROP.SIZE
    assert "MODEL.HVLFORMER.HIERVL" in caplog.text and "SEMI.UNLABELED_LOSS" in caplog.text
    # the same file with a HierVL option really set still fails, naming the new key
    path.write_text(text.replace("UNLABELED_LOSS: cmcr", "UNLABELED_LOSS: entropy"))
    with pytest.raises(KeyError, match="SEMI.UNLABELED_LOSS was renamed to MODEL.HIERVL.UNLABELED_LOSS"):
        setup_cfg(argparse.Namespace(config_file=str(path), opts=[]))
