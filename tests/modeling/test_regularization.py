"""L^L, L^VL, L^V (paper supplement A.4.2 / eqs. 6-9), the SRE BCE and the HierVL regularisers (HierVL
Sec. 3) on hand-made cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from hvlformer.modeling import regularization as R


def test_class_presence_ignores_ignore_pixels():
    labels = [torch.tensor([[0, 2], [255, 2]]), torch.tensor([[1, 255], [255, 255]])]
    torch.testing.assert_close(R.class_presence(labels, 3), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))


def test_language_regularization_minimal_at_reference():
    torch.manual_seed(0)
    reference = F.normalize(torch.randn(6, 32), dim=-1)
    at_reference = R.language_regularization(reference, reference)
    # closed form: logits = T0 T0^T, CE against the identity
    expected = F.cross_entropy(reference @ reference.t(), torch.arange(6))
    assert at_reference.item() == pytest.approx(expected.item(), rel=1e-6)
    for scale in (0.3, 1.0, 3.0):
        perturbed = reference + scale * torch.randn(6, 32) / math.sqrt(32)
        assert R.language_regularization(perturbed, reference) > at_reference
    assert R.language_regularization(reference[torch.randperm(6)], reference) > at_reference
    # scale invariance: both sides are normalised
    assert R.language_regularization(5 * reference, reference).item() == pytest.approx(at_reference.item(), rel=1e-5)


def test_vision_language_regularization_value_and_ignore():
    # 2 classes, C = 2; dense embedding of pixel p points exactly at class label(p)
    text = torch.eye(2)
    labels = torch.tensor([[[0, 1], [1, 255]]])
    dense = torch.zeros(1, 2, 2, 2)
    dense[0, 0, 0, 0] = 1.0
    dense[0, 1, 0, 1] = 1.0
    dense[0, 1, 1, 0] = 1.0
    dense[0, 0, 1, 1] = 1.0  # ignored pixel
    loss = R.vision_language_regularization(dense, text, labels, temperature=0.5)
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 1.0))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # all ignored -> 0, still differentiable
    d = dense.clone().requires_grad_(True)
    zero = R.vision_language_regularization(d, text, torch.full((1, 2, 2), 255))
    zero.backward()
    assert zero.item() == 0.0


def test_vision_language_regularization_upsamples_to_labels():
    dense = torch.randn(2, 4, 3, 3)
    labels = torch.randint(0, 5, (2, 12, 12))
    loss = R.vision_language_regularization(dense, torch.randn(5, 4), labels)
    assert torch.isfinite(loss) and loss > 0


def test_vision_regularization_and_relevance_loss():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    assert R.vision_regularization(a, b).item() == pytest.approx(2.5)
    logits, presence = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert R.relevance_loss(logits, presence).item() == pytest.approx(expected, rel=1e-6)


def test_hiervl_prompt_losses():
    clip = F.normalize(torch.randn(4, 8), dim=-1)
    assert R.prompt_topology_loss(clip, clip).item() == pytest.approx(0.0, abs=1e-6)
    rotated = clip[[1, 0, 2, 3]]
    assert R.prompt_topology_loss(rotated, clip) > 0
    # anchor: attraction term vanishes at the prototypes; repulsion = sum log(1 + pairwise distance)
    pairwise = torch.cdist(clip, clip)
    expected = -torch.log1p(pairwise[~torch.eye(4, dtype=torch.bool)]).sum()
    assert R.prompt_anchor_loss(clip, clip).item() == pytest.approx(expected.item(), rel=1e-5)


def test_hiervl_masked_losses():
    feats = torch.randn(1, 3, 2, 2)
    region = torch.tensor([[[True, False], [False, False]]])
    assert R.masked_consistency_loss(feats, feats, region).item() == pytest.approx(0.0, abs=1e-6)
    assert R.masked_consistency_loss(feats, -feats, region).item() == pytest.approx(2.0, abs=1e-6)
    text = torch.eye(3)
    dense = torch.zeros(1, 3, 2, 2)
    dense[0, 2, 0, 0] = 1.0
    labels = torch.full((1, 2, 2), 2)
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 2))
    assert R.masked_alignment_loss(dense, text, labels, region, temperature=0.5).item() == pytest.approx(expected, rel=1e-5)
