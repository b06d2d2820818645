"""ECAC (thesis chapter 4): centres, memory EMA, re-weighting, calibration, the losses of eqs. 4.12-4.20,
teacher only with labels, vocabulary changes, config construction."""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

from hvlformer import add_hvlformer_config
from hvlformer.modeling.thesis import (
    ExtendedContextAwareClassifier,
    ecac_fuse_scores,
    ecac_intra_variance_loss,
    ecac_kl_loss,
    ecac_memory_loss,
    ecac_reweighted_ce,
    masked_class_means,
    reweighting_class_weights,
)


def make(**kwargs):
    torch.manual_seed(0)
    args = dict(feature_dim=8, text_dim=4, num_classes=3)
    args.update(kwargs)
    return ExtendedContextAwareClassifier(**args)


def test_masked_class_means_by_hand():
    features = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]])                  # B=1, d=1, 2x2
    weights = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.5, 0.0], [0.0, 0.5]]]])
    centres = masked_class_means(features, weights)
    assert centres[0, :, 0].tolist() == pytest.approx([2.0, 0.0, 4.0])   # mean(1,3); empty -> 0; (0.5+3.5)/1


def test_reweighting_weights_by_hand():
    assert reweighting_class_weights(torch.tensor([1.0, 4.0]), 0.5).tolist() == pytest.approx([2 / 3, 1 / 3])
    assert reweighting_class_weights(torch.tensor([10.0, 30.0, 60.0]), 0.0).tolist() == pytest.approx([1 / 3] * 3)
    inverse = reweighting_class_weights(torch.tensor([1.0, 3.0]), 1.0)
    assert inverse.tolist() == pytest.approx([0.75, 0.25])
    # an unseen class gets the weight of the rarest seen class, not infinity
    assert reweighting_class_weights(torch.tensor([0.0, 1.0, 4.0]), 1.0).tolist() == pytest.approx([4 / 9, 4 / 9, 1 / 9])


def test_reweighted_ce_is_the_weighted_mean():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0, 0] = 255
    weights = torch.tensor([0.5, 0.3, 0.2])
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    valid = labels != 255
    w = weights[labels.clamp(max=2)] * valid
    expected = (per_pixel * w).sum() / w.sum()
    assert ecac_reweighted_ce(logits, labels, weights).item() == pytest.approx(expected.item(), rel=1e-5)


def test_memory_ema_update_by_hand():
    ecac = make(feature_dim=1, momentum=0.25)
    features = torch.tensor([[[[2.0, 4.0], [10.0, 0.0]]]])
    labels = torch.tensor([[[0, 0], [1, 255]]])
    ecac.update_memory(features, labels)
    assert ecac.memory[:, 0].tolist() == [3.0, 10.0, 0.0]                   # first observation: copied
    assert ecac.memory_initialized.tolist() == [True, True, False]
    ecac.update_memory(torch.tensor([[[[7.0, 7.0], [2.0, 2.0]]]]), torch.tensor([[[0, 0], [2, 2]]]))
    assert ecac.memory[:, 0].tolist() == pytest.approx([0.75 * 3 + 0.25 * 7, 10.0, 2.0])  # EMA, untouched, copy
    assert ecac.class_pixel_counts.tolist() == [4.0, 1.0, 2.0]
    assert int(ecac.num_updates) == 2


def test_memory_loss_starts_after_the_configured_updates():
    ecac = make(memory_start_iter=2).train()
    features, soft = torch.randn(1, 8, 4, 4), torch.rand(1, 3, 4, 4)
    text, labels = torch.randn(3, 4), torch.randint(0, 3, (1, 4, 4))
    assert "memory_logits" not in ecac(features, soft, text, labels)
    assert "memory_logits" not in ecac(features, soft, text, labels)
    out = ecac(features, soft, text, labels)
    assert int(ecac.num_updates) == 3 and "memory_logits" in out
    expected = torch.einsum("kd,bdhw->bkhw", F.normalize(ecac.memory, dim=-1), F.normalize(features, dim=1)) / 0.1
    # the memory logits use the memory BEFORE this iteration's update (features are the same, so equal)
    assert torch.allclose(out["memory_logits"], expected, atol=1e-5)


def test_teacher_needs_labels_and_eval_does_not_update():
    ecac = make().eval()
    features, soft, text = torch.randn(2, 8, 4, 4), torch.rand(2, 3, 4, 4), torch.randn(3, 4)
    out = ecac(features, soft, text)
    assert set(out) == {"student_logits"} and int(ecac.num_updates) == 0
    out = ecac(features, soft, text, torch.randint(0, 3, (2, 8, 8)))
    assert out["teacher_logits"].shape == (2, 3, 4, 4) and out["labels"].shape == (2, 4, 4)
    assert int(ecac.num_updates) == 0  # eval: no memory update


