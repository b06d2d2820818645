"""Semi-supervised pieces (paper Sec. 3.4 and Sec. 4.1): views, CutMix, CMCR, EMA, labeled repetition,
rare-class sampling, and short in-process runs of the SemiSupervisedTrainer (losses decrease, resume restores everything)."""
import argparse
import logging
import math

import numpy as np
import pytest
import torch
from detectron2.engine import HookBase
from PIL import Image

from conftest import SEMI_SMALL, TINY_SEMI_CONFIG, semi_model_with_identical_views
from hvlformer import build_trainer_class, setup_cfg
from hvlformer.cutmix import apply_cutmix, mix_spatial, sample_cutmix_box
from hvlformer.data import RareClassSampler, UnlabeledViewsMapper, rare_class_probabilities, repeat_to_length
from hvlformer.engine.ema import EMATeacher
from hvlformer.modeling import cmcr as C
from hvlformer.modeling.unlabeled_objective import unlabeled_losses

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = [*SEMI_SMALL, "SOLVER.WARMUP_ITERS", "2"]


# ----------------------------------------------------------------------------------------- views
def _views_cfg(*opts):
    return setup_cfg(argparse.Namespace(config_file=TINY_SEMI_CONFIG, opts=[*FAST, *opts]))


def _write_image(tmp_path, size=(48, 40)):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    return str(path)


def test_three_views_share_geometry(tmp_path):
    # photometric changes off: the three views must then be identical (same resize, crop, flip, pad)
    cfg = _views_cfg("SEMI.WEAK.BRIGHTNESS", "0.0", "SEMI.WEAK.CONTRAST", "0.0", "SEMI.WEAK.BLUR_PROB", "0.0",
                     "SEMI.STRONG.JITTER_PROB", "0.0", "SEMI.STRONG.GRAYSCALE_PROB", "0.0",
                     "SEMI.STRONG.BLUR_PROB", "0.0", "INPUT.RESIZE_RATIO_RANGE", "(0.5, 0.6)")
    mapper = UnlabeledViewsMapper(cfg)
    path = _write_image(tmp_path)
    for seed in range(5):
        np.random.seed(seed)
        out = mapper({"file_name": path})
        assert out["image"].shape == (3, 64, 64) and "sem_seg" not in out
        assert torch.equal(out["image"], out["image_weak"]) and torch.equal(out["image"], out["image_strong"])
        # long side 0.5-0.6 x 64 < 64: the crop is padded, the padding is marked and black
        assert out["padding"].any() and torch.all(out["image"][:, out["padding"]] == 0)
        content = ~out["padding"]  # the resized image is one rectangle (padding right/bottom, then the flip)
        rows, cols = content.any(1).nonzero(), content.any(0).nonzero()
        assert content.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_views_photometric_changes_keep_geometry(tmp_path):
    cfg = _views_cfg("SEMI.STRONG.JITTER_PROB", "1.0", "SEMI.WEAK.BLUR_PROB", "0.0", "SEMI.STRONG.BLUR_PROB", "0.0",
                     "SEMI.STRONG.GRAYSCALE_PROB", "0.0")
    mapper = UnlabeledViewsMapper(cfg)
    np.random.seed(3)
    torch.manual_seed(3)
    out = mapper({"file_name": _write_image(tmp_path, (128, 96))})
    original, weak, strong = (out[k].float().mean(0) for k in ("image", "image_weak", "image_strong"))
    assert not torch.equal(out["image"], out["image_strong"])
    # brightness/contrast/colour changes are monotone-ish per pixel: views stay strongly correlated
    for view in (weak, strong):
        corr = torch.corrcoef(torch.stack([original.flatten(), view.flatten()]))[0, 1]
        assert corr > 0.8


def test_cutmix_box_statistics():
    np.random.seed(0)
    h, w = 64, 80
    boxes = [sample_cutmix_box(h, w, prob=0.5, area=(0.02, 0.4), aspect=(0.3, 1 / 0.3)) for _ in range(3000)]
    used = [b for b in boxes if b.any()]
    assert abs(len(used) / len(boxes) - 0.5) < 0.04
    areas = np.array([b.float().mean().item() for b in used])
    assert areas.min() >= 0.015 and areas.max() <= 0.41
    assert abs(areas.mean() - 0.21) < 0.03  # U(0.02, 0.4) has mean 0.21 (clipping lowers it slightly)
    for box in used[:200]:
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        bh, bw = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert box.sum() == bh * bw  # a rectangle
        assert 0.2 <= (bh / bw).item() <= 4.0


