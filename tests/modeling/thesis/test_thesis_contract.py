"""The thesis modules on the tensors the tiny HVLFormer really produces (docs/THESIS_MODULES.md, Integration):
modules built from the model's config fit its pixel-decoder levels, mask features, textual queries, dense CLIP
embedding and backbone outputs. The meta-architecture is only read (its ``predict`` outputs), not changed."""
import pytest
import torch
from detectron2.modeling import build_model

from hvlformer.data import register_shapes_from_cfg
from hvlformer.modeling.outputs import semantic_scores
from hvlformer.modeling.thesis import (
    CategoryFilter,
    ClassAwareAffinity,
    ClassLinearAttentionRefinement,
    ExtendedContextAwareClassifier,
    VisualFeatureFusion,
    caa_affinity_loss,
    caa_auxiliary_loss,
    downsample_labels,
    ecac_fuse_scores,
    ecac_kl_loss,
    scatter_filtered_scores,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model_outputs(tiny_cfg):
    cfg = tiny_cfg("MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER_TOP_K", "4")
    register_shapes_from_cfg(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        text = model.encode_text()
        outputs = model.predict(images, text)
    return cfg, model, images, text, outputs


def test_modules_fit_the_model_tensors(model_outputs):
    cfg, model, images, text, outputs = model_outputs
    num_classes, text_dim = text.shape
    labels = torch.randint(0, num_classes, (2, 64, 96))

    # CAA on the stride-8 pixel-decoder level
    _, multi_scale = model.pixel_decoder.forward_features(
        {k: v for k, v in outputs.features.items() if k in ("res2", "res3", "res4", "res5")})
    level = multi_scale[cfg.MODEL.HVLFORMER.CAA.LEVEL]
    assert level.shape[-2:] == (8, 12)
    caa = ClassAwareAffinity(cfg, text_dim=text_dim)
    caa_out = caa(level, text)
    assert torch.equal(caa_out["features"], level)  # identity at initialisation
    assert caa_affinity_loss(caa_out["affinity_logits"], downsample_labels(labels, (8, 12))) > 0
    assert caa_auxiliary_loss(caa_out["coarse_logits"], labels) > 0

    # ECAC on the mask features with the mask-classification soft masks
    scores = semantic_scores(outputs.pred_logits, outputs.pred_masks)
    mask_features = outputs.mask_features
    ecac = ExtendedContextAwareClassifier(cfg, text_dim=text_dim, num_classes=num_classes).train()
    ecac_out = ecac(mask_features, scores, text, labels)
    assert ecac_out["student_logits"].shape == scores.shape == (2, num_classes, 16, 24)
    assert torch.isfinite(ecac_kl_loss(ecac_out["student_logits"], ecac_out["teacher_logits"], ecac_out["labels"]))
    assert ecac_fuse_scores(scores, ecac_out["student_logits"], 0.5).shape == scores.shape

    # category filter on the dense CLIP embedding (joint space, same width as the text)
    dense = outputs.features["clip_dense"]
    kept = CategoryFilter(cfg)(dense, text)
    assert kept["indices"].shape == (2, 4)
    assert scatter_filtered_scores(scores[:, :4], kept["indices"], num_classes).shape == scores.shape

    # class refinement on the textual queries (B x E x K x D)
    queries = outputs.refined_queries
    assert torch.equal(ClassLinearAttentionRefinement(cfg)(queries), queries)

    # visual fusion on the backbone levels
    channels = {name: spec.channels for name, spec in model.backbone.output_shape().items()}
    fusion = VisualFeatureFusion(cfg, in_channels=channels)
    fused = fusion(images, outputs.features)
    for name in cfg.MODEL.HVLFORMER.LSMSEG.FUSION_LEVELS:
        assert fused[name].shape == outputs.features[name].shape