def test_teacher_uses_ground_truth_centres():
    ecac = make(calibration=False).train()
    features, text = torch.randn(1, 8, 2, 2), torch.randn(3, 4)
    labels = torch.tensor([[[0, 0], [1, 2]]])
    one_hot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    # a student whose soft masks ARE the ground truth gives exactly the teacher's logits (same classifier)
    out = ecac(features, one_hot, text, labels)
    assert torch.allclose(out["student_logits"], out["teacher_logits"], atol=1e-6)
    out = ecac(features, torch.full((1, 3, 2, 2), 1 / 3), text, labels)
    assert not torch.allclose(out["student_logits"], out["teacher_logits"], atol=1e-4)


def test_calibration_is_scale_and_offset_per_class():
    plain = make(calibration=False).eval()
    calibrated = make(calibration=True).eval()
    calibrated.load_state_dict(plain.state_dict())
    with torch.no_grad():
        calibrated.student_gamma.copy_(torch.tensor([2.0, 1.0, 0.5]))
        calibrated.student_delta.copy_(torch.tensor([1.0, 0.0, -3.0]))
    features, soft, text = torch.randn(1, 8, 3, 3), torch.rand(1, 3, 3, 3), torch.randn(3, 4)
    raw = plain(features, soft, text)["student_logits"]
    out = calibrated(features, soft, text)["student_logits"]
    expected = raw * torch.tensor([2.0, 1.0, 0.5])[None, :, None, None] + torch.tensor([1.0, 0.0, -3.0])[None, :, None, None]
    assert torch.allclose(out, expected, atol=1e-5)


def test_kl_loss_by_hand():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 0], [1, 255]]])
    assert ecac_kl_loss(logits, logits, labels).item() == pytest.approx(0.0, abs=1e-6)
    student, teacher = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    p_t = teacher.softmax(1)
    kl = (p_t * (p_t.log() - student.log_softmax(1))).sum(1)[0]
    entropy = -(p_t * p_t.log()).sum(1)[0]
    class0 = (entropy[0, 0] * kl[0, 0] + entropy[0, 1] * kl[0, 1]) / (entropy[0, 0] + entropy[0, 1])
    class1 = kl[1, 0]  # one pixel: its entropy weight cancels
    expected = (class0 + class1) / 2  # class 2 absent, the ignored pixel excluded
    assert ecac_kl_loss(student, teacher, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    # temperature: tau^2 * KL at tau
    tau = 2.0
    p_t2 = (teacher / tau).softmax(1)
    kl2 = (p_t2 * (p_t2.log() - (student / tau).log_softmax(1))).sum(1)[0]
    ent2 = -(p_t2 * p_t2.log()).sum(1)[0]
    c0 = (ent2[0, 0] * kl2[0, 0] + ent2[0, 1] * kl2[0, 1]) / (ent2[0, 0] + ent2[0, 1])
    assert ecac_kl_loss(student, teacher, labels, temperature=tau).item() == pytest.approx(
        (tau ** 2 * (c0 + kl2[1, 0]) / 2).item(), rel=1e-5)


def test_intra_variance_loss_by_hand():
    labels = torch.tensor([[[0, 0]]])                                       # two pixels of class 0
    teacher = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])                  # identical outputs: cos 1, 1
    student = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])                  # orthogonal: centre (.5, .5)
    cos = 1 / math.sqrt(2)
    assert ecac_intra_variance_loss(student, teacher, labels).item() == pytest.approx((1 - cos) ** 2, rel=1e-5)
    assert ecac_intra_variance_loss(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-7)


