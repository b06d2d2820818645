"""tools/anchor_diagnostics.py: the cosine summary by hand, and the fine-tuned tower put back into the
pretrained CLIP (the run's image weights, the pretrained text tower)."""
from __future__ import annotations

import pytest
import torch

from conftest import (SEMI_SMALL, TINY_PRETRAINED_CONFIG, TINY_SEMI_CONFIG, TINY_SEMI_PRETRAINED_CONFIG,
                      make_tiny_cfg, make_tiny_model)


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("anchor_diagnostics")


def test_cosine_summary_by_hand(tool):
    names = ["background", "square", "cross"]
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # unit: (1, 0), (0, 1), (0.707, 0.707)
    out = tool.cosine_summary(embeddings, names)
    assert out["square_cross"] == pytest.approx(0.707, abs=1e-3)
    # between different classes: 0, 0.707, 0.707 (each pair twice)
    assert out["mean_between_classes"] == pytest.approx((0 + 0.7071 + 0.7071) / 3, abs=1e-3)
    assert out["max_between_classes"] == pytest.approx(0.707, abs=1e-3)
    assert out["cosine"][1][1] == pytest.approx(1.0)


def test_finetuned_tower_replaces_only_the_image_tower(tool, single_thread):
    cfg = make_tiny_cfg(config=TINY_PRETRAINED_CONFIG)
    model = make_tiny_model(config=TINY_PRETRAINED_CONFIG, train=False)
    with torch.no_grad():  # stands in for fine-tuning
        for p in model.backbone.visual.parameters():
            p.add_(0.01 * torch.randn_like(p))
    clip = tool.finetuned_clip(cfg, model).clip
    for key, value in model.backbone.visual.state_dict().items():
        torch.testing.assert_close(clip.visual.state_dict()[key], value, msg=key)
    from hvlformer.modeling.clip_loader import build_clip_model

    pristine, _ = build_clip_model(cfg.MODEL.HVLFORMER.CLIP.MODEL_NAME, cfg.MODEL.HVLFORMER.CLIP.PRETRAINED)
    torch.testing.assert_close(clip.token_embedding.weight, pristine.token_embedding.weight)
    assert not torch.equal(clip.visual.trunk.pos_embed, pristine.visual.trunk.pos_embed)
    with pytest.raises(ValueError, match="random CLIP weights"):
        tool.finetuned_clip(make_tiny_cfg(), model)


def test_tiny_config_prompts_are_apart_in_the_tiny_clip_text_space(tool, single_thread):
    """The tiny configs' class prompts (shapes_tiny_clip.json) and reference prompts T0 ("a photo of a {}.")
    are in the phrasing the tiny CLIP was pretrained on, so its text tower keeps the classes apart; the paper's
    phrasing (shapes.json's long sentences, "a clean origami of a {} with attributes: ...") collapses them
    (docs/RESULTS.md, "Language anchors in the tiny CLIP's own words")."""
    from hvlformer.modeling.clip_loader import build_clip_model
    from hvlformer.modeling.text.descriptions import (DEFAULT_REFERENCE_TEMPLATE, load_class_descriptions,
                                                      reference_prompts, resolve_descriptions_path)

    cfg = make_tiny_cfg(config=TINY_PRETRAINED_CONFIG)
    text = cfg.MODEL.HVLFORMER.TEXT
    names = ["background", "circle", "square", "triangle", "star", "cross"]
    clip_model, tokenizer = build_clip_model(cfg.MODEL.HVLFORMER.CLIP.MODEL_NAME, cfg.MODEL.HVLFORMER.CLIP.PRETRAINED)

    def cosines(descriptions_file: str, template: str):
        described = load_class_descriptions(resolve_descriptions_path(descriptions_file, "shapes"), names,
                                            num_descriptions=text.NUM_DESCRIPTIONS)
        return tool.prompt_cosines(clip_model.eval(), tokenizer, names, described.prompts,
                                   reference_prompts(names, described.attributes, template))

    ours = cosines(text.DESCRIPTIONS, text.REFERENCE_TEMPLATE)
    paper = cosines("", DEFAULT_REFERENCE_TEMPLATE)  # datasets/descriptions/shapes.json
    assert text.REFERENCE_TEMPLATE == "a photo of a {}."
    # T0 is then the plain prompt itself
    assert ours["reference_prompts_T0"]["cosine"] == ours["plain_prompts"]["cosine"]
    assert ours["class_prompts"]["max_between_classes"] < 0.4 and ours["reference_prompts_T0"]["mean_between_classes"] < 0.1
    assert ours["class_prompts"]["square_cross"] < 0.1
    assert paper["class_prompts"]["square_cross"] > 0.6 and paper["reference_prompts_T0"]["mean_between_classes"] > 0.7