def test_mixed_targets_follow_mixed_pixels():
    batch = 4
    images = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, 8, 8).clone()
    boxes = torch.zeros(batch, 8, 8, dtype=torch.bool)
    boxes[0, 2:5, 1:6] = True
    boxes[2, :, 4:] = True
    mixed, order = apply_cutmix(images, boxes)
    assert order.tolist() == [3, 2, 1, 0]  # the batch reversed
    labels = torch.arange(batch).view(batch, 1, 1).expand(batch, 8, 8)  # a label that names the source image
    mixed_labels = mix_spatial(labels[:, None], boxes, order)[:, 0]
    torch.testing.assert_close(mixed[:, 0].long(), mixed_labels)
    assert mixed_labels[0, 3, 3] == 3 and mixed_labels[0, 0, 0] == 0 and mixed_labels[2, 0, 7] == 1


# ----------------------------------------------------------------------------------------- CMCR
def _outputs(logits, masks, attns):
    """Decoder outputs with one attention map per layer (layer n attends to stride 32/16/8 for n % 3)."""
    aux = [{"pred_logits": logits, "pred_masks": masks, "attn_maps": None}]
    aux += [{"pred_logits": logits, "pred_masks": masks, "attn_maps": attn} for attn in attns[:-1]]
    return {"pred_logits": logits, "pred_masks": masks, "attn_maps": attns[-1], "aux_outputs": aux}


def test_cmcr_zero_for_identical_views():
    torch.manual_seed(0)
    batch, queries, classes, size = 2, 4, 3, 8
    logits = torch.randn(batch, queries, classes + 1)
    # masks that make the per-class maps one-hot: query k is class k with huge logits
    logits = torch.full((batch, queries, classes + 1), -40.0)
    for q in range(classes):
        logits[:, q, q] = 40.0
    logits[:, 3, classes] = 40.0
    region = torch.randint(0, classes, (batch, size, size))
    masks = torch.full((batch, queries, size, size), -40.0)
    for q in range(classes):
        masks[:, q][region == q] = 40.0
    # a 32 x 64 image: layer 0 attends to stride 32 (1 x 2 pixels), layer 1 to stride 16 (2 x 4)
    attns = [torch.softmax(torch.randn(batch, queries, n), -1) for n in (2, 8)]
    out = _outputs(logits, masks, attns)
    loss = C.CMCRLoss()
    targets = loss.targets(out)
    padding = torch.zeros(batch, 32, 64, dtype=torch.bool)
    terms = loss(targets, out, out, padding, torch.zeros_like(padding), torch.tensor([1, 0]))
    for key in ("loss_cmcr_mask", "loss_cmcr_class", "loss_cmcr_align"):
        assert terms[key].item() == pytest.approx(0.0, abs=1e-5), key
    assert terms["stat_confident_fraction"].item() == pytest.approx(1.0)


def test_cmcr_terms_match_hand_computation():
    # class consistency: JS between two known distributions
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    m = (p + q) / 2
    expected_js = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    assert C.js_divergence(p, q).item() == pytest.approx(expected_js.item(), rel=1e-5)
    logits_p, logits_q = p.log().view(1, 1, 2), q.log().view(1, 1, 2)
    assert C.class_consistency(logits_p, logits_q).item() == pytest.approx(expected_js.item(), rel=1e-5)
    # alignment: 1 - cos of two attention maps, with a masked pixel
    a, b = torch.tensor([[[0.5, 0.5, 0.0]]]), torch.tensor([[[0.5, 0.0, 0.5]]])
    assert C.align_consistency(a, b).item() == pytest.approx(0.5, abs=1e-6)
    assert C.align_consistency(a, b, torch.tensor([[True, False, False]])).item() == pytest.approx(0.0, abs=1e-6)
    # mask consistency: BCE of p = (0.8, 0.2) against one-hot class 0, summed over the two class maps
    probs = torch.tensor([0.8, 0.2]).view(1, 2, 1, 1)
    bce = C.mask_consistency(probs, torch.zeros(1, 1, 1, dtype=torch.long), torch.ones(1, 1, 1, dtype=torch.bool))
    assert bce.item() == pytest.approx(-2 * math.log(0.8), rel=1e-5)


