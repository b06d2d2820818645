"""SEMI.LABEL_REFINEMENT_*: the image-guided refinement of the teacher's pseudo-labels (pixel-adaptive refinement):
the neighbours by hand, the colour affinities, the outline it moves to the image's edge, the targets per layer and
resolution, and l_mask through the model on the refined labels."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from conftest import SEMI_SMALL, TINY_SEMI_CONFIG, semi_model_with_identical_views
from hvlformer import setup_cfg
from hvlformer.modeling import cmcr as C
from hvlformer.modeling.label_refinement import PixelAdaptiveRefinement, neighbours, refine_to
from hvlformer.modeling.unlabeled_objective import refined_targets, unlabeled_losses

pytestmark = pytest.mark.usefixtures("single_thread")


def _cfg(*opts):
    return setup_cfg(argparse.Namespace(config_file=TINY_SEMI_CONFIG, opts=[*SEMI_SMALL, *opts]))


def _square_image(size: int = 48, top: int = 16, side: int = 16, seed: int = 0) -> torch.Tensor:
    """``1 x 3 x size x size``: a red square (rows and columns ``top .. top + side - 1``) on a grey background, with
    a little noise (so the colour spread of a flat region is not 0)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.full((1, 3, size, size), 120.0)
    image[:, :, top:top + side, top:top + side] = torch.tensor([220.0, 30.0, 30.0])[:, None, None]
    return image + 3.0 * torch.randn(image.shape, generator=generator)


def test_neighbours_by_hand():
    """Neighbour m of pixel (y, x): direction by direction ((-1,-1), (-1,0), ..., (1,1)) for each dilation in
    turn; beyond the border the border pixel's value."""
    maps = torch.arange(25.0).view(1, 1, 5, 5)
    around = neighbours(maps, (1, 2))
    assert around.shape == (1, 1, 16, 5, 5)
    centre = around[0, 0, :, 2, 2]
    assert centre[:8].tolist() == [6, 7, 8, 11, 13, 16, 17, 18]    # dilation 1
    assert centre[8:].tolist() == [0, 2, 4, 10, 14, 20, 22, 24]    # dilation 2
    corner = around[0, 0, :, 0, 0]
    assert corner[:8].tolist() == [0, 0, 1, 0, 1, 5, 5, 6]         # replicate padding at the border


def test_affinity_is_a_distribution_that_stays_inside_one_colour():
    refinement = PixelAdaptiveRefinement(iterations=1)
    image = _square_image()
    weights = refinement.affinity(image)
    assert weights.shape == (1, 32, 48, 48)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(1, 48, 48))
    inside = torch.zeros(48, 48, dtype=torch.bool)
    inside[16:32, 16:32] = True
    same = neighbours(inside[None, None].float(), refinement.dilations)[0, 0] > 0     # M x H x W
    # a square pixel on its border and a background pixel next to it: nearly all weight on their own colour
    for y, x, own in ((16, 20, True), (15, 20, False)):
        on_own = weights[0, :, y, x][same[:, y, x] == own].sum()
        assert on_own > 0.97
    # padded neighbours weigh nothing
    padding = torch.zeros(1, 48, 48, dtype=torch.bool)
    padding[:, :, 40:] = True
    padded = refinement.affinity(image, padding)
    assert padded[0, :, 20, 39][neighbours(padding[:, None].float(), refinement.dilations)[0, 0, :, 20, 39] > 0].sum() == 0
    torch.testing.assert_close(padded.sum(dim=1), torch.ones(1, 48, 48))


def test_the_padding_colour_changes_no_weight():
    """The colour spread sigma_i is taken over the unpadded neighbours only: whatever the padded pixels hold (a
    batch's zero padding, or anything else), the unpadded pixels' weights are the same, and at a pixel next to the
    padding sigma_i is the standard deviation of its unpadded neighbours' colours."""
    refinement = PixelAdaptiveRefinement(iterations=1)
    padding = torch.zeros(1, 48, 48, dtype=torch.bool)
    padding[:, :, 40:] = True
    image = _square_image()
    weights = {}
    for fill in (0.0, 120.0, 255.0):
        filled = image.clone()
        filled[:, :, :, 40:] = fill
        weights[fill] = refinement.affinity(filled, padding)
    for fill in (0.0, 120.0):     # at every unpadded pixel (the padded ones' own weights are read by no loss)
        torch.testing.assert_close(weights[fill][..., :40], weights[255.0][..., :40])
    # by hand at (20, 39): the colour term over the unpadded neighbours, sigma from them alone
    around = neighbours(image, refinement.dilations)[0, :, :, 20, 39]                 # 3 x M
    real = neighbours(padding[:, None].float(), refinement.dilations)[0, 0, :, 20, 39] == 0
    sigma = around[:, real].std(dim=1, keepdim=True)
    colour = -((around - image[0, :, 20, 39][:, None]).abs() / (0.3 * sigma + 1e-8)).pow(2).mean(dim=0)
    expected = torch.zeros_like(colour)
    expected[real] = torch.softmax(colour[real], dim=0)
    position = weights[0.0][0, :, 20, 39] * 1.01 - expected          # what is left is the position term's share
    assert position.min() > -1e-5 and position.sum() == pytest.approx(0.01, abs=1e-4)
    assert position[~real].abs().max() < 1e-7