def test_query_attribution_by_hand(tool):
    """Mask2Former's semantic inference sum_q p_q(c) m_q on five pixels, worked out by hand: which class each
    square pixel gets, and which query carries the wrong "cross" score."""
    names = ["background", "square", "cross"]
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1],   # L0:background
                          [0.1, 0.5, 0.1, 0.3],   # L0:square
                          [0.1, 0.1, 0.7, 0.1],   # L0:cross
                          [0.1, 0.1, 0.6, 0.2]])  # instance0
    masks = torch.tensor([[0, 0, 0, 1, 0],
                          [1, 1, 0, 0, 1],
                          [1, 0, 1, 0, 0],
                          [0, 1, 0, 0, 0]], dtype=torch.float32)[:, None]  # Q x 1 x 5
    labels = torch.tensor([[1, 1, 2, 0, 1]])
    # pixel 0: square 0.5 < cross 0.1 + 0.7 (L0:cross carries 0.7); pixel 1: square 0.5 + 0.1 < cross 0.1 + 0.6
    # (instance0 carries 0.6); pixel 4: square alone
    out = tool.query_attribution(probs.log(), masks, labels, names, num_levels=1)
    assert out["predicted_as"] == {"background": 0, "square": 1, "cross": 2}
    assert out["top_query_when_wrong"] == {"L0:cross": 1, "instance0": 1}


def test_pixel_confusion_and_iou_by_hand(tool):
    import numpy as np

    # 2 classes on a 2 x 2 grid, labels at 2 x 2 (no upsampling): class 1 wins where its score is higher
    scores = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.1, 0.9], [0.7, 0.3]]])
    labels = torch.tensor([[0, 1], [0, 255]])
    confusion = tool.pixel_confusion(scores, labels)
    assert confusion.tolist() == [[1, 1], [0, 1]]  # the ignored pixel is not counted
    summary = tool.iou_summary(confusion, ["background", "square"])
    assert summary["iou"] == {"background": 50.0, "square": 50.0} and summary["miou"] == 50.0
    assert summary["square_row_percent"] == {"background": 0.0, "square": 100.0}
    assert tool.iou_summary(np.array([[3, 1], [0, 0]]), ["a", "b"])["iou"] == {"a": 75.0, "b": 0.0}