def test_class_consistency_leaves_mixed_images_out_of_the_strong_term_when_asked():
    # two images, one decoder layer pair; only the strong view's class logits differ from the original's
    torch.manual_seed(0)
    batch, queries, classes = 2, 3, 2
    target_logits = torch.randn(batch, queries, classes + 1)
    strong_logits = target_logits.clone()
    strong_logits[0] += torch.tensor([3.0, -2.0, 0.0])  # image 0 (the mixed one) drifts
    strong_logits[1, :, 0] += 1.5                        # image 1 (unmixed) drifts too
    masks = torch.randn(batch, queries, 4, 4)
    attns = [torch.softmax(torch.randn(batch, queries, n), -1) for n in (2, 8)]
    original = _outputs(target_logits, masks, attns)
    strong = _outputs(strong_logits, masks, attns)
    padding = torch.zeros(batch, 32, 64, dtype=torch.bool)
    box = torch.zeros_like(padding)
    box[0, 4:12, 8:30] = True  # image 0 holds a CutMix box
    order = torch.tensor([1, 0])
    per_image = C.js_divergence(target_logits.softmax(-1), strong_logits.softmax(-1)).mean(dim=1)
    layers = 2  # aux_outputs[1:] + the final

    def class_term(class_on_mixed):
        loss = C.CMCRLoss(use_mask=False, use_align=False, class_on_mixed=class_on_mixed)
        return loss(loss.targets(original), original, strong, padding, box, order)["loss_cmcr_class"].item()

    # eq. 3 as written: both images, mean over the batch; mixed images left out: image 1's JS alone
    assert class_term(True) == pytest.approx(layers * per_image.mean().item(), rel=1e-5)
    assert class_term(False) == pytest.approx(layers * per_image[1].item(), rel=1e-5)
    assert per_image[0] > 2 * per_image[1]  # so the two settings really differ
    # no image mixed: both settings agree; every image mixed: the strong term is 0
    assert C.CMCRLoss(use_mask=False, use_align=False, class_on_mixed=False)(
        C.CMCRLoss().targets(original), original, strong, padding, torch.zeros_like(box), order
    )["loss_cmcr_class"].item() == pytest.approx(class_term(True), rel=1e-5)
    full_box = torch.ones_like(box)
    assert C.CMCRLoss(use_mask=False, use_align=False, class_on_mixed=False)(
        C.CMCRLoss().targets(original), original, strong, padding, full_box, order
    )["loss_cmcr_class"].item() == pytest.approx(0.0, abs=1e-7)


def test_class_consistency_mixed_comes_from_the_config():
    assert C.CMCRLoss(_views_cfg("SEMI.CLASS_CONSISTENCY_MIXED", "False"), num_classes=5).class_on_mixed is False
    assert C.CMCRLoss(_views_cfg(), num_classes=5).class_on_mixed is True  # the paper's eq. 3 as written


def _mask_term_gradients(mask_class_gradient):
    """l_mask of a weak view where query 0 (class 0) covers pixels whose pseudo-label is class 1: the loss and
    its gradients with respect to the view's class logits and mask logits."""
    batch, classes, size = 1, 2, 4
    logits = torch.full((batch, 3, classes + 1), -4.0)
    logits[:, 0, 0] = logits[:, 1, 1] = logits[:, 2, classes] = 4.0      # query 0: class 0, query 1: class 1
    masks = torch.full((batch, 3, size, size), -4.0)
    masks[:, 0] = 3.0                                                     # query 0 covers the whole image
    masks[:, 1, :, :2] = 1.0                                              # query 1 the left half, weakly
    original = _outputs(logits, masks, [torch.full((batch, 3, 2), 0.5)])
    pseudo_class_1 = logits.clone()
    pseudo_class_1[:, 0, 0], pseudo_class_1[:, 0, classes] = -4.0, 4.0   # teacher: query 0 says no-object
    teacher = _outputs(pseudo_class_1, masks, [torch.full((batch, 3, 2), 0.5)])
    weak_logits, weak_masks = logits.clone().requires_grad_(), masks.clone().requires_grad_()
    weak = _outputs(weak_logits, weak_masks, [torch.full((batch, 3, 2), 0.5)])
    loss = C.CMCRLoss(use_class=False, use_align=False, confidence_threshold=0.5, strong_weight=0.0,
                      mask_class_gradient=mask_class_gradient)
    padding = torch.zeros(batch, 32, 32, dtype=torch.bool)
    value = loss(loss.targets(teacher), weak, original, padding, torch.zeros_like(padding),
                 torch.zeros(batch, dtype=torch.long))["loss_cmcr_mask"]
    class_grad, mask_grad = torch.autograd.grad(value, [weak_logits, weak_masks], allow_unused=True)
    return value.item(), class_grad, mask_grad


