"""SEMI.ORACLE_LABELS, the diagnostic that trains l_mask on the unlabeled images' hidden labels: the mapper
keeps the label aligned with the views, the targets by hand, the unlabeled loss against the hidden labels, and
a short run on the `shapes` split (the only one that keeps its unlabeled images' labels)."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SEMI_SMALL, TINY_SEMI_CONFIG, semi_model_with_identical_views
from hvlformer import build_trainer_class, setup_cfg
from hvlformer.data import UnlabeledViewsMapper
from hvlformer.modeling import cmcr as C
from hvlformer.modeling.label_maps import downsample_labels
from hvlformer.modeling.unlabeled_objective import oracle_targets, unlabeled_losses

pytestmark = pytest.mark.usefixtures("single_thread")
NO_PHOTOMETRIC = ["SEMI.WEAK.BRIGHTNESS", "0.0", "SEMI.WEAK.CONTRAST", "0.0", "SEMI.WEAK.BLUR_PROB", "0.0",
                  "SEMI.STRONG.JITTER_PROB", "0.0", "SEMI.STRONG.GRAYSCALE_PROB", "0.0", "SEMI.STRONG.BLUR_PROB", "0.0"]


def _cfg(*opts):
    return setup_cfg(argparse.Namespace(config_file=TINY_SEMI_CONFIG,
                                        opts=[*SEMI_SMALL, "SOLVER.WARMUP_ITERS", "2", *opts]))


def test_the_hidden_label_follows_the_views_geometry(tmp_path):
    """The image's red channel encodes its label (40 x class): after random resize, crop, flip and padding the
    label still matches the original view's red channel, and is 255 exactly on the padding."""
    rng = np.random.default_rng(0)
    label = np.kron(rng.integers(0, 6, (5, 6)), np.ones((16, 16), dtype=np.int64)).astype(np.uint8)  # 80 x 96
    image = rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)
    image[..., 0] = label * 40
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(label).save(tmp_path / "label.png")
    record = {"file_name": str(tmp_path / "img.png"), "hidden_sem_seg_file_name": str(tmp_path / "label.png")}
    mapper = UnlabeledViewsMapper(_cfg("SEMI.ORACLE_LABELS", "True", "INPUT.RESIZE_RATIO_RANGE", "(0.5, 2.0)",
                                       *NO_PHOTOMETRIC))
    flipped = 0
    for seed in range(8):
        np.random.seed(seed)
        out = mapper(dict(record))
        oracle, padding = out["oracle_sem_seg"], out["padding"]
        assert oracle.dtype == torch.long and oracle.shape == padding.shape == out["image"].shape[1:]
        assert torch.equal(oracle == 255, padding)
        red = out["image"][0].long()
        unblended = ~padding & (red % 40 == 0)  # the bilinear resize blends the red channel at block edges
        assert unblended.float().sum() > 0.5 * (~padding).float().sum()
        assert (red[unblended] // 40 == oracle[unblended]).float().mean().item() > 0.95  # a flip apart: < 0.5
        flipped += int(out["image"][0, 0, 0] != image[0, 0, 0])
    assert flipped > 0
    # off by default; on, a record without its hidden label is a clear error
    assert "oracle_sem_seg" not in UnlabeledViewsMapper(_cfg())(dict(record))
    with pytest.raises(ValueError, match="hidden_sem_seg_file_name"):
        mapper({"file_name": record["file_name"]})
    Image.fromarray(label[:40]).save(tmp_path / "short.png")
    with pytest.raises(ValueError, match="sizes differ"):
        mapper({**record, "hidden_sem_seg_file_name": str(tmp_path / "short.png")})


def test_oracle_targets_by_hand():
    """One-hot hidden labels at each layer's resolution (each cell's centre), 255 = all zero (no target); the teacher's
    class and attention targets stay."""
    probs = torch.full((1, 3, 2, 2), 1.0 / 3)
    layers = [C.LayerTargets(probs, torch.randn(1, 4, 4), torch.randn(1, 4, 5)) for _ in range(2)]
    labels = torch.tensor([[[2, 2, 0, 0], [2, 2, 0, 0], [255, 255, 1, 1], [255, 255, 1, 1]]])
    out = oracle_targets(layers, labels)
    assert len(out) == 2
    for before, after in zip(layers, out):
        assert after.pred_logits is before.pred_logits and after.attn_maps is before.attn_maps
        expected = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]])
        torch.testing.assert_close(after.probs[0], expected)