def test_refinement_moves_a_misplaced_outline_to_the_colour_edge():
    """The teacher's square, from a 12 x 12 (stride-4) map, misplaced by 2 px and blurred by the upsampling: after
    the refinement the argmax follows the image's square, the maps stay distributions, and pixels near the
    true edge become confident. With the colour kernel ignored (position only) it would stay misplaced."""
    image = _square_image()
    truth = torch.zeros(48, 48, dtype=torch.long)
    truth[16:32, 16:32] = 1
    shifted = torch.zeros(1, 1, 48, 48)
    shifted[..., 18:34, 18:34] = 1.0
    teacher_square = F.avg_pool2d(shifted, 4).clamp(0.02, 0.98)                   # 1 x 1 x 12 x 12
    probs = torch.cat([1 - teacher_square, teacher_square], dim=1)
    before = F.interpolate(probs, size=(48, 48), mode="bilinear", align_corners=False)
    after = PixelAdaptiveRefinement(iterations=10)(probs, image)
    assert after.shape == (1, 2, 48, 48)
    torch.testing.assert_close(after.sum(dim=1), torch.ones(1, 48, 48))
    wrong_before = (before.argmax(1)[0] != truth).sum().item()
    wrong_after = (after.argmax(1)[0] != truth).sum().item()
    assert wrong_before >= 60 and wrong_after <= 0.1 * wrong_before
    # the square's top-left band (rows 16-17), which the teacher gives to the background, is now square
    assert (after[0, 1, 16:18, 20:30] > 0.5).all() and (before[0, 1, 16:18, 20:30] < 0.5).all()
    # a flat image and a uniform map: nothing to move
    flat = PixelAdaptiveRefinement(iterations=3)(torch.full((1, 3, 4, 4), 0.25), torch.full((1, 3, 16, 16), 90.0))
    torch.testing.assert_close(flat, torch.full((1, 3, 16, 16), 0.25))


def test_refined_targets_per_layer_at_cell_centres_or_image_pixels():
    """Layers refined together equal each refined alone; at the mask resolution each cell's centre pixel
    (4i + 2 at stride 4, as the hidden labels are read), at image resolution every pixel; the class and
    attention targets stay."""
    refinement = PixelAdaptiveRefinement(iterations=3)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 255
    padding = torch.zeros(2, 32, 32, dtype=torch.bool)
    padding[1, :, 28:] = True
    layers = [C.LayerTargets(torch.rand(2, 4, 8, 8, generator=generator).softmax(1), torch.randn(2, 3, 5),
                             torch.randn(2, 3, 10)) for _ in range(3)]
    out = refined_targets(refinement, layers, images, padding)
    for before, after in zip(layers, out):
        full = refinement(before.probs, images, padding)
        torch.testing.assert_close(after.probs, full[..., 2::4, 2::4])
        torch.testing.assert_close(refine_to(before.probs, refinement, images, padding, (8, 8)), after.probs)
        assert after.pred_logits is before.pred_logits and after.attn_maps is before.attn_maps
        assert not torch.allclose(after.probs, before.probs)
    at_pixels = refined_targets(refinement, layers, images, padding, at_image_resolution=True)
    torch.testing.assert_close(at_pixels[1].probs, refinement(layers[1].probs, images, padding))