def test_mask_consistency_class_gradient_switch():
    # paper eq. 2 as written: pixels pseudo-labeled class 1 under query 0's mask push query 0 towards
    # "no class 0 in this image" (its no-object logit gets a negative gradient: raising it lowers l_mask)
    value, class_grad, mask_grad = _mask_term_gradients(True)
    assert value > 0.1
    assert class_grad[0, 0, 2] < -1e-4 and class_grad[0, 0, 0] > 1e-4
    # detached: the same loss and the same mask gradients, and no gradient into any query's class decision
    detached_value, detached_class_grad, detached_mask_grad = _mask_term_gradients(False)
    assert detached_value == pytest.approx(value, rel=1e-6)
    assert detached_class_grad is None or detached_class_grad.abs().max() == 0
    assert torch.allclose(detached_mask_grad, mask_grad, atol=1e-7)
    assert mask_grad[0, 0].sum() > 1e-4                               # query 0's mask still shrinks there
    # the maps themselves do not depend on the switch
    layer = {"pred_logits": torch.randn(2, 4, 4), "pred_masks": torch.randn(2, 4, 3, 3)}
    assert torch.equal(C.view_probability_maps(layer, False), C.class_probability_maps(**layer))


def test_mask_consistency_class_gradient_comes_from_the_config():
    assert C.CMCRLoss(_views_cfg("SEMI.MASK_CONSISTENCY_CLASS_GRADIENT", "False"),
                      num_classes=5).mask_class_gradient is False
    assert C.CMCRLoss(_views_cfg(), num_classes=5).mask_class_gradient is True  # the paper's eq. 2 as written


def test_confidence_mask_drops_low_confidence_pixels():
    target = torch.tensor([[[[0.99, 0.6]], [[0.01, 0.4]]]])  # 1 x 2 classes x 1 x 2 pixels
    confidence, pseudo = target.max(1)
    confident = confidence >= 0.95
    assert confident.tolist() == [[[True, False]]]
    view_a = torch.tensor([[[[0.7, 0.1]], [[0.3, 0.9]]]])
    view_b = torch.tensor([[[[0.7, 0.9]], [[0.3, 0.1]]]])  # differs only at the unconfident pixel
    loss_a = C.mask_consistency(view_a, pseudo, confident)
    assert loss_a.item() == pytest.approx(C.mask_consistency(view_b, pseudo, confident).item())
    # paper supplement eq. 2: averaged over both pixels, the unconfident one contributing zero
    assert loss_a.item() == pytest.approx(-2 * math.log(0.7) / 2, rel=1e-5)
    nothing = C.mask_consistency(view_a, pseudo, torch.zeros_like(confident))
    assert nothing.item() == 0.0


def test_entropy_alternative():
    uniform = torch.full((1, 4, 2, 2), 0.25)
    assert C.entropy_loss(uniform).item() == pytest.approx(math.log(4), rel=1e-5)
    one_hot = torch.zeros(1, 4, 2, 2)
    one_hot[:, 1] = 1
    assert C.entropy_loss(one_hot).item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------- EMA, sampling
def test_ema_update_follows_the_formula():
    student = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    teacher = EMATeacher(student, decay=0.9)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(5.0)
        student[1].num_batches_tracked.fill_(7)
    teacher.update(student)
    after = teacher.model.state_dict()
    student_state = student.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.running_mean"):
        torch.testing.assert_close(after[key], 0.9 * before[key] + 0.1 * student_state[key])
    assert after["1.num_batches_tracked"].item() == 7  # integer buffers are copied
    assert not any(p.requires_grad for p in teacher.model.parameters())