def test_oracle_targets_sit_where_the_predictions_cells_are():
    """At stride 4 cell i holds pixels 4i..4i+3 (the predictions' point sampling, align_corners=False): an object
    on pixels 9..24 fills 3/4 of cell 2 and 1/4 of cell 6, so it is the target of cells 2-5. (The label of each
    cell's first pixel, mode "nearest", would say cells 3-6: 1.5 px towards the top-left, 3.5 at stride 8.)"""
    labels = torch.zeros(1, 96, 96, dtype=torch.long)
    labels[0, 9:25, 9:25] = 1
    layer = C.LayerTargets(torch.zeros(1, 2, 24, 24), torch.zeros(1, 4, 3), torch.zeros(1, 4, 5))
    target = oracle_targets([layer], labels)[0].probs[0, 1]
    assert target[2, 2:6].tolist() == [1.0] * 4 and target[6, 2:6].tolist() == [0.0] * 4
    assert target.sum() == 16
    # the same at stride 8 (12 x 12): the object covers cells 1-2 (pixels 8-23), half of cell 3's first pixel row
    coarse = downsample_labels(labels, (12, 12))[0]
    assert coarse[1:3, 1:3].eq(1).all() and coarse.sum() == 4
    # the target's centre of mass (cell centres 4i + 1.5) within a pixel of the object's (16.5); "nearest": 19.5
    rows = torch.arange(24).float() * 4 + 1.5
    assert (target.sum(1) * rows).sum() / target.sum() == pytest.approx(16.5, abs=1.0)


def test_l_mask_trains_on_the_hidden_labels_instead_of_the_teacher():
    """Weak = strong = original, no CutMix box, threshold 0.5: with the hidden labels, l_mask is the BCE of the
    prediction against them (not against its own argmax), and l_class / l_align (teacher's targets) stay 0."""
    cfg = _cfg("SEMI.CONFIDENCE_THRESHOLD", "0.5")
    model, unlabeled = semi_model_with_identical_views(cfg)
    images = unlabeled["image_original"]
    hidden = torch.randint(0, 6, (2, 64, 64))
    hidden[:, :, 48:] = 255
    unlabeled["oracle_sem_seg"] = hidden
    with torch.no_grad():
        losses = unlabeled_losses(model, unlabeled, model.encode_text())
        own = unlabeled_losses(model, {k: v for k, v in unlabeled.items() if k != "oracle_sem_seg"}, model.encode_text())
        outputs = model.predict(model.normalize(images), model.encode_text()).decoder_outputs()
    assert losses["loss_cmcr_class"].item() == pytest.approx(0.0, abs=1e-5)
    expected = 0.0
    for layer in C.layer_outputs(outputs):
        probs = C.class_probability_maps(layer["pred_logits"], layer["pred_masks"])
        small = downsample_labels(hidden, probs.shape[-2:])
        bce = C.mask_consistency(probs, small.clamp(max=5), small != 255)
        expected += (cfg.SEMI.MASK_WEIGHT_WEAK + cfg.SEMI.MASK_WEIGHT_STRONG) * bce.item()
    assert losses["loss_cmcr_mask"].item() == pytest.approx(cfg.SEMI.CMCR_WEIGHT * expected, rel=1e-4)
    assert abs(losses["loss_cmcr_mask"].item() - own["loss_cmcr_mask"].item()) > 0.1 * own["loss_cmcr_mask"].item()


def test_oracle_at_the_teachers_coverage_by_hand():
    """SEMI.ORACLE_COVERAGE teacher: the hidden label's class with the teacher's own confidence, per layer, so the
    threshold keeps exactly the teacher's confident pixels; at image resolution the confidence is upsampled."""
    labels = torch.tensor([[[2, 2, 0, 0], [2, 2, 0, 0], [255, 255, 1, 1], [255, 255, 1, 1]]])
    teacher = torch.tensor([[[[0.9, 0.1], [0.5, 0.2]], [[0.05, 0.3], [0.3, 0.2]], [[0.05, 0.6], [0.2, 0.6]]]])
    layers = [C.LayerTargets(teacher, torch.zeros(1, 4, 4), torch.zeros(1, 4, 5)),
              C.LayerTargets(teacher.flip(-1), torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))]
    out = oracle_targets(layers, labels, teacher_coverage=True)
    expected = torch.zeros(1, 3, 2, 2)
    expected[0, 2, 0, 0], expected[0, 0, 0, 1], expected[0, 1, 1, 1] = 0.9, 0.6, 0.6  # top probs 0.9, 0.6, -, 0.6
    torch.testing.assert_close(out[0].probs, expected)
    confidence, pseudo = out[0].probs.max(dim=1)
    assert (confidence >= 0.55).tolist() == [[[True, True], [False, True]]]  # the teacher's own confident cells
    assert pseudo[0, 0].tolist() == [2, 0]  # the hidden label's class, not the teacher's (0 and 2)
    # the second layer keeps its own (flipped) confidence
    torch.testing.assert_close(out[1].probs.amax(1)[0], torch.tensor([[0.6, 0.9], [0.0, 0.5]]))
    # at image resolution: every pixel's label, times the bilinearly upsampled confidence
    full = oracle_targets(layers[:1], labels, at_image_resolution=True, teacher_coverage=True)[0].probs
    upsampled = torch.nn.functional.interpolate(teacher, size=(4, 4), mode="bilinear", align_corners=False).amax(1)
    valid = labels != 255
    torch.testing.assert_close(full.amax(1)[valid], upsampled[valid])
    assert torch.equal(full.argmax(1)[valid], labels[valid]) and full.amax(1)[~valid].eq(0).all()
    # "all" (the default) ignores the teacher
    assert oracle_targets(layers[:1], labels)[0].probs.amax(1)[0].tolist() == [[1.0, 1.0], [0.0, 1.0]]


