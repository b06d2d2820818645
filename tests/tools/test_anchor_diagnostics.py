"""tools/anchor_diagnostics.py: the cosine summary by hand, and the fine-tuned tower put back into the
pretrained CLIP (the run's image weights, the pretrained text tower)."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_PRETRAINED_CONFIG, make_tiny_cfg, make_tiny_model


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