def test_ema_warm_up_averages_the_student_until_the_decay_is_reached():
    # d_t = min(d, 1 - 1/(t+1)): iteration 0 copies the student, then the teacher is the running mean
    student = torch.nn.Linear(1, 1, bias=False)
    teacher = EMATeacher(student, decay=0.9)
    assert [teacher.decay_at(t) for t in (0, 1, 3, 9, 10, 500)] == pytest.approx([0.0, 0.5, 0.75, 0.9, 0.9, 0.9])
    weights = [3.0, 5.0, 10.0]
    for iteration, value in enumerate(weights):
        with torch.no_grad():
            student.weight.fill_(value)
        teacher.update(student, iteration)
    assert teacher.model.weight.item() == pytest.approx(sum(weights) / len(weights))
    with torch.no_grad():
        student.weight.fill_(0.0)
    teacher.update(student, 50)  # past the warm-up: the constant decay
    assert teacher.model.weight.item() == pytest.approx(0.9 * 6.0)


def test_ema_decay_range_and_a_backbone_without_a_reference():
    """Decay 0 and 1 are allowed (1: a frozen teacher), values outside [0, 1] are not; a model whose ``backbone`` has
    no frozen reference tower to drop gets a teacher too."""
    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(2, 2)
    for decay in (0.0, 1.0):
        teacher = EMATeacher(model, decay=decay)
        assert teacher.decay_at(None) == decay and teacher.decay_at(1000) == min(decay, 1 - 1 / 1001)
    teacher_frozen = EMATeacher(torch.nn.Sequential(torch.nn.Linear(2, 2)), decay=1.0)
    before = teacher_frozen.model[0].weight.clone()
    student = torch.nn.Sequential(torch.nn.Linear(2, 2))
    teacher_frozen.update(student)
    torch.testing.assert_close(teacher_frozen.model[0].weight, before)  # decay 1 at iteration None: unchanged
    for decay in (-0.01, 1.01):
        with pytest.raises(ValueError, match="SEMI.EMA_DECAY"):
            EMATeacher(model, decay=decay)


class _BackboneWithReference(torch.nn.Module):
    """A backbone with a frozen reference tower E_I^0 that a copy can drop (as the CLIP backbone's)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)
        self.reference = torch.nn.Linear(2, 2)

    def drop_reference(self) -> None:
        self.reference = None


def test_ema_teacher_drops_the_frozen_reference_unless_the_ensemble_runs_it():
    """The teacher never runs E_I^0, so its copy is dropped; with TEST.CLIP_ENSEMBLE the teacher's evaluation runs
    it, and it shares the student's tower (one object, not a second copy)."""
    student = torch.nn.Module()
    student.backbone = _BackboneWithReference()
    student.clip_ensemble = None
    assert EMATeacher(student).model.backbone.reference is None
    student.clip_ensemble = torch.nn.Identity()
    teacher = EMATeacher(student)
    assert teacher.model.backbone.reference is student.backbone.reference
    assert teacher.model.backbone.layer is not student.backbone.layer  # the rest is a copy


def test_ema_keeps_infinite_buffers_finite_where_they_agree():
    # attention-mask buffers hold -inf; 0 * -inf at iteration 0 must not become NaN
    student = torch.nn.Linear(1, 1)
    student.register_buffer("mask", torch.tensor([float("-inf"), 1.0]))
    teacher = EMATeacher(student, decay=0.5)
    teacher.update(student, 0)
    with torch.no_grad():
        student.mask[1] = 3.0
    teacher.update(student, 5)
    assert teacher.model.mask[0].item() == float("-inf")
    assert teacher.model.mask[1].item() == pytest.approx(2.0)
def test_labeled_list_repeats_to_the_unlabeled_length():
    labeled = [{"id": i} for i in range(3)]
    repeated = repeat_to_length(labeled, 8)
    assert [d["id"] for d in repeated] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert repeat_to_length(labeled, 2) == labeled  # never shorter than the labeled list
    with pytest.raises(ValueError):
        repeat_to_length([], 4)


def test_rare_class_sampling_prefers_rare_classes():
    # 100 images: class 0 everywhere (common), class 1 in 90 images, class 2 (rare) in 5 images
    counts = np.zeros((100, 3), dtype=np.int64)
    counts[:, 0] = 50000
    counts[:90, 1] = 20000
    counts[95:, 2] = 4000
    probabilities, eligible = rare_class_probabilities(counts, temperature=0.01, min_pixels=3000)
    assert probabilities[2] > probabilities[1] > probabilities[0]
    sampler = iter(RareClassSampler(counts, temperature=0.01, min_pixels=3000, seed=0))
    draws = [next(sampler) for _ in range(2000)]
    rare_share = np.mean([counts[i, 2] > 0 for i in draws])
    assert rare_share > 0.5  # uniform sampling would give 5 %
    with pytest.raises(ValueError, match="MIN_PIXELS"):
        rare_class_probabilities(counts, min_pixels=10**9)