def test_l_mask_trains_on_the_refined_pseudo_labels():
    """Through the model, with given (EMA-style) targets whose square is misplaced by 2 px on a square image
    (weak = strong = original, no CutMix box): l_mask is the BCE of the views' maps against the refined targets'
    argmax where their top probability passes the threshold, and the refined labels are not the raw ones."""
    cfg = _cfg("SEMI.LABEL_REFINEMENT_ITERATIONS", "10", "SEMI.CONFIDENCE_THRESHOLD", "0.6")
    model, unlabeled = semi_model_with_identical_views(cfg)
    assert isinstance(model.label_refinement, PixelAdaptiveRefinement) and model.label_refinement.iterations == 10
    images = _square_image(size=64, top=20, side=24).clamp(0, 255).round().to(torch.uint8).expand(2, -1, -1, -1)
    unlabeled = {**unlabeled, "image_original": images, "image_weak": images, "image_strong": images}
    shifted = torch.zeros(2, 1, 64, 64)
    shifted[..., 22:46, 22:46] = 1.0
    square = F.avg_pool2d(shifted, 4).clamp(0.01, 0.95)                         # 2 x 1 x 16 x 16, stride 4
    misplaced = torch.cat([1 - square, torch.zeros(2, 1, 16, 16), square, torch.zeros(2, 3, 16, 16)], dim=1)
    with torch.no_grad():
        own = C.CMCRLoss.targets(model.unlabeled_criterion, model.predict(
            model.normalize(images), model.encode_text()).decoder_outputs())
        targets = [C.LayerTargets(misplaced, t.pred_logits, t.attn_maps) for t in own]
        losses = unlabeled_losses(model, {**unlabeled, "targets": targets}, model.encode_text())
        outputs = model.predict(model.normalize(images), model.encode_text()).decoder_outputs()
        model.label_refinement = None
        raw = unlabeled_losses(model, {**unlabeled, "targets": targets}, model.encode_text())
    refined = refine_to(misplaced, PixelAdaptiveRefinement(iterations=10), images.float(), None, (16, 16))
    confidence, pseudo = refined.max(dim=1)
    assert (pseudo != misplaced.argmax(1)).sum() >= 8 and (confidence >= 0.6).sum() > (misplaced.amax(1) >= 0.6).sum()
    expected = sum((cfg.SEMI.MASK_WEIGHT_WEAK + cfg.SEMI.MASK_WEIGHT_STRONG) * C.mask_consistency(
        C.class_probability_maps(layer["pred_logits"], layer["pred_masks"]), pseudo, confidence >= 0.6).item()
        for layer in C.layer_outputs(outputs))
    assert losses["loss_cmcr_mask"].item() == pytest.approx(cfg.SEMI.CMCR_WEIGHT * expected, rel=1e-4)
    assert raw["loss_cmcr_mask"].item() != pytest.approx(losses["loss_cmcr_mask"].item(), rel=0.02)


def test_the_refinement_from_the_config():
    from detectron2.modeling import build_model

    from hvlformer.data import register_shapes_semi_split

    assert not PixelAdaptiveRefinement.enabled(_cfg())  # off by default: the paper
    built = PixelAdaptiveRefinement(_cfg("SEMI.LABEL_REFINEMENT_ITERATIONS", "4", "SEMI.LABEL_REFINEMENT_DILATIONS",
                                         "(1, 3)", "SEMI.LABEL_REFINEMENT_COLOUR_SCALE", "0.5"))
    assert (built.iterations, built.dilations, built.colour_scale, built.position_weight) == (4, (1, 3), 0.5, 0.01)
    assert list(built.parameters()) == [] and list(built.buffers()) == []  # checkpoints are the same
    for bad in ({"iterations": 0}, {"dilations": (0, 2)}, {"dilations": ()}, {"colour_scale": 0.0},
                {"position_weight": -1.0}):
        with pytest.raises(ValueError, match="SEMI.LABEL_REFINEMENT_"):
            PixelAdaptiveRefinement(**bad)
    cfg = _cfg()
    register_shapes_semi_split(cfg)
    assert build_model(cfg).label_refinement is None
    entropy = _cfg("MODEL.META_ARCHITECTURE", "HierVL", "MODEL.HIERVL.UNLABELED_LOSS", "entropy",
                   "SEMI.LABEL_REFINEMENT_ITERATIONS", "10")
    with pytest.raises(ValueError, match="LABEL_REFINEMENT_ITERATIONS refines the teacher's CMCR targets"):
        build_model(entropy)


