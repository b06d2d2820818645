"""CAA (thesis chapter 3): affinity targets, the losses of eqs. 3.9 / 3.10, class centres (eq. 3.1), the
intra / inter aggregation (eqs. 3.2-3.7), size independence, memory formula, config construction."""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg

from hvlformer import add_hvlformer_config
from hvlformer.modeling.thesis import (
    ClassAwareAffinity,
    affinity_targets,
    caa_affinity_bytes,
    caa_affinity_loss,
    caa_auxiliary_loss,
    downsample_labels,
)
from hvlformer.modeling.thesis.caa import class_association, class_centers, intra_inter_features


def test_affinity_targets_by_hand():
    labels = torch.tensor([[[0, 1], [255, 0]]])  # pixels 0..3: classes 0, 1, ignore, 0
    target, valid = affinity_targets(labels)
    expected_target = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    expected_valid = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(target[0], expected_target) and torch.equal(valid[0], expected_valid)


def test_affinity_loss_values_and_ignore():
    labels = torch.tensor([[[0, 1], [255, 0]]])
    # logit 0 everywhere: BCE = log 2 on each of the 9 valid pairs
    assert caa_affinity_loss(torch.zeros(1, 4, 4), labels).item() == pytest.approx(math.log(2), abs=1e-6)
    target, valid = affinity_targets(labels)
    perfect = torch.where(target, 20.0, -20.0)
    assert caa_affinity_loss(perfect, labels).item() < 1e-8
    # pairs with the ignore pixel do not count, whatever their logits
    poisoned = perfect.clone()
    poisoned[0, 2, :] = -50.0
    poisoned[0, :, 2] = 50.0
    assert caa_affinity_loss(poisoned, labels).item() == pytest.approx(caa_affinity_loss(perfect, labels).item())
    # one wrong pair of nine: (0, 1) predicted "same" with logit 3 -> softplus(3) / 9
    wrong = perfect.clone()
    wrong[0, 0, 1] = 3.0
    expected = (F.softplus(torch.tensor(3.0)) + 8 * F.softplus(torch.tensor(-20.0))) / 9
    assert caa_affinity_loss(wrong, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    all_ignored = torch.full((1, 2, 2), 255)
    assert caa_affinity_loss(torch.zeros(1, 4, 4, requires_grad=True), all_ignored).item() == 0.0


def test_auxiliary_loss_is_upsampled_ce():
    logits = torch.zeros(1, 4, 2, 2)
    labels = torch.randint(0, 4, (1, 8, 8))
    labels[0, 0] = 255
    assert caa_auxiliary_loss(logits, labels).item() == pytest.approx(math.log(4), abs=1e-6)
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 16, 16))
    expected = F.cross_entropy(F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False), labels)
    assert caa_auxiliary_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_downsample_labels_nearest_keeps_ignore():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 2, 2], [255, 255, 2, 2]]])
    assert downsample_labels(labels, (2, 2)).tolist() == [[[0, 1], [255, 2]]]
    # the label at each cell's centre (pixel 2 of 0..3 at stride 4), not at its first pixel
    row = torch.tensor([[[0, 0, 1, 1, 1, 1, 1, 1]]])
    assert downsample_labels(row, (1, 2)).tolist() == [[[1, 1]]]


def test_class_centres_by_hand():
    # one class, two pixels, logits 0 and log 3: spatial softmax weights 1/4, 3/4 -> centre 0.25*4 + 0.75*8 = 7
    coarse = torch.tensor([[[[0.0, math.log(3.0)]]]])            # B=1, K=1, h=1, w=2
    reduced = torch.tensor([[[[4.0, 8.0]]]])                      # B=1, D'=1
    assert class_centers(coarse, reduced).item() == pytest.approx(7.0)


def test_intra_inter_aggregation_by_hand():
    pixels = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 6.0]]])   # P=3, D'=2
    affinity = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # {0,1} same, {2} alone
    intra, inter = intra_inter_features(affinity, pixels)
    assert torch.allclose(intra[0], torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 6.0]]))
    assert torch.allclose(inter[0], torch.tensor([[0.0, 6.0], [0.0, 6.0], [2.0, 0.0]]))
    # association: a pixel aligned with one of two far-apart centres takes (almost) that centre
    centers = torch.tensor([[[100.0, 0.0], [0.0, 100.0]]])
    out = class_association(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), centers)
    assert torch.allclose(out[0], centers[0], atol=1e-3)


