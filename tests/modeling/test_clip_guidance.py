"""SEMI.CLIP_GUIDANCE_*: the frozen CLIP's zero-shot labels by hand, the guidance loss as l_mask against them
(CutMix box included), the training step's schedule, and a short semi run from the pretrained tiny CLIP."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from conftest import SEMI_SMALL, TINY_SEMI_CONFIG, TINY_SEMI_PRETRAINED_CONFIG
from hvlformer import build_trainer_class, setup_cfg
from hvlformer.modeling import cmcr as C
from hvlformer.modeling.clip_guidance import CLIPGuidance, GuidanceTargets, connected_regions, interior, relabel_objects


def test_targets_by_hand():
    """Two patches, two classes: a patch on class 1's embedding is a confident class-1 label; a patch halfway
    between the classes has probability 1/2 and is no target; padding is never a target."""
    guidance = CLIPGuidance(logit_scale=10.0, threshold=0.9)
    embeddings = torch.eye(2)                                  # K x C unit vectors
    dense = torch.tensor([[0.0, 3.0], [2.0, 3.0]]).view(1, 2, 1, 2)  # C x 1 x 2: patch 0 = (0, 2), patch 1 = (3, 3)
    out = guidance.targets(dense, embeddings, (1, 2))
    assert out.labels[0, 0, 0].item() == 1 and out.confident.tolist() == [[[True, False]]]
    expected = torch.softmax(torch.tensor([0.0, 10.0]), 0)  # s * cos = (0, 10) on patch 0
    torch.testing.assert_close(out.probs[0, :, 0, 0], expected)
    torch.testing.assert_close(out.probs[0, :, 0, 1], torch.tensor([0.5, 0.5]))
    padded = guidance.targets(dense, embeddings, (1, 2), padding=torch.tensor([[[True, True, False, False]]]))
    assert padded.confident.tolist() == [[[False, False]]]  # the padded half of the 1 x 4 image covers cell 0
    # the bilinear upsampling to the mask resolution comes before the softmax: 1 x 4 keeps the two ends
    wide = guidance.targets(dense, embeddings, (1, 4))
    assert wide.labels[0, 0, 0].item() == 1 and wide.confident[0, 0, 0] and not wide.confident[0, 0, 3]
    with pytest.raises(ValueError, match="THRESHOLD"):
        CLIPGuidance(logit_scale=1.0, threshold=0.0)
    with pytest.raises(ValueError, match="TEMPLATE"):
        CLIPGuidance(logit_scale=1.0, template="a photo")


def test_edge_margin_keeps_only_clip_object_interiors():
    """SEMI.CLIP_GUIDANCE_EDGE_MARGIN: a 4 x 4 class-1 block in an 8 x 8 class-0 map. Margin 1 keeps the block's
    2 x 2 centre and the background pixels at least 2 pixels from it (the map's border is no edge); margin 0
    keeps everything confident."""
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 2:6, 2:6] = 1
    kept = interior(labels, 2, 1)[0]
    expected = torch.ones(8, 8, dtype=torch.bool)
    expected[1:7, 1:7] = False
    expected[3:5, 3:5] = True
    assert torch.equal(kept, expected)
    assert interior(labels, 2, 2).sum().item() == 0  # every pixel is within 2 of the block's outline
    wide = torch.zeros(1, 8, 12, dtype=torch.long)
    wide[0, 2:6, 2:6] = 1
    assert interior(wide, 2, 2)[0, :, 8:].all() and interior(wide, 2, 2)[0, :, :8].sum().item() == 0
    # through CLIPGuidance.targets: patch embeddings on the class vectors, at the mask resolution already
    dense = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    for margin, count in ((0, 64), (1, 4 + 64 - 36)):
        out = CLIPGuidance(logit_scale=10.0, threshold=0.9, edge_margin=margin).targets(dense, torch.eye(2), (8, 8))
        assert torch.equal(out.labels, labels) and out.confident.sum().item() == count
    with pytest.raises(ValueError, match="EDGE_MARGIN"):
        CLIPGuidance(logit_scale=1.0, edge_margin=-1)


def test_connected_regions_are_8_connected_of_one_label_and_unique_over_the_batch():
    mask = torch.zeros(2, 5, 5, dtype=torch.bool)
    mask[0, 0:2, 0:2] = True
    mask[0, 2, 2] = True          # touches the first block diagonally: the same region
    mask[0, 4, 0:2] = True        # a second region
    mask[1, 0:2, 0:2] = True      # the same pixels in another image: another region
    regions = connected_regions(mask)
    assert (regions[~mask] == 0).all() and (regions[mask] > 0).all()
    assert regions[0, 0, 0] == regions[0, 2, 2] == regions[0, 1, 1]
    assert len({regions[0, 0, 0].item(), regions[0, 4, 0].item(), regions[1, 0, 0].item()}) == 3
    assert regions[0, 4, 0] == regions[0, 4, 1]
    # with labels, touching pixels of different labels are different regions, and equal labels still join
    labels = torch.zeros(2, 5, 5, dtype=torch.long)
    labels[0, 1, 1] = 3           # inside the first block: cuts it into {(1, 1)} and the rest, joined around it
    labels[0, 2, 2] = 3           # touches (1, 1) diagonally
    by_label = connected_regions(mask, labels)
    assert (by_label[~mask] == 0).all() and (by_label[mask] > 0).all()
    assert by_label[0, 1, 1] == by_label[0, 2, 2] != by_label[0, 0, 0]
    assert by_label[0, 0, 0] == by_label[0, 0, 1] == by_label[0, 1, 0]
    assert len({by_label[0, 0, 0].item(), by_label[0, 1, 1].item(), by_label[0, 4, 0].item(),
                by_label[1, 0, 0].item()}) == 4
    assert torch.equal(connected_regions(mask, torch.zeros_like(labels)), regions)


def _teacher_probs(labels: torch.Tensor, num_classes: int, top: float = 0.97) -> torch.Tensor:
    """``B x K x h x w`` with ``top`` on ``labels`` and the rest spread evenly."""
    rest = (1.0 - top) / (num_classes - 1)
    one_hot = torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()
    return one_hot * top + (1 - one_hot) * rest


def test_relabel_objects_renames_whole_regions_by_clips_majority_and_keeps_outline_and_confidence():
    """Classes: 0 background, 1 square, 2 cross, 3 star. Teacher: a 'cross' block where CLIP says square on 3 of
    4 pixels (renamed: the whole block, the teacher's confidence kept), a 'star' block where CLIP says background
    (kept: no renaming to background), a 'cross' block where CLIP is split 2 / 2 (kept: no majority), a 'square'
    block below the threshold (kept: not confident)."""
    labels = torch.zeros(1, 6, 8, dtype=torch.long)
    labels[0, 0:2, 0:2] = 2
    labels[0, 0:2, 4:6] = 3
    labels[0, 4:6, 0:2] = 2
    labels[0, 4:6, 4:6] = 1
    probs = _teacher_probs(labels, 4)
    probs[0, :, 4:6, 4:6] = _teacher_probs(torch.ones(1, 2, 2, dtype=torch.long), 4, top=0.6)[0]
    clip_labels = torch.zeros(1, 6, 8, dtype=torch.long)
    clip_labels[0, 0:2, 0:2] = 1
    clip_labels[0, 0, 0] = 2                     # 3 of 4 say square
    clip_labels[0, 4, 0:2] = 1                   # 2 square, 2 cross: no majority
    clip_labels[0, 5, 0:2] = 2
    clip_labels[0, 4:6, 4:6] = 2                 # the unconfident teacher block
    clip = GuidanceTargets(clip_labels, torch.ones(1, 6, 8, dtype=torch.bool), torch.zeros(1, 4, 6, 8))
    out = relabel_objects(probs, clip, threshold=0.95)
    expected = labels.clone()
    expected[0, 0:2, 0:2] = 1
    assert torch.equal(out.argmax(dim=1), expected)
    torch.testing.assert_close(out.max(dim=1).values, probs.max(dim=1).values)   # confidence and outline kept
    torch.testing.assert_close(out[0, 2, 0:2, 0:2], probs[0, 1, 0:2, 0:2])        # square and cross swapped
    torch.testing.assert_close(out[:, :, 2:, :], probs[:, :, 2:, :])              # everything else untouched
    torch.testing.assert_close(out[:, :, :, 2:], probs[:, :, :, 2:])
    # CLIP's votes count only where CLIP is confident: with the square votes unconfident, nothing is renamed
    unsure = GuidanceTargets(clip_labels, clip_labels != 1, clip.probs)
    torch.testing.assert_close(relabel_objects(probs, unsure, threshold=0.95), probs)


def _one_hot_layer(labels: torch.Tensor, num_classes: int, wrong: bool = False):
    """Decoder outputs (one query per class) whose per-class maps are one-hot on ``labels`` (``B x h x w``);
    ``wrong``: on the next class instead."""
    batch = labels.shape[0]
    logits = torch.full((batch, num_classes, num_classes + 1), -30.0)
    for k in range(num_classes):
        logits[:, k, k] = 30.0
    shown = (labels + 1) % num_classes if wrong else labels
    masks = torch.where(torch.nn.functional.one_hot(shown, num_classes).permute(0, 3, 1, 2).bool(), 30.0, -30.0)
    return {"pred_logits": logits, "pred_masks": masks}


def test_loss_is_l_mask_against_the_clip_labels_with_the_cutmix_box_from_the_other_image():
    torch.manual_seed(0)
    num_classes = 3
    labels = torch.stack([torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), 2)])
    confident = torch.ones(2, 4, 4, dtype=torch.bool)
    confident[0, 0, 0] = False
    targets = GuidanceTargets(labels, confident, torch.zeros(2, num_classes, 4, 4))
    padding = torch.zeros(2, 8, 8, dtype=torch.bool)
    box = torch.zeros(2, 8, 8, dtype=torch.bool)
    box[0, :4, :4] = True  # image 0's strong view holds image 1's top-left quarter
    order = torch.tensor([1, 0])
    guidance = CLIPGuidance(logit_scale=1.0, weak_weight=0.5, strong_weight=0.1)
    mixed = labels.clone()
    mixed[0, :2, :2] = 2
    right_weak, right_strong = _one_hot_layer(labels, num_classes), _one_hot_layer(mixed, num_classes)
    # views that predict CLIP's labels (and the pasted image's inside the box) cost nothing
    zero = guidance(targets, [right_weak] * 2, [right_strong] * 2, padding, box, order)["loss_clip_guidance"]
    assert zero.item() == pytest.approx(0.0, abs=1e-4)
    # a strong view that ignores the box pays on the box's confident cells (4 of image 0), weight 0.1, 2 layers
    unmixed = _one_hot_layer(labels, num_classes)
    terms = guidance(targets, [right_weak] * 2, [unmixed] * 2, padding, box, order)
    per_cell = 2 * -math.log(1e-6)  # two class maps at the clamp: the 1 that should be 0 and the 0 that should be 1
    assert terms["loss_clip_guidance"].item() == pytest.approx(2 * 0.1 * 4 * per_cell / 32, rel=1e-3)
    # a wrong weak view: every confident cell (31 of 32), weight 0.5; it equals CMCR's l_mask on CLIP's labels
    wrong = _one_hot_layer(labels, num_classes, wrong=True)
    loss = guidance(targets, [wrong], [right_strong], padding, box, order)["loss_clip_guidance"]
    expected = 0.5 * C.mask_consistency(C.view_probability_maps(wrong), labels, confident)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * 31 * per_cell / 32, rel=1e-3)
    assert terms["stat_clip_guidance_confident_fraction"].item() == pytest.approx(31 / 32)


def _trainer(tmp_path, config, *opts):
    cfg = setup_cfg(argparse.Namespace(config_file=config, opts=[*SEMI_SMALL, "OUTPUT_DIR", str(tmp_path), *opts]))
    return build_trainer_class(cfg)(cfg)


def test_guidance_needs_the_pretrained_clip_weights_of_at_least_zero_and_cmcr_targets_to_rename(tmp_path):
    with pytest.raises(ValueError, match="CLIP.PRETRAINED"):
        _trainer(tmp_path, TINY_SEMI_CONFIG, "SOLVER.MAX_ITER", "1", "SEMI.CLIP_GUIDANCE_WEIGHT", "0.2")
    with pytest.raises(ValueError, match="CLIP_GUIDANCE_WEIGHT / _FINAL_WEIGHT must be >= 0"):
        _trainer(tmp_path / "negative", TINY_SEMI_PRETRAINED_CONFIG, "SOLVER.MAX_ITER", "1",
                 "SEMI.CLIP_GUIDANCE_WEIGHT", "0.2", "SEMI.CLIP_GUIDANCE_FINAL_WEIGHT", "-0.1")
    # HierVL's entropy objective has no teacher targets to rename: an error, not a silent no-op
    with pytest.raises(ValueError, match="CLIP_RELABEL_OBJECTS renames the teacher's CMCR targets"):
        _trainer(tmp_path / "entropy", TINY_SEMI_PRETRAINED_CONFIG, "SOLVER.MAX_ITER", "1",
                 "MODEL.META_ARCHITECTURE", "HierVL", "MODEL.HIERVL.UNLABELED_LOSS", "entropy",
                 "SEMI.CLIP_RELABEL_OBJECTS", "True")
    with pytest.raises(ValueError, match="ORACLE_LABELS replaces the teacher's CMCR targets"):
        _trainer(tmp_path / "entropy_oracle", TINY_SEMI_PRETRAINED_CONFIG, "SOLVER.MAX_ITER", "1",
                 "MODEL.META_ARCHITECTURE", "HierVL", "MODEL.HIERVL.UNLABELED_LOSS", "entropy",
                 "SEMI.ORACLE_LABELS", "True")


def test_schedule_and_a_short_run_from_the_pretrained_clip(tmp_path):
    trainer = _trainer(tmp_path, TINY_SEMI_PRETRAINED_CONFIG, "SOLVER.MAX_ITER", "2", "SEMI.CLIP_GUIDANCE_WEIGHT", "0.2",
                       "SEMI.CLIP_GUIDANCE_FINAL_WEIGHT", "0.05", "SEMI.UNLABELED_RAMPUP_ITERS", "4")
    step = trainer._trainer
    assert [step.guidance_weight(i) for i in (0, 1, 2, 5)] == pytest.approx([0.2, 0.125, 0.05, 0.05])
    # the guidance's weight is the schedule times the unlabeled ramp-up; CMCR's terms get the ramp-up alone
    step.iter = 1
    losses, _ = step.loss_terms({"loss_clip_guidance": torch.tensor(1.0), "loss_cmcr_mask": torch.tensor(1.0),
                                 "loss_ce": torch.tensor(1.0)})
    assert {k: round(v.item(), 6) for k, v in losses.items()} == {
        "loss_clip_guidance": round(0.25 * 0.125, 6), "loss_cmcr_mask": 0.25, "loss_ce": 1.0}
    trainer.resume_or_load(resume=False)
    trainer.train()
    history = trainer.storage.histories()
    assert {"loss_clip_guidance", "clip_guidance_confident_fraction", "clip_guidance_agreement"} <= set(history)
    assert history["loss_clip_guidance"].latest() > 0
    assert 0.5 < history["clip_guidance_confident_fraction"].latest() <= 1.0  # the tiny CLIP is sure of most pixels
    # training only: the trained run loads for inference (predictor, demo, evaluation) without E_I^0 or guidance
    from hvlformer.predictor import HVLFormerPredictor

    cfg = trainer.cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(tmp_path / "model_final.pth")
    assert HVLFormerPredictor(cfg).model.clip_guidance is None
    # off by default: no module, no term
    plain = _trainer(tmp_path / "plain", TINY_SEMI_PRETRAINED_CONFIG, "SOLVER.MAX_ITER", "1")
    assert plain.model.clip_guidance is None and plain._trainer.guidance_weight(0) == 0.0
    cfg = plain.cfg.clone()
    cfg.defrost()
    cfg.SEMI.CLIP_GUIDANCE_EDGE_MARGIN = 2
    assert CLIPGuidance(**CLIPGuidance.from_config(cfg, clip_logit_scale=1.0)).edge_margin == 2


def test_relabel_objects_alone_trains_on_renamed_targets_without_the_guidance_loss(tmp_path):
    """SEMI.CLIP_RELABEL_OBJECTS with no guidance weight: CLIP's labels are computed and rename the teacher's
    objects (the share renamed is logged), and no guidance loss is trained. Then, on rendered `shapes` images,
    the drift it is meant to undo: teacher targets with every square pseudo-labelled cross get most squares
    back, and right targets stay nearly untouched."""
    from hvlformer.data.shapes import _image_rng, render_shapes_image
    from hvlformer.modeling.cmcr import LayerTargets
    from hvlformer.modeling.unlabeled_objective import clip_checked_targets

    trainer = _trainer(tmp_path, TINY_SEMI_PRETRAINED_CONFIG, "SOLVER.MAX_ITER", "2", "SEMI.CLIP_RELABEL_OBJECTS", "True")
    model = trainer.model
    guidance = model.clip_guidance
    assert guidance is not None and guidance.relabel_objects and not guidance.loss
    trainer.resume_or_load(resume=False)
    trainer.train()
    history = trainer.storage.histories()
    assert "loss_clip_guidance" not in history and "clip_guidance_confident_fraction" not in history
    assert {"clip_relabelled_fraction", "clip_guidance_agreement"} <= set(history)

    names = list(model.class_names)
    square, cross = names.index("square"), names.index("cross")
    rendered = [render_shapes_image(_image_rng(0, "relabel-test", i), 96, len(names), guaranteed_class=square)
                for i in range(8)]
    images = torch.stack([torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() for image, _ in rendered])
    labels = torch.stack([torch.from_numpy(label.astype(np.int64)) for _, label in rendered])
    small = torch.nn.functional.interpolate(labels[:, None].float(), size=(24, 24), mode="nearest")[:, 0].long()

    def renamed(teacher_labels):
        probs = torch.nn.functional.one_hot(teacher_labels, len(names)).permute(0, 3, 1, 2).float() * 0.97 + 0.005
        batch = {"image_original": images, "targets": [LayerTargets(probs, torch.zeros(1), torch.zeros(1))]}
        clip, out, stats = clip_checked_targets(model, batch, torch.zeros(8, 96, 96, dtype=torch.bool))
        # the agreement statistic: on the pixels confident for CLIP and for the teacher (0.97 >= the threshold, so
        # every pixel for the teacher), the share where the two name the same class
        both = clip.confident
        assert both.any()
        agreement = ((teacher_labels == clip.labels) & both).sum() / both.sum()
        assert stats["stat_clip_guidance_agreement"].item() == pytest.approx(agreement.item(), abs=1e-6)
        agreements.append(agreement.item())
        return out["targets"][0].probs.argmax(dim=1), stats["stat_clip_relabelled_fraction"].item()

    agreements = []

    drifted = torch.where(small == square, torch.full_like(small, cross), small)
    back, fraction = renamed(drifted)
    squares = small == square
    assert (back[squares] == square).float().mean() > 0.6          # most squares named square again
    assert (back[small == cross] == cross).float().mean() > 0.8    # the crosses stay cross
    assert fraction == pytest.approx((back != drifted).float().mean().item(), abs=1e-6) and fraction > 0
    kept, fraction = renamed(small)
    assert (kept == small).float().mean() > 0.95 and fraction == pytest.approx((kept != small).float().mean().item())
    assert 0.0 < agreements[0] < agreements[1] <= 1.0  # CLIP agrees more with the right labels than with the drifted


def test_prompt_embeddings_are_cached_per_vocabulary_and_forgotten_on_reset():
    """The guidance and the CLIP ensemble share :class:`PromptEmbeddings`: one text-tower pass per vocabulary,
    a new one after ``reset`` (a model resets it when its text tower's weights are loaded)."""
    from hvlformer.modeling.clip_ensemble import PromptEmbeddings

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token_embedding = torch.nn.Embedding(2, 2)

    class TextEncoder:
        tower = Tower()
        prompts = []

        def reference_embeddings(self, prompts):
            self.prompts.append(list(prompts))
            return torch.ones(len(prompts), 2)

    encoder, guidance = TextEncoder(), CLIPGuidance(logit_scale=1.0, template="a {} here")
    first = guidance.class_embeddings(encoder, ["cat", "dog"])
    assert guidance.class_embeddings(encoder, ["cat", "dog"]) is first
    guidance.class_embeddings(encoder, ["cat"])
    guidance.reset()
    guidance.class_embeddings(encoder, ["cat"])
    assert encoder.prompts == [["a cat here", "a dog here"], ["a cat here"], ["a cat here"]]
    assert isinstance(guidance._prompts, PromptEmbeddings)
