"""l_mask at image pixels (SEMI.MASK_CONSISTENCY_PIXELS): eq. 2 over the H x W image built by hand from
upsampled maps, an unbiased estimate from fewer pixels, and exact hidden labels for the oracle."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hvlformer.cutmix import mix_spatial
from hvlformer.modeling import cmcr as C
from hvlformer.modeling.unlabeled_objective import oracle_targets

B, Q, K, h, w, H, W = 2, 5, 3, 6, 8, 24, 32  # stride 4


def _outputs(generator):
    layer = {"pred_logits": torch.randn(B, Q, K + 1, generator=generator),
             "pred_masks": 3 * torch.randn(B, Q, h, w, generator=generator), "attn_maps": torch.rand(B, Q, 7)}
    return {**layer, "aux_outputs": [dict(layer)]}  # layer_outputs: aux[1:] + final = the final layer only


def _case():
    g = torch.Generator().manual_seed(0)
    weak, strong = _outputs(g), _outputs(g)
    target_probs = torch.softmax(4 * torch.randn(B, K, h, w, generator=g), dim=1)
    targets = [C.LayerTargets(target_probs, torch.randn(B, Q, K + 1, generator=g), torch.rand(B, Q, 7))]
    padding = torch.zeros(B, H, W, dtype=torch.bool)
    padding[0, 20:] = True
    box = torch.zeros(B, H, W, dtype=torch.bool)
    box[1, 3:13, 5:22] = True
    return targets, weak, strong, padding, box, torch.tensor([1, 0])


def _loss(pixels, threshold=0.7):
    targets, weak, strong, padding, box, order = _case()
    loss = C.CMCRLoss(confidence_threshold=threshold, use_class=False, use_align=False, mask_pixels=pixels)
    return loss(targets, weak, strong, padding, box, order)["loss_cmcr_mask"]


def _up(maps):
    return F.interpolate(maps, size=(H, W), mode="bilinear", align_corners=False)


def test_every_image_pixel_is_eq2_on_the_upsampled_maps():
    targets, weak, strong, padding, box, order = _case()
    confidence, pseudo = _up(targets[0].probs).max(dim=1)
    valid = ~padding
    confident = (confidence >= 0.7) & valid
    weak_probs = _up(C.class_probability_maps(weak["pred_logits"], weak["pred_masks"]))
    strong_probs = _up(C.class_probability_maps(strong["pred_logits"], strong["pred_masks"]))
    mixed = [mix_spatial(t[:, None], box, order)[:, 0] for t in (pseudo, confident, valid)]
    expected = 0.5 * C.mask_consistency(weak_probs, pseudo, confident, valid) + 0.1 * C.mask_consistency(
        strong_probs, *mixed)
    assert _loss(H * W).item() == pytest.approx(expected.item(), rel=1e-5)
    assert _loss(10 * H * W).item() == pytest.approx(expected.item(), rel=1e-5)  # more than the image: all of it
    assert abs(_loss(0).item() - expected.item()) > 1e-3  # the mask resolution is another loss


def test_fewer_pixels_estimate_the_same_average():
    """A quarter of the pixels per step: the mean over many steps is the every-pixel loss (denominators of the
    sampled pixels, not of the image)."""
    torch.manual_seed(0)
    full = _loss(H * W).item()
    draws = torch.tensor([_loss(H * W // 4).item() for _ in range(300)])
    assert draws.std() > 0  # other pixels each time
    assert draws.mean().item() == pytest.approx(full, rel=0.02)


def test_sampled_pixels_and_their_centres():
    index, coords = C.sample_image_pixels(4, 6, 10, torch.device("cpu"))
    assert index.unique().numel() == 10 and index.max() < 24
    assert torch.allclose(coords[:, 0], (index % 6 + 0.5) / 6) and torch.allclose(coords[:, 1], (index // 6 + 0.5) / 4)
    maps = torch.arange(24.0).reshape(1, 1, 4, 6)  # a map at the image's size is read exactly at pixel centres
    assert torch.allclose(C.at_pixels(maps, coords)[0, 0, :, 0], index.float(), atol=1e-5)
    everything, _ = C.sample_image_pixels(4, 6, 100, torch.device("cpu"))
    assert everything.tolist() == list(range(24))


def test_oracle_at_image_resolution_gives_every_pixels_label():
    labels = torch.randint(0, K, (B, H, W))
    labels[0, :, -3:] = 255
    targets, *_ = _case()
    probs = oracle_targets(targets, labels, at_image_resolution=True)[0].probs
    assert probs.shape == (B, K, H, W)
    index, coords = C.sample_image_pixels(H, W, H * W, torch.device("cpu"))
    confidence, pseudo = C.at_pixels(probs, coords).max(dim=1)
    flat = labels.flatten(1)[..., None]
    assert torch.equal(pseudo[flat != 255], flat[flat != 255]) and (confidence[flat != 255] > 0.9999).all()
    assert (confidence[flat == 255] < 1e-4).all()  # padding: no target


def test_negative_pixels_is_an_error():
    with pytest.raises(ValueError, match="MASK_CONSISTENCY_PIXELS"):
        C.CMCRLoss(mask_pixels=-1)