def test_neighbour_spread_over_the_unpadded_neighbours_by_hand():
    """The masked spread is the unbiased std of the unpadded neighbours only: with 2 of them their std, with
    one or none 0; with no mask the plain ``Tensor.std``."""
    from hvlformer.modeling.label_refinement import _neighbour_spread

    around = torch.tensor([1.0, 4.0, 10.0, -3.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 1, 1)
    for real, expected in (([1, 1, 1, 1], torch.tensor([1.0, 4.0, 10.0, -3.0]).std()),
                           ([0, 1, 1, 0], torch.tensor([4.0, 10.0]).std()),   # exactly two: their std (18 ** 0.5)
                           ([0, 0, 1, 0], 0.0), ([0, 0, 0, 0], 0.0)):
        padded = ~torch.tensor(real, dtype=torch.bool).view(1, 4, 1, 1)
        spread = _neighbour_spread(around, padded)
        assert spread.shape == (1, 3, 1, 1, 1)
        torch.testing.assert_close(spread, torch.full((1, 3, 1, 1, 1), float(expected)))
    torch.testing.assert_close(_neighbour_spread(around, None), around.std(dim=2, keepdim=True))


def test_a_pixel_with_only_padded_neighbours_keeps_its_distribution():
    """Deep inside the padding every neighbour (at every dilation, and the replicated border) is padding: its
    affinities are all 0, and the refinement leaves its distribution as it was instead of zeroing it."""
    refinement = PixelAdaptiveRefinement(iterations=3)
    image = _square_image(size=24, top=2, side=4)
    padding = torch.zeros(1, 24, 24, dtype=torch.bool)
    padding[:, :, 6:] = True  # only the six left columns are image
    weights = refinement.affinity(image, padding)
    assert weights[0, :, 12, 20].sum() == 0 and weights[0, :, 12, 2].sum() == pytest.approx(1.0)
    probs = torch.softmax(torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(1)), dim=1)
    refined = refinement(probs, image, padding)
    torch.testing.assert_close(refined[0, :, 12, 20], probs[0, :, 12, 20])
    torch.testing.assert_close(refined.sum(dim=1), torch.ones(1, 24, 24))


@pytest.mark.parametrize("kwargs", [{"colour_scale": 0.0}, {"colour_scale": -1.0}, {"position_weight": -0.1},
                                    {"iterations": 0}, {"dilations": (1, 0)}, {"dilations": ()}])
def test_refinement_rejects_settings_outside_their_range(kwargs):
    with pytest.raises(ValueError, match="SEMI.LABEL_REFINEMENT_"):
        PixelAdaptiveRefinement(**kwargs)


def test_position_weight_zero_is_allowed_and_leaves_the_colour_term_alone():
    """``position_weight`` 0 (no distance prior) is a valid setting: the weights are then the colour softmax
    alone, uniform over the 32 neighbours on a flat image."""
    weights = PixelAdaptiveRefinement(iterations=1, position_weight=0.0).affinity(torch.full((1, 3, 16, 16), 90.0))
    torch.testing.assert_close(weights, torch.full((1, 32, 16, 16), 1 / 32))


def test_on_a_flat_image_the_weights_fall_with_the_euclidean_distance():
    """Neighbour m at dilation d in direction (dy, dx) is d * sqrt(dy^2 + dx^2) away: on a flat image (the colour
    term uniform) the diagonal neighbour at dilation 1 (sqrt 2) weighs less than the axial one at 1 and more than
    the axial one at 2, and neighbours at equal distance weigh the same. (A wide ``colour_scale``, which also
    widens the distance prior, and a large ``position_weight`` make the differences visible: at the defaults nearly
    all of the prior's weight is on the four axial neighbours at dilation 1.)"""
    refinement = PixelAdaptiveRefinement(iterations=1, dilations=(1, 2), colour_scale=3.0, position_weight=1.0)
    weights = refinement.affinity(torch.full((1, 3, 16, 16), 90.0))
    at = weights[0, :, 8, 8]                # directions (-1,-1), (-1,0), (-1,1), (0,-1), (0,1), (1,-1), (1,0), (1,1)
    axial_1, diagonal_1, axial_2 = at[1], at[0], at[8 + 1]
    assert axial_1 > diagonal_1 > axial_2
    torch.testing.assert_close(at[[1, 3, 4, 6]], axial_1.expand(4))
    torch.testing.assert_close(at[[0, 2, 5, 7]], diagonal_1.expand(4))


def test_a_coarse_map_is_upsampled_at_pixel_centres():
    """``probs`` at a lower resolution are upsampled bilinearly with half-pixel centres (``align_corners=False``,
    as the rest of the model upsamples): on a flat image the symmetric neighbour weights keep a linear ramp, so
    far from the border the refined map is that upsampling exactly."""
    ramp = torch.linspace(0.0, 1.0, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    probs = torch.cat([ramp, 1.0 - ramp], dim=1)
    refined = PixelAdaptiveRefinement(iterations=1).forward(probs, torch.full((1, 3, 64, 64), 90.0))
    expected = F.interpolate(probs, size=(64, 64), mode="bilinear", align_corners=False)
    # the upsampled ramp is linear from pixel 2 to 61; one iteration reaches 8 px (the largest dilation)
    inner = (slice(None), slice(None), slice(12, 52), slice(12, 52))
    torch.testing.assert_close(refined[inner], expected[inner])
    assert not torch.allclose(expected[inner], F.interpolate(probs, size=(64, 64), mode="bilinear",
                                                             align_corners=True)[inner], atol=1e-3)