# ----------------------------------------------------------------------------------------- trainer
def _trainer(tmp_path, *opts):
    cfg = setup_cfg(argparse.Namespace(config_file=TINY_SEMI_CONFIG, opts=[*FAST, "OUTPUT_DIR", str(tmp_path), *opts]))
    trainer_class = build_trainer_class(cfg)
    assert trainer_class.__name__ == "SemiSupervisedTrainer"
    return trainer_class(cfg)


class _AfterStep(HookBase):
    """Calls ``fn(storage)`` after every step of ``trainer.train()`` (after the default hooks)."""

    def __init__(self, fn):
        self.fn = fn

    def after_step(self):
        self.fn(self.trainer.storage)


def _train(trainer, after_step=None):
    """``trainer.train()`` from scratch, with ``after_step(storage)`` after every step; returns the storage."""
    trainer.resume_or_load(resume=False)
    if after_step is not None:
        trainer.register_hooks([_AfterStep(after_step)])
    trainer.train()
    return trainer.storage


def test_short_semi_run_decreases_losses(tmp_path):
    trainer = _trainer(tmp_path, "SOLVER.MAX_ITER", "80", "SOLVER.BASE_LR", "0.001")
    totals, cmcr = [], []

    def record(storage):
        history = storage.histories()
        totals.append(history["total_loss"].latest())
        cmcr.append(sum(history[k].latest() for k in ("loss_cmcr_class", "loss_cmcr_align")))

    storage = _train(trainer, record)
    assert len(totals) == 80
    assert "confident_fraction" in storage.histories() and "sre_mean_unlabeled" in storage.histories()
    assert np.mean(totals[-10:]) < 0.85 * np.mean(totals[:10])
    assert all(np.isfinite(cmcr))


# HierVL's entropy minimisation (its other options off)
HIERVL_ENTROPY = ["MODEL.META_ARCHITECTURE", "HierVL", "MODEL.HIERVL.UNLABELED_LOSS", "entropy",
                  "MODEL.HIERVL.NUM_INSTANCE_QUERIES", "0", "MODEL.HIERVL.TEXT_CROSS_ATTENTION", "False",
                  "MODEL.HIERVL.PROMPT_WEIGHT", "0.0", "MODEL.HIERVL.MASKED_VL_WEIGHT", "0.0"]


@pytest.mark.parametrize("opts", [HIERVL_ENTROPY,
                                  ["SEMI.MASK_CONSISTENCY", "False", "SEMI.ALIGN_CONSISTENCY", "False"],
                                  ["SEMI.RARE_CLASS_SAMPLING.ENABLED", "True",
                                   "SEMI.RARE_CLASS_SAMPLING.MIN_PIXELS", "50"]])
def test_semi_variants_run(tmp_path, opts):
    trainer = _trainer(tmp_path, "SOLVER.MAX_ITER", "1", *opts)
    names = set(_train(trainer).histories())
    if "entropy" in opts:
        assert "loss_entropy" in names and "loss_cmcr_class" not in names
    elif "SEMI.MASK_CONSISTENCY" in opts:
        assert "loss_cmcr_class" in names and "loss_cmcr_mask" not in names and "loss_cmcr_align" not in names
    else:
        assert (tmp_path / "rare_class_counts.json").exists()


def test_resume_restores_student_teacher_and_optimizer(tmp_path):
    opts = ["SEMI.TEACHER", "ema", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"]
    trainer = _trainer(tmp_path, *opts)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert (tmp_path / "model_0000001.pth").exists()
    student = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    optimizer_state = trainer.optimizer.state_dict()
    # the teacher moved away from the student, so restoring it is a real check
    assert any(not torch.equal(student[k], teacher[k]) for k in student if student[k].is_floating_point())

    resumed = _trainer(tmp_path, *opts)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    assert resumed.teacher.loaded_from_checkpoint
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, student[key])
    for key, value in resumed.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher[key])
    restored = resumed.optimizer.state_dict()
    for index, state in optimizer_state["state"].items():
        torch.testing.assert_close(restored["state"][index]["exp_avg"], state["exp_avg"])


CMCR_TERMS = ("loss_cmcr_align", "loss_cmcr_class", "loss_cmcr_mask")