def test_oracle_at_the_teachers_coverage_through_the_model():
    """Through the model, threshold at the median of the teacher's confidences (all layers): l_mask is the BCE
    against the hidden labels on the teacher's confident cells only (half of them), not on all of them."""
    cfg = _cfg("SEMI.ORACLE_LABELS", "True", "SEMI.ORACLE_COVERAGE", "teacher")
    model, unlabeled = semi_model_with_identical_views(cfg)
    hidden = torch.randint(0, 6, (2, 64, 64))
    unlabeled["oracle_sem_seg"] = hidden
    with torch.no_grad():
        outputs = model.predict(model.normalize(unlabeled["image_original"]), model.encode_text()).decoder_outputs()
        layer_probs = [C.class_probability_maps(layer["pred_logits"], layer["pred_masks"])
                       for layer in C.layer_outputs(outputs)]
        threshold = torch.cat([probs.amax(1).flatten() for probs in layer_probs]).median().item()
        model.unlabeled_criterion.confidence_threshold = threshold
        losses = unlabeled_losses(model, unlabeled, model.encode_text())
        model.unlabeled_criterion.oracle_coverage = "all"
        everywhere = unlabeled_losses(model, unlabeled, model.encode_text())
    expected = 0.0
    for probs in layer_probs:
        small = downsample_labels(hidden, probs.shape[-2:])
        confident = probs.amax(1) >= threshold
        expected += (cfg.SEMI.MASK_WEIGHT_WEAK + cfg.SEMI.MASK_WEIGHT_STRONG) * C.mask_consistency(
            probs, small, confident).item()
    assert losses["loss_cmcr_mask"].item() == pytest.approx(cfg.SEMI.CMCR_WEIGHT * expected, rel=1e-4)
    assert losses["loss_cmcr_mask"].item() < 0.8 * everywhere["loss_cmcr_mask"].item()
    with pytest.raises(ValueError, match="ORACLE_COVERAGE"):
        C.CMCRLoss(oracle_coverage="confident")
    with pytest.raises(ValueError, match="needs SEMI.ORACLE_LABELS True"):  # a coverage without the oracle
        C.CMCRLoss(_cfg("SEMI.ORACLE_COVERAGE", "teacher"), 6)
    assert C.CMCRLoss(_cfg("SEMI.ORACLE_COVERAGE", "teacher", "SEMI.ORACLE_LABELS", "True"), 6).oracle_coverage == "teacher"


def test_l_mask_at_every_image_pixel_trains_on_each_pixels_hidden_label():
    """SEMI.MASK_CONSISTENCY_PIXELS >= H x W through the model: l_mask is the BCE of the maps upsampled to the
    image (bilinear, as inference) against every pixel's own hidden label, not the cells' labels."""
    cfg = _cfg("SEMI.CONFIDENCE_THRESHOLD", "0.5", "SEMI.MASK_CONSISTENCY_PIXELS", "100000")
    model, unlabeled = semi_model_with_identical_views(cfg)
    hidden = torch.randint(0, 6, (2, 64, 64))
    hidden[:, :, 48:] = 255
    unlabeled["oracle_sem_seg"] = hidden
    with torch.no_grad():
        losses = unlabeled_losses(model, unlabeled, model.encode_text())
        outputs = model.predict(model.normalize(unlabeled["image_original"]), model.encode_text()).decoder_outputs()
    expected = 0.0
    for layer in C.layer_outputs(outputs):
        probs = torch.nn.functional.interpolate(C.class_probability_maps(layer["pred_logits"], layer["pred_masks"]),
                                                size=(64, 64), mode="bilinear", align_corners=False)
        bce = C.mask_consistency(probs, hidden.clamp(max=5), hidden != 255)
        expected += (cfg.SEMI.MASK_WEIGHT_WEAK + cfg.SEMI.MASK_WEIGHT_STRONG) * bce.item()
    assert losses["loss_cmcr_mask"].item() == pytest.approx(cfg.SEMI.CMCR_WEIGHT * expected, rel=1e-4)


def test_a_short_run_reads_the_shapes_splits_hidden_labels(tmp_path):
    cfg = _cfg("SEMI.ORACLE_LABELS", "True", "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(tmp_path))
    trainer = build_trainer_class(cfg)(cfg)
    step = trainer._trainer
    _, unlabeled = step.next_batch()
    batch = step.unlabeled_batch(unlabeled)
    assert batch["oracle_sem_seg"].shape == batch["padding"].shape
    assert torch.equal(batch["oracle_sem_seg"].cpu() == 255, batch["padding"].cpu())  # `shapes` has no ignore
    assert set(batch["oracle_sem_seg"].unique().tolist()) - {255} <= set(range(6))
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.storage.histories()["loss_cmcr_mask"].latest() > 0