def test_identity_at_init_and_two_input_sizes():
    torch.manual_seed(0)
    caa = ClassAwareAffinity(in_channels=32, text_dim=16)
    params = sum(p.numel() for p in caa.parameters())
    text = torch.randn(5, 16)
    for h, w in ((8, 8), (6, 10)):
        x = torch.randn(2, 32, h, w)
        out = caa(x, text)
        assert out["features"].shape == (2, 32, h, w)
        assert torch.equal(out["features"], x)  # Delta starts at zero: the module is the identity
        assert out["coarse_logits"].shape == (2, 5, h, w)
        assert out["affinity_logits"].shape == (2, h * w, h * w)
        assert out["centers"].shape == (2, 5, 16)
        # the affinity is symmetric (shared embedding + cosine) like its target
        assert torch.allclose(out["affinity_logits"], out["affinity_logits"].transpose(1, 2), atol=1e-5)
    assert sum(p.numel() for p in caa.parameters()) == params  # nothing depends on the input size


def test_gradient_flow_after_one_step():
    torch.manual_seed(0)
    caa = ClassAwareAffinity(in_channels=32, text_dim=16, norm="")
    x, text = torch.randn(2, 32, 6, 6), torch.randn(4, 16)
    labels = torch.randint(0, 4, (2, 24, 24))
    optimizer = torch.optim.SGD(caa.parameters(), lr=0.1)

    def total():
        out = caa(x, text)
        return (out["features"].pow(2).mean() + caa_affinity_loss(out["affinity_logits"],
                downsample_labels(labels, (6, 6))) + 0.4 * caa_auxiliary_loss(out["coarse_logits"], labels))

    total().backward()
    optimizer.step()  # Delta leaves zero, so the intra / inter branches get gradients too
    optimizer.zero_grad()
    total().backward()
    for name, p in caa.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("which", ["affinity", "auxiliary"])
def test_each_loss_decreases_on_a_fixed_batch(which):
    torch.manual_seed(0)
    caa = ClassAwareAffinity(in_channels=16, text_dim=8)
    labels = torch.randint(0, 3, (2, 4, 4)).repeat_interleave(2, 1).repeat_interleave(2, 2)  # 8x8, 2x2 blocks
    x = torch.randn(2, 16, 4, 4) + F.one_hot(labels[:, ::2, ::2], 16).permute(0, 3, 1, 2).float()
    text = torch.randn(3, 8)
    optimizer = torch.optim.Adam(caa.parameters(), lr=1e-2)

    def loss():
        out = caa(x, text)
        if which == "affinity":
            return caa_affinity_loss(out["affinity_logits"], downsample_labels(labels, (4, 4)))
        return caa_auxiliary_loss(out["coarse_logits"], labels)

    first = loss().item()
    for _ in range(30):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert loss().item() < 0.7 * first


def test_memory_formula():
    assert caa_affinity_bytes(512, 512, 8) == 4 * 4096 ** 2 == 64 * 2 ** 20
    assert caa_affinity_bytes(512, 512, 16) == 4 * 1024 ** 2
    assert caa_affinity_bytes(832, 832, 8) == 4 * 10816 ** 2
    caa = ClassAwareAffinity(in_channels=8, text_dim=4)
    out = caa(torch.randn(3, 8, 5, 7), torch.randn(2, 4))
    logits = out["affinity_logits"]
    assert logits.numel() * logits.element_size() == caa_affinity_bytes(40, 56, 8, batch=3)


def test_config_and_plain_arguments_agree():
    cfg = get_cfg()
    add_hvlformer_config(cfg)
    assert cfg.MODEL.HVLFORMER.CAA.ENABLED is False and cfg.MODEL.HVLFORMER.CAA.AUX_WEIGHT == 0.4
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 64
    from_cfg = ClassAwareAffinity(cfg, text_dim=16)
    plain = ClassAwareAffinity(in_channels=64, text_dim=16, reduced_dim=32, norm="GN")
    assert from_cfg.reduced_dim == 32  # D' = D / 2 by default
    assert [(n, p.shape) for n, p in from_cfg.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]
    cfg.MODEL.HVLFORMER.CAA.REDUCED_DIM = 48
    assert ClassAwareAffinity(cfg, text_dim=16).reduced_dim == 48


def test_training_keeps_about_four_float_maps_per_image():
    """The memory statement of the docstring: tensors of P x P entries saved for the backward of CAA and
    its affinity loss are 4 float32 maps and 1 bool map (a regression that keeps (1 - M) or a one-hot
    product would add maps)."""
    caa = ClassAwareAffinity(in_channels=16, text_dim=8).train()
    x, text, labels = torch.randn(1, 16, 12, 12), torch.randn(4, 8), torch.randint(0, 4, (1, 12, 12))
    pixels = 144
    saved = {}

    def pack(t):
        if t.numel() == pixels * pixels:
            saved[t.data_ptr()] = t.dtype
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = caa(x, text)
        caa_affinity_loss(out["affinity_logits"], labels)
    assert sorted(str(d) for d in saved.values()) == ["torch.bool"] + ["torch.float32"] * 4