@pytest.mark.parametrize("opts, factors, unlabeled_steps", [
    # ramp-up: factor 0 at step 0, where the unlabeled views are skipped; the terms from step 1 on
    (("SOLVER.MAX_ITER", "3", "SEMI.UNLABELED_RAMPUP_ITERS", "4"),
     {0: 0.0, 1: 0.25, 2: 0.5, 4: 1.0, 9: 1.0}, {0: False, 1: True, 2: True}),
    # burn-in: the labeled batch alone until the start iteration, then the full unlabeled terms
    (("SOLVER.MAX_ITER", "4", "SEMI.UNLABELED_START_ITER", "2"),
     {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0, 9: 1.0}, {0: False, 1: False, 2: True, 3: True}),
], ids=["ramp_up", "burn_in"])
def test_the_unlabeled_losses_follow_the_ramp_up_and_the_burn_in(tmp_path, opts, factors, unlabeled_steps):
    trainer = _trainer(tmp_path, *opts)
    assert {i: trainer._trainer.unlabeled_ramp(i) for i in factors} == factors
    logged = {}
    _train(trainer, lambda storage: logged.setdefault(
        storage.iter, tuple(k for k in CMCR_TERMS if k in storage.histories())))
    assert logged == {i: CMCR_TERMS if on else () for i, on in unlabeled_steps.items()}


def test_the_ramp_up_counts_from_the_end_of_the_burn_in(tmp_path):
    trainer = _trainer(tmp_path, "SOLVER.MAX_ITER", "1", "SEMI.UNLABELED_START_ITER", "10",
                       "SEMI.UNLABELED_RAMPUP_ITERS", "4")
    assert [trainer._trainer.unlabeled_ramp(i) for i in (9, 10, 11, 12, 14, 20)] == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="UNLABELED_START_ITER"):
        _trainer(tmp_path / "negative", "SOLVER.MAX_ITER", "1", "SEMI.UNLABELED_START_ITER", "-1")


def test_self_teacher_targets_come_from_the_original_view_inside_the_forward():
    # the model is its own teacher: with weak = strong = original and no CutMix box, the class and
    # attention terms vanish, and l_mask is the BCE of the prediction against its own argmax
    cfg = _views_cfg("SEMI.CONFIDENCE_THRESHOLD", "0.0")
    model, unlabeled = semi_model_with_identical_views(cfg)
    images = unlabeled["image_original"]
    with torch.no_grad():
        losses = unlabeled_losses(model, unlabeled, model.encode_text())
        outputs = model.predict(model.normalize(images), model.encode_text()).decoder_outputs()
    assert losses["loss_cmcr_class"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["loss_cmcr_align"].item() == pytest.approx(0.0, abs=1e-5)
    expected = 0.0
    for layer in C.layer_outputs(outputs):
        probs = C.class_probability_maps(layer["pred_logits"], layer["pred_masks"])
        confident = torch.ones(probs.shape[0], *probs.shape[2:], dtype=torch.bool)
        bce = C.mask_consistency(probs, probs.argmax(1), confident)
        expected += (cfg.SEMI.MASK_WEIGHT_WEAK + cfg.SEMI.MASK_WEIGHT_STRONG) * bce.item()
    assert losses["loss_cmcr_mask"].item() == pytest.approx(cfg.SEMI.CMCR_WEIGHT * expected, rel=1e-4)


# ------------------------------------------------------------------------------ distribution alignment
def test_distribution_alignment_prior_follows_the_labeled_pixels():
    criterion = C.CMCRLoss(distribution_alignment_classes=3, distribution_alignment_momentum=0.9)
    first = torch.tensor([[[0, 0, 1, 255]]])  # ignore left out: frequencies 2/3, 1/3, 0
    criterion.observe_labels(first, ignore_value=255)
    torch.testing.assert_close(criterion.labeled_class_prior, torch.tensor([2 / 3, 1 / 3, 0.0]))  # copied
    criterion.observe_labels(torch.tensor([[[2, 2]]]), ignore_value=255)  # m_1 = min(0.9, 1/2) = 0.5
    torch.testing.assert_close(criterion.labeled_class_prior, torch.tensor([1 / 3, 1 / 6, 0.5]))
    for _ in range(3):  # m_t reaches 0.9 from t = 9 on; here t = 2, 3, 4: 2/3, 3/4, 4/5
        criterion.observe_labels(torch.tensor([[[0]]]), ignore_value=255)
    expected = torch.tensor([1 / 3, 1 / 6, 0.5]) * (2 / 3 * 3 / 4 * 4 / 5) + torch.tensor([1.0, 0, 0]) * (1 - 0.4)
    torch.testing.assert_close(criterion.labeled_class_prior, expected)
    assert "labeled_class_prior" in criterion.state_dict()  # checkpointed; and absent when switched off
    assert "labeled_class_prior" not in C.CMCRLoss().state_dict()


def test_distribution_alignment_gives_the_under_predicted_class_its_share():
    # background, circle, triangle; the labeled pixels are 10 / 45 / 45 %. The model calls every foreground
    # pixel "circle": clearly on half of them, narrowly (0.5 vs 0.4) on the triangles.
    criterion = C.CMCRLoss(distribution_alignment_classes=3)
    criterion.observe_labels(torch.tensor([0] * 2 + [1] * 9 + [2] * 9).view(1, 4, 5), ignore_value=255)
    clear, narrow = torch.tensor([0.1, 0.8, 0.1]), torch.tensor([0.1, 0.5, 0.4])
    probs = torch.stack([clear, clear, narrow, narrow], dim=1).view(1, 3, 2, 2)
    assert probs.argmax(dim=1).flatten().tolist() == [1, 1, 1, 1]
    aligned = criterion.align_distribution(probs)
    # mean prediction (0.1, 0.65, 0.25): circle x 0.45 / 0.65, triangle x 0.45 / 0.25
    assert aligned.argmax(dim=1).flatten().tolist() == [1, 1, 2, 2]
    narrow_aligned = torch.tensor([0.1, 0.5 * 0.45 / 0.65, 0.4 * 0.45 / 0.25])
    torch.testing.assert_close(aligned[0, :, 1, 0], narrow_aligned / narrow_aligned.sum())
    torch.testing.assert_close(aligned.sum(dim=1), torch.ones(1, 2, 2))
    # padded cells do not count in the mean prediction
    padded_probs = torch.cat([probs, torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2)], dim=2)
    padding = torch.zeros(1, 3, 2, dtype=torch.bool)
    padding[0, 2] = True
    torch.testing.assert_close(criterion.align_distribution(padded_probs, padding)[:, :, :2], aligned)