def test_fuse_scores():
    scores = torch.rand(1, 3, 8, 8)
    logits = torch.randn(1, 3, 2, 2)
    assert torch.equal(ecac_fuse_scores(scores, logits, 0.0), scores)
    probs = F.interpolate(logits.softmax(1), size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(ecac_fuse_scores(scores, logits, 1.0), probs, atol=1e-6)
    assert torch.allclose(ecac_fuse_scores(scores, logits, 0.25), 0.75 * scores + 0.25 * probs, atol=1e-6)


def _batch():
    torch.manual_seed(1)
    labels = torch.randint(0, 3, (2, 2, 2)).repeat_interleave(4, 1).repeat_interleave(4, 2)  # 8x8 blocks
    features = torch.randn(2, 8, 8, 8) + 2 * F.one_hot(labels, 8).permute(0, 3, 1, 2).float()
    return features, labels


@pytest.mark.parametrize("which", ["student_ce", "teacher_ce", "kl", "intra_variance", "memory"])
def test_each_loss_decreases_on_a_fixed_batch(which):
    features, labels = _batch()
    ecac = make(memory_start_iter=0).train()
    ecac.update_memory(features, labels)
    feats = torch.nn.Parameter(features.clone())
    soft = torch.nn.Parameter(torch.zeros(2, 3, 8, 8))
    optimizer = torch.optim.Adam(list(ecac.parameters()) + [feats, soft], lr=1e-2)
    text = torch.randn(3, 4)
    # the KL's target: a fixed (sharpened) teacher, so that only the student has to move
    fixed_teacher = 3 * ecac(features, soft.softmax(1), text, labels)["teacher_logits"].detach()

    def loss():
        out = ecac(feats, soft.softmax(1), text, labels)
        lab = out["labels"]
        if which == "student_ce":
            return ecac_reweighted_ce(out["student_logits"], lab, ecac.class_weights(0.5))
        if which == "teacher_ce":
            return ecac_reweighted_ce(out["teacher_logits"], lab, ecac.class_weights(0.5))
        if which == "kl":
            return ecac_kl_loss(out["student_logits"], fixed_teacher, lab)
        if which == "intra_variance":
            return ecac_intra_variance_loss(out["student_logits"], out["teacher_logits"], lab)
        return ecac_memory_loss(out["memory_logits"], lab)

    first = loss().item()
    for _ in range(25):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.7 * first, (first, loss().item())


def test_gradient_flow_and_memory_has_none():
    features, labels = _batch()
    ecac = make(memory_start_iter=0).train()
    feats = features.clone().requires_grad_(True)
    soft = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = ecac(feats, soft, torch.randn(3, 4), labels)
    lab = out["labels"]
    total = (ecac_reweighted_ce(out["student_logits"], lab) + ecac_reweighted_ce(out["teacher_logits"], lab)
             + ecac_kl_loss(out["student_logits"], out["teacher_logits"], lab)
             + 50 * ecac_intra_variance_loss(out["student_logits"], out["teacher_logits"], lab)
             + ecac_memory_loss(out["memory_logits"], lab))
    total.backward()
    for name, p in ecac.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert feats.grad.abs().sum() > 0 and soft.grad.abs().sum() > 0  # into the host's features and masks
    assert not ecac.memory.requires_grad


def test_shapes_at_two_sizes_and_vocabulary_index():
    ecac = make().eval()
    for h, w in ((4, 4), (6, 10)):
        out = ecac(torch.randn(2, 8, h, w), torch.rand(2, 3, 2 * h, 2 * w), torch.randn(3, 4))
        assert out["student_logits"].shape == (2, 3, h, w)
    with pytest.raises(ValueError, match="vocabulary_index"):
        ecac(torch.randn(1, 8, 4, 4), torch.rand(1, 5, 4, 4), torch.randn(5, 4))
    with torch.no_grad():
        ecac.student_gamma.fill_(3.0)
    # a new vocabulary: class 0 = memory row 2, class 1 unknown (no calibration on it)
    out = ecac(torch.randn(1, 8, 4, 4), torch.rand(1, 2, 4, 4), torch.randn(2, 4),
               vocabulary_index=torch.tensor([2, -1]))
    assert out["student_logits"].shape == (1, 2, 4, 4)


def test_config_and_plain_arguments_agree():
    cfg = get_cfg()
    add_hvlformer_config(cfg)
    e = cfg.MODEL.HVLFORMER.ECAC
    assert e.ENABLED is False and e.INTRA_VARIANCE_WEIGHT == 50.0 and e.MEMORY_START_ITER == 1000
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 16
    cfg.MODEL.HVLFORMER.ECAC.MOMENTUM = 0.2
    from_cfg = ExtendedContextAwareClassifier(cfg, text_dim=4, num_classes=5)
    plain = ExtendedContextAwareClassifier(feature_dim=16, text_dim=4, num_classes=5, momentum=0.2)
    assert from_cfg.momentum == 0.2 and from_cfg.memory_start_iter == 1000
    assert [(n, p.shape) for n, p in from_cfg.state_dict().items()] == [(n, p.shape) for n, p in plain.state_dict().items()]