def test_vision_language_scores_are_the_l_vl_logits(tool):
    """Cross-entropy of the scores / 0.07 against the labels is L^VL itself (the regularisation loss)."""
    from hvlformer.modeling.regularization import vision_language_regularization

    torch.manual_seed(0)
    dense, text = torch.randn(2, 8, 3, 3), torch.randn(4, 8)
    labels = torch.randint(0, 4, (2, 6, 6))
    scores = tool.vision_language_scores(dense, text)
    assert scores.shape == (2, 4, 3, 3) and scores.abs().max() <= 1.0 + 1e-6  # cosines
    upsampled = torch.nn.functional.interpolate(scores / 0.07, size=(6, 6), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.cross_entropy(upsampled, labels)
    assert torch.allclose(vision_language_regularization(dense, text, labels), expected, atol=1e-5)


def test_query_geometry_by_hand(tool):
    names = ["background", "square", "cross"]
    # one image, E = 2 levels, K = 3, D = 2; level 0's position (10, 0) swamps its short contents, level 1's is 0
    queries = torch.tensor([[[0.0, 1.0], [0.0, -1.0], [1.0, 0.0],
                             [3.0, 0.0], [0.0, 4.0], [0.0, -4.0]]])
    pos = torch.tensor([[10.0, 0.0], [0.0, 0.0]])
    out = tool.query_geometry(queries, pos, names)
    assert out["L0"]["content_length"] == pytest.approx(1.0) and out["L0"]["position_length"] == 10.0
    # (10, -1) vs (11, 0): cos = 110 / (sqrt(101) * 11)
    assert out["L0"]["cos_square_cross"] == pytest.approx(110 / (101 ** 0.5 * 11), abs=1e-4)
    pairs0 = [99 / 101, 110 / (101 ** 0.5 * 11), 110 / (101 ** 0.5 * 11)]
    assert out["L0"]["cos_between_classes"] == pytest.approx(sum(pairs0) / 3, abs=1e-4)
    assert out["L1"]["content_length"] == pytest.approx(11 / 3, abs=1e-3) and out["L1"]["cos_square_cross"] == -1.0
    assert out["L1"]["cos_between_classes"] == pytest.approx((0 + 0 - 1) / 3, abs=1e-4)
    # the content alone: level 0 (0, 1), (0, -1), (1, 0) -> cosines -1, 0, 0; level 1 (1, 0), (0, 1), (0, -1) -> 0, 0, -1
    assert out["L0"]["content_cos_between_classes"] == pytest.approx(-1 / 3, abs=1e-4)
    assert out["L1"]["content_cos_between_classes"] == pytest.approx(-1 / 3, abs=1e-4)


def test_decoder_query_geometry_sees_the_query_norm(tool, single_thread):
    """On the untrained tiny model from the shipped pretrained tiny CLIP (its class embeddings differ): the
    content queries the decoder receives are long with the HQG LayerNorm and short without it, and without it
    every class of a level attends alike; the hook is removed afterwards."""
    from hvlformer.data.datasets.register_shapes import register_shapes_semi_split

    results = {}
    settings = {"True": ("MODEL.HVLFORMER.QUERY_NORM", "True"), "False": ("MODEL.HVLFORMER.QUERY_NORM", "False"),
                "default_bias": ("MODEL.HVLFORMER.QUERY_ZERO_BIAS", "False")}
    for name, opts in settings.items():
        cfg = make_tiny_cfg(*opts, config=TINY_SEMI_PRETRAINED_CONFIG, small=SEMI_SMALL)
        register_shapes_semi_split(cfg)
        model = make_tiny_model(*opts, config=TINY_SEMI_PRETRAINED_CONFIG, small=SEMI_SMALL, train=False)
        results[name] = tool.decoder_query_geometry(cfg, model, "shapes_labeled", num_images=3)
        assert results[name]["images"] == 3 and not model.transformer_decoder._forward_pre_hooks
    for level in ("L0", "L1", "L2"):
        normed, plain = results["True"][level], results["False"][level]
        assert normed["content_length"] > 4 * plain["content_length"]
        # untrained, the HQG maps the classes to similar queries either way (cosine ~0.98 with the LayerNorm);
        # without it the position makes them one vector (1 - cosine ~1e-4, 100x less)
        assert plain["cos_between_classes"] > 0.999 > 0.995 > normed["cos_between_classes"]
        # HQG's biases at zero (the default): the classes' contents start far apart; PyTorch's default biases
        # make them alike
        assert normed["content_cos_between_classes"] < results["default_bias"][level]["content_cos_between_classes"] - 0.2


def test_head_diagnostics_accounts_for_every_square_pixel(tool, single_thread):
    """On the 8 labeled images of a small semi config (random weights): every square pixel of the labels is
    counted once in ``predicted_as``; the probes and query probabilities have their documented form."""
    import numpy as np
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    from hvlformer.data.datasets.register_shapes import register_shapes_semi_split

    cfg = make_tiny_cfg(config=TINY_SEMI_CONFIG, small=SEMI_SMALL)
    register_shapes_semi_split(cfg)
    model = make_tiny_model(config=TINY_SEMI_CONFIG, small=SEMI_SMALL, train=False)
    out = tool.head_diagnostics(cfg, model, "shapes_labeled")
    square = model.class_names.index("square")
    expected = sum(int((read_image(r["sem_seg_file_name"]).astype(np.int64) == square).sum())
                   for r in DatasetCatalog.get("shapes_labeled"))
    assert expected > 0 and sum(out["square_pixels"]["predicted_as"].values()) == expected
    assert sum(out["square_pixels"]["top_query_when_wrong"].values()) == out["square_pixels"]["predicted_as"]["cross"]
    levels = out["square_queries_on_images_with_square"]
    assert set(levels) == {"L0", "L1", "L2"}
    assert all(abs(sum(row.values()) - 1) < 0.01 for row in levels.values())
    for scores in out["presence_auroc"].values():
        assert list(scores) == list(model.class_names) and scores["background"] is None  # background: every image
        assert all(v is None or 0.0 <= v <= 1.0 for v in scores.values())
    for probe in out["linear_probe"].values():
        assert probe is None or 0 <= probe["accuracy"] <= 100
    # the model's output as a pixel classifier sends square pixels where the attribution counted them
    output = out["pixel_classifiers"]["mask_classification"]["square_row_percent"]
    for name, n in out["square_pixels"]["predicted_as"].items():
        assert output[name] == pytest.approx(100.0 * n / expected, abs=0.051)  # the same argmax, rounded to 0.1
    assert set(out["pixel_classifiers"]["vision_language"]["iou"]) == set(model.class_names)
    # an untrained build of the same config (seed 0, as make_tiny_model) has the same L^VL classifier
    assert tool.initial_vision_language(cfg, "shapes_labeled") == {
        "dataset": "shapes_labeled", "seed": 0, **out["pixel_classifiers"]["vision_language"]}
    # the query probe: one row per image holding square or cross; the hook is gone afterwards
    cross = model.class_names.index("cross")
    holding = sum(1 for r in DatasetCatalog.get("shapes_labeled")
                  if np.isin(read_image(r["sem_seg_file_name"]).astype(np.int64), [square, cross]).any())
    probe = tool.query_presence_probe(cfg, model, fit="shapes_labeled", test="shapes_labeled")
    assert probe["fit_images"] == probe["test_images"] == holding
    assert all(0 <= probe[k] <= 100 for k in ("probe_accuracy", "head_accuracy", "constant_guess"))
    assert probe["constant_guess"] >= 50 and not model.transformer_decoder.decoder_norm._forward_hooks


def test_diagnose_reports_only_the_parts_asked_for(tool, single_thread, tmp_path):
    """``--parts decoder_queries`` on a run folder (config.yaml + model_final.pth): only that section, equal to
    :func:`decoder_query_geometry` of the model it holds; an unknown part is an error."""
    from hvlformer.checkpoint import HVLFormerCheckpointer
    from hvlformer.data.datasets.register_shapes import register_shapes_semi_split

    cfg = make_tiny_cfg(config=TINY_SEMI_PRETRAINED_CONFIG, small=SEMI_SMALL)
    register_shapes_semi_split(cfg)
    model = make_tiny_model(config=TINY_SEMI_PRETRAINED_CONFIG, small=SEMI_SMALL, train=False)
    with torch.no_grad():  # not the weights a fresh build would have
        model.transformer_decoder.query_level_pos.weight.mul_(0.5)
    HVLFormerCheckpointer(model, str(tmp_path)).save("model_final")
    (tmp_path / "config.yaml").write_text(cfg.dump())
    expected = tool.decoder_query_geometry(cfg, model)
    out = tool.main([str(tmp_path), "--parts", "decoder_queries"])["runs"][0]
    assert set(out) == {"run", "classes", "decoder_queries"} and out["decoder_queries"] == expected
    assert out["decoder_queries"]["images"] == 4  # SEMI_SMALL's val images
    with pytest.raises(ValueError, match="unknown parts"):
        tool.diagnose(tmp_path, parts=["decoder_queries", "everything"])