def test_distribution_alignment_in_a_semi_step(tmp_path):
    trainer = _trainer(tmp_path, "SOLVER.MAX_ITER", "1", "SEMI.DISTRIBUTION_ALIGNMENT", "True")
    criterion = trainer.model.unlabeled_criterion
    assert "loss_cmcr_mask" in _train(trainer).histories()
    # the labeled batch was observed: a distribution over the classes, background the largest share
    assert int(criterion.prior_updates) == 1
    assert criterion.labeled_class_prior.sum().item() == pytest.approx(1.0)
    assert int(criterion.labeled_class_prior.argmax()) == 0
    with pytest.raises(ValueError, match="DISTRIBUTION_ALIGNMENT_MOMENTUM"):
        C.CMCRLoss(distribution_alignment_classes=3, distribution_alignment_momentum=1.0)


def test_console_line_shows_the_semi_supervised_statistics(tmp_path, caplog):
    """confident_fraction, the SRE means and the CMCR terms are in the console line, not only metrics.json."""
    from detectron2.utils.events import CommonMetricPrinter

    from hvlformer.engine.semi_trainer import SemiMetricPrinter

    trainer = _trainer(tmp_path, "SOLVER.MAX_ITER", "2")  # the trainer's own printer writes "iter: 1"
    printers = [w for w in trainer.build_writers() if isinstance(w, CommonMetricPrinter)]
    assert len(printers) == 1 and isinstance(printers[0], SemiMetricPrinter)

    def write_console_line(storage):
        storage.put_scalar("lr", 1e-4, smoothing_hint=False)  # as the LRScheduler hook puts it
        printers[0].logger = logging.getLogger("hvlformer.test_console")  # detectron2's does not propagate
        with caplog.at_level(logging.INFO):
            printers[0].write()

    _train(trainer, write_console_line)
    lines = [r.getMessage() for r in caplog.records if "iter: 0" in r.getMessage()]
    assert len(lines) == 1
    for key in ("loss_cmcr_mask: ", "loss_cmcr_class: ", "loss_cmcr_align: ", "confident_fraction: ",
                "sre_mean_labeled: ", "sre_mean_unlabeled: ", "lr: 0.0001"):
        assert key in lines[0], (key, lines[0])
