"""Edge cases of the loss, query and view code that mutation testing (tools/mutation_test.py) found
untested: each test here kills a mutant that survived the rest of the suite."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_SEMI_PRETRAINED_CONFIG
from hvlformer.modeling import cmcr as C
from hvlformer.modeling import criterion as crit_mod
from hvlformer.modeling.criterion import HVLSetCriterion, fixed_matching_indices, semantic_to_targets
from hvlformer.modeling.htqg import clip_zero_shot_relevance

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------- cmcr.py


def test_l_mask_of_a_confidently_wrong_view_is_capped_by_the_clamp():
    # the view says class 0 with certainty where the pseudo-label is class 1: each class map's BCE is
    # capped at -ln(1e-6) by the probability clamp (not torch's log cap of 100)
    view = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    value = C.mask_consistency(view, torch.ones(1, 1, 1, dtype=torch.long), torch.ones(1, 1, 1, dtype=torch.bool))
    assert value.item() == pytest.approx(2 * math.log(1e6), rel=2e-3)  # float32 rounding of 1 - 1e-6


def test_distribution_alignment_without_padding_equals_no_padded_cells():
    torch.manual_seed(0)
    criterion = C.CMCRLoss(distribution_alignment_classes=3)
    criterion.observe_labels(torch.tensor([[[0, 1, 2, 2]]]), ignore_value=255)
    probs = torch.softmax(torch.randn(2, 3, 4, 4), dim=1)  # batch 2 != K 3
    torch.testing.assert_close(criterion.align_distribution(probs),
                               criterion.align_distribution(probs, torch.zeros(2, 16, 16, dtype=torch.bool)))


def test_distribution_alignment_prior_ignores_out_of_range_labels():
    criterion = C.CMCRLoss(distribution_alignment_classes=3)
    criterion.observe_labels(torch.tensor([[[0, 1, 3, -1, 255, 2]]]), ignore_value=255)
    torch.testing.assert_close(criterion.labeled_class_prior, torch.full((3,), 1 / 3))


def test_entropy_alternative_sums_both_views_over_unpadded_pixels():
    logits = torch.zeros(1, 3, 4)  # every query: uniform over 3 classes + no-object
    masks = torch.zeros(1, 3, 4, 4)
    outputs = {"pred_logits": logits, "pred_masks": masks}
    padding = torch.zeros(1, 16, 16, dtype=torch.bool)
    value = C.CMCRLoss(mode="entropy").entropy(outputs, outputs, padding)["loss_entropy"]
    assert value.item() == pytest.approx(2 * math.log(3), rel=1e-5)  # uniform maps, two views
    sharp = {"pred_logits": torch.tensor([[[9.0, -9, -9, -9], [-9, 9, -9, -9], [-9, -9, 9, -9]]]),
             "pred_masks": torch.stack([torch.full((4, 4), 9.0), torch.full((4, 4), -9.0), torch.full((4, 4), -9.0)])[None]}
    padding[0, :8] = True  # the sharp half does not count when padded
    mixed = C.CMCRLoss(mode="entropy").entropy(sharp, outputs, padding)["loss_entropy"]
    assert mixed.item() == pytest.approx(math.log(3), abs=1e-2)


# --------------------------------------------------------------------------- criterion.py
def _criterion(num_classes, num_levels):
    return HVLSetCriterion(num_classes=num_classes, num_query_levels=num_levels, num_instance_queries=0, matcher=None,
                           weight_dict={"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}, no_object_weight=0.1,
                           num_points=64, oversample_ratio=3.0, importance_sample_ratio=0.75)


def test_fixed_matching_rejects_a_label_equal_to_k():
    assert fixed_matching_indices([{"labels": torch.tensor([0, 2])}], 3, 2)[0][0].tolist() == [0, 2, 3, 5]
    with pytest.raises(ValueError, match="outside"):
        fixed_matching_indices([{"labels": torch.tensor([0, 3])}], 3, 2)


def test_no_object_weight_buffer_is_not_checkpointed():
    criterion = _criterion(3, 2)
    assert criterion.empty_weight.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.1])
    assert "empty_weight" not in criterion.state_dict()  # a checkpoint loads under another vocabulary


def test_mask_losses_with_one_matched_pair_in_an_image(monkeypatch):
    # E = 1: image 0 has one present class (one pair), image 1 two; a perfect prediction costs nothing
    # (points at the pixel centres, so that no interpolated boundary value is sampled)
    ys, xs = torch.meshgrid((torch.arange(8) + 0.5) / 8, (torch.arange(8) + 0.5) / 8, indexing="ij")
    centres = torch.stack([xs.flatten(), ys.flatten()], -1)
    monkeypatch.setattr(crit_mod, "get_uncertain_point_coords_with_randomness",
                        lambda logits, *args: centres[None].expand(logits.shape[0], -1, -1))
    labels = [torch.ones(8, 8, dtype=torch.long), torch.zeros(8, 8, dtype=torch.long)]
    labels[1][:, 4:] = 2
    logits = torch.full((2, 3, 4), -20.0)
    masks = torch.full((2, 3, 8, 8), -20.0)
    for i, label in enumerate(labels):
        for k in range(3):
            if (label == k).any():
                logits[i, k, k] = 20.0
                masks[i, k][label == k] = 20.0
            else:
                logits[i, k, 3] = 20.0
    losses = _criterion(3, 1)({"pred_logits": logits, "pred_masks": masks},
                              [semantic_to_targets(label, 3) for label in labels])
    assert losses["loss_mask"].item() < 1e-6 and losses["loss_dice"].item() < 1e-6


# --------------------------------------------------------------------------- htqg.py
def test_zero_shot_relevance_is_computed_in_float32_near_the_margin():
    # pairs of classes whose cosine gap is within 3e-4 of the keep margin T ln 2: float32 decides them like
    # float64, a bf16 product (autocast left on) would not
    g = torch.Generator().manual_seed(0)
    classes = F.normalize(torch.randn(2, 64, generator=g, dtype=torch.float64), dim=-1)
    images = torch.randn(200000, 64, generator=g, dtype=torch.float64)
    cos = F.normalize(images, dim=-1) @ classes.t()
    gap = (cos[:, 0] - cos[:, 1]).abs()
    near = ((gap - 0.05 * math.log(2)).abs() < 3e-4) & ((gap - 0.05 * math.log(2)).abs() > 1e-5)
    assert near.sum() > 50
    images, cos = images[near], cos[near]
    expected = (torch.exp((cos - cos.max(dim=-1, keepdim=True).values) / 0.05) >= 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = clip_zero_shot_relevance(images.float(), classes.float(), 0.05, 0.5)
    torch.testing.assert_close(clip_zero_shot_relevance(images.float(), classes.float(), 0.05, 0.5), expected.float())
    torch.testing.assert_close(under_autocast, expected.float())


def test_sre_threshold_mode_keeps_only_scores_strictly_above_the_threshold():
    from hvlformer.modeling.htqg import HTQG

    htqg = HTQG(text_dim=4, hidden_dim=8, num_levels=1, feature_channels=[6, 7, 8], sre_mode="threshold")
    torch.nn.init.zeros_(htqg.sre.mlp[-1].weight)
    torch.nn.init.zeros_(htqg.sre.mlp[-1].bias)  # every logit 0: s_k = 0.5, not > 0.5
    features = [torch.randn(2, c, 4, 4) for c in (6, 7, 8)]
    weighted, _, extras = htqg(torch.eye(4), features)
    assert torch.all(extras["relevance"] == 0) and torch.all(weighted == 0)


# --------------------------------------------------------------------------- ptrm.py
def test_ptrm_gate_is_conv_relu_conv_sigmoid_and_keeps_the_size_at_the_default_kernel():
    from hvlformer.modeling.ptrm import PTRM, CrossAttentionLevel, PTRMLevel

    torch.manual_seed(0)
    level = PTRMLevel(dim=8)  # defaults: kernel 7, hidden 16 (also PTRM's)
    assert PTRM(8, 3).levels[0].gate[0].kernel_size == (7, 7) and PTRM(8, 3).levels[0].gate[0].out_channels == 16
    first, _, second, _ = level.gate
    assert (first.kernel_size, first.out_channels, first.padding) == ((7, 7), 16, (3, 3))
    x = torch.randn(2, 3, 5, 6)
    expected = torch.sigmoid(F.conv2d(F.relu(F.conv2d(x, first.weight, first.bias, padding=3)),
                                      second.weight, second.bias, padding=3))
    torch.testing.assert_close(level.gate(x.clone()), expected)
    update, refined, _ = level(torch.randn(2, 4, 8), torch.randn(2, 8, 5, 6))
    assert refined.shape == (2, 8, 5, 6)
    assert CrossAttentionLevel(16).attn.num_heads == 8


def test_ptrm_adds_each_levels_update_to_its_query_level():
    from hvlformer.modeling.ptrm import PTRM

    torch.manual_seed(0)
    queries = torch.randn(2, 2, 4, 16)  # E = 2: pixel levels 1 and 2 both refine query level 1
    pixels = [torch.randn(2, 16, s, s) for s in (2, 4, 8)]
    ptrm = PTRM(16, 2, mode="ptrm", kernel_size=3, hidden_channels=4)
    refined, _, _ = ptrm(queries, pixels)
    updates = [ptrm.levels[i](queries[:, min(i, 1)], pixels[i])[0] for i in range(3)]
    torch.testing.assert_close(refined[:, 0], queries[:, 0] + updates[0])
    torch.testing.assert_close(refined[:, 1], queries[:, 1] + updates[1] + updates[2])


# --------------------------------------------------------------------------- regularization.py
def test_hiervl_masked_alignment_default_temperature_is_0_07():
    from hvlformer.modeling.regularization import masked_alignment_loss

    dense = torch.tensor([0.6, 0.0, 0.8]).view(1, 3, 1, 1)  # cosines 0.6, 0, 0.8 to the three classes
    region = torch.ones(1, 1, 1, dtype=torch.bool)
    value = masked_alignment_loss(dense, torch.eye(3), torch.full((1, 1, 1), 2), region)
    expected = -math.log(math.exp(0.8 / 0.07) / (math.exp(0.6 / 0.07) + 1 + math.exp(0.8 / 0.07)))
    assert value.item() == pytest.approx(expected, rel=1e-4, abs=1e-9)


def test_hiervl_masked_losses_are_zero_without_a_masked_region():
    from hvlformer.modeling.regularization import masked_alignment_loss, masked_consistency_loss

    dense = torch.randn(1, 3, 2, 2, requires_grad=True)
    nothing = torch.zeros(1, 2, 2, dtype=torch.bool)
    for value in (masked_consistency_loss(dense, torch.randn(1, 3, 2, 2), nothing),
                  masked_alignment_loss(dense, torch.eye(3), torch.zeros(1, 2, 2, dtype=torch.long), nothing)):
        assert value.item() == 0.0 and value.requires_grad


def test_vision_language_regularization_normalises_each_pixel_embedding():
    from hvlformer.modeling.regularization import vision_language_regularization

    torch.manual_seed(0)
    dense, text = torch.randn(2, 8, 3, 4), torch.randn(5, 8)
    labels = torch.randint(0, 5, (2, 6, 8))
    scale = torch.rand(2, 1, 3, 4) * 5 + 0.1  # a positive length per pixel changes no cosine
    torch.testing.assert_close(vision_language_regularization(dense * scale, text, labels),
                               vision_language_regularization(dense, text, labels))


def test_vision_language_regularization_upsamples_logits_bilinearly_without_corner_alignment():
    from hvlformer.modeling.regularization import vision_language_regularization

    torch.manual_seed(1)
    dense, text = torch.randn(1, 4, 2, 3), torch.randn(3, 4)
    labels = torch.randint(0, 3, (1, 4, 6))
    logits = torch.einsum("bchw,kc->bkhw", F.normalize(dense, dim=1), F.normalize(text, dim=-1)) / 0.07
    expected = F.cross_entropy(F.interpolate(logits, size=(4, 6), mode="bilinear", align_corners=False), labels)
    torch.testing.assert_close(vision_language_regularization(dense, text, labels), expected)
    scale = torch.tensor([0.5, 2.0, 7.0]).view(3, 1)  # each class embedding's length changes nothing either
    torch.testing.assert_close(vision_language_regularization(dense, text * scale, labels), expected)


def test_hiervl_masked_alignment_normalises_pixels_and_classes():
    from hvlformer.modeling.regularization import masked_alignment_loss

    torch.manual_seed(2)
    dense, text = torch.randn(2, 4, 3, 3), torch.randn(5, 4)
    labels, region = torch.randint(0, 5, (2, 3, 3)), torch.rand(2, 3, 3) > 0.3
    reference = masked_alignment_loss(dense, text, labels, region)
    scaled = masked_alignment_loss(dense * (torch.rand(2, 1, 3, 3) + 0.1), text * (torch.rand(5, 1) + 0.1),
                                   labels, region)
    torch.testing.assert_close(scaled, reference)


def test_hiervl_prompt_losses_hand_values():
    from hvlformer.modeling.regularization import prompt_anchor_loss, prompt_topology_loss

    text = torch.eye(2)
    clip = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # Gram all ones against the identity
    assert prompt_topology_loss(text, clip).item() == pytest.approx(2.0, rel=1e-6)
    # attract: ||e1 - e1|| + ||e2 - e1|| = sqrt 2; repel: 2 log(1 + sqrt 2)
    assert prompt_anchor_loss(text, clip).item() == pytest.approx(math.sqrt(2) - 2 * math.log(1 + math.sqrt(2)),
                                                                  rel=1e-5)


def test_fp32_loss_finds_the_device_of_nested_and_dataclass_arguments():
    from hvlformer.modeling.regularization import _device_type

    meta = torch.empty(2, device="meta")
    layer = C.LayerTargets(probs=meta, pred_logits=meta, attn_maps=meta)
    assert _device_type([None, {"a": [layer]}]) == "meta"
    assert _device_type([(1, "x"), {}]) == "cpu"


# ------------------------------------------------ data/dataset_mappers (views), data/samplers.py, cutmix.py
def test_gaussian_blur_uses_an_odd_kernel_of_three_sigmas():
    import torchvision.transforms.functional as TF

    from hvlformer.data.dataset_mappers.unlabeled_views_mapper import _gaussian_blur

    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(_gaussian_blur(image, 0.5), TF.gaussian_blur(image, [5, 5], [0.5, 0.5]))
    torch.testing.assert_close(_gaussian_blur(image, 1.1), TF.gaussian_blur(image, [9, 9], [1.1, 1.1]))


def test_view_and_sampling_defaults_are_the_papers():
    import inspect

    from hvlformer.cutmix import sample_cutmix_box
    from hvlformer.data.samplers import RareClassSampler, class_pixel_counts

    box = inspect.signature(sample_cutmix_box).parameters
    assert (box["prob"].default, box["area"].default, box["aspect"].default) == (0.5, (0.02, 0.4), (0.3, 1 / 0.3))
    rcs = inspect.signature(RareClassSampler.__init__).parameters
    assert (rcs["temperature"].default, rcs["min_pixels"].default) == (0.01, 3000)
    assert inspect.signature(class_pixel_counts).parameters["ignore_label"].default == 255


def test_class_pixel_counts_ignores_255_and_recomputes_a_stale_cache(tmp_path):
    from PIL import Image

    from hvlformer.data.samplers import class_pixel_counts

    label = torch.zeros(4, 4, dtype=torch.uint8)
    label[0] = 2
    label[1] = 255
    Image.fromarray(label.numpy()).save(tmp_path / "a.png")
    dicts = [{"sem_seg_file_name": str(tmp_path / "a.png")}]
    assert class_pixel_counts(dicts, 3).tolist() == [[8, 0, 4]]  # no cache file
    cache = str(tmp_path / "counts.json")
    assert class_pixel_counts(dicts, 3, cache_file=cache).tolist() == [[8, 0, 4]]
    assert class_pixel_counts(dicts, 4, cache_file=cache).tolist() == [[8, 0, 4, 0]]  # same files, other K


def test_shapes_split_with_one_labeled_image():
    import argparse

    from detectron2.data import DatasetCatalog

    from hvlformer import setup_cfg
    from hvlformer.data import register_shapes_semi_split

    cfg = setup_cfg(argparse.Namespace(config_file=TINY_SEMI_PRETRAINED_CONFIG,
                                       opts=["DATASETS.SHAPES.NUM_LABELED", "1", "DATASETS.SHAPES.NUM_TRAIN", "6",
                                             "DATASETS.SHAPES.IMAGE_SIZE", "32"]))
    names = register_shapes_semi_split(cfg)
    assert names == ("shapes_labeled", "shapes_unlabeled")
    labeled, unlabeled = DatasetCatalog.get(names[0]), DatasetCatalog.get(names[1])
    assert len(labeled) == 1 and len(unlabeled) == 5
    assert "sem_seg_file_name" in labeled[0]
    assert all("file_name" in r and "sem_seg_file_name" not in r for r in unlabeled)
    assert register_shapes_semi_split(cfg) == names  # registering again replaces the split


def test_cutmix_box_of_a_tiny_area_is_one_pixel():
    from hvlformer.cutmix import sample_cutmix_box

    np = pytest.importorskip("numpy")
    np.random.seed(0)
    box = sample_cutmix_box(4, 4, prob=1.0, area=(0.02, 0.02), aspect=(1.0, 1.0))
    assert box.sum().item() == 1



def test_weak_and_strong_photometric_draw_their_factors_from_the_configured_ranges():
    import numpy as np
    import torchvision.transforms.functional as TF

    from hvlformer.data.dataset_mappers import strong_photometric, weak_photometric

    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    np.random.seed(5)
    out = weak_photometric(image, brightness=0.1, contrast=0.3, blur_prob=0.0)
    np.random.seed(5)
    b, c = np.random.uniform(0.9, 1.1), np.random.uniform(0.7, 1.3)
    torch.testing.assert_close(out, TF.adjust_contrast(TF.adjust_brightness(image, b), c))
    np.random.seed(6)
    out = strong_photometric(image, color_jitter=(0.5, 0.4, 0.3, 0.2), jitter_prob=1.0, grayscale_prob=0.0,
                             blur_prob=0.0)
    np.random.seed(6)
    np.random.rand()
    expected = image
    for index in np.random.permutation(4):
        if index == 0:
            expected = TF.adjust_brightness(expected, np.random.uniform(0.5, 1.5))
        elif index == 1:
            expected = TF.adjust_contrast(expected, np.random.uniform(0.6, 1.4))
        elif index == 2:
            expected = TF.adjust_saturation(expected, np.random.uniform(0.7, 1.3))
        else:
            expected = TF.adjust_hue(expected, np.random.uniform(-0.2, 0.2))
    torch.testing.assert_close(out, expected)
    gray = strong_photometric(image, jitter_prob=0.0, grayscale_prob=1.0, blur_prob=0.0)
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(image, num_output_channels=3))


def _views_mapper(*opts):
    import argparse

    from hvlformer import setup_cfg
    from hvlformer.data import UnlabeledViewsMapper

    cfg = setup_cfg(argparse.Namespace(config_file=TINY_SEMI_PRETRAINED_CONFIG, opts=[
        "SEMI.WEAK.BRIGHTNESS", "0.0", "SEMI.WEAK.CONTRAST", "0.0", "SEMI.WEAK.BLUR_PROB", "0.0",
        "SEMI.STRONG.JITTER_PROB", "0.0", "SEMI.STRONG.GRAYSCALE_PROB", "0.0", "SEMI.STRONG.BLUR_PROB", "0.0",
        "INPUT.RESIZE_BASE", "64", "INPUT.RESIZE_RATIO_RANGE", "(1.0, 1.0)", *opts]))
    return UnlabeledViewsMapper(cfg)


def test_views_mapper_bgr_non_square_crop_and_divisibility_padding(tmp_path):
    import numpy as np
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    np.random.seed(0)
    # BGR: the views are computed in RGB and flipped back, so with no photometric change they equal the image
    out = _views_mapper("INPUT.FORMAT", "BGR", "INPUT.CROP.SIZE", "(32, 48)", "SEMI.STRONG.CUTMIX_PROB", "1.0",
                        "INPUT.SIZE_DIVISIBILITY", "32")({"file_name": str(path)})
    assert out["image"].shape == (3, 32, 64)  # the 32 x 48 crop padded to a multiple of 32
    assert torch.equal(out["image"], out["image_weak"]) and torch.equal(out["image"], out["image_strong"])
    assert out["cutmix_box"].shape == (32, 64) and out["cutmix_box"].any()
    assert out["padding"][:, 48:].all() and not out["padding"][:, :48].any()
    np.random.seed(0)
    out = _views_mapper("INPUT.CROP.SIZE", "(32, 48)", "SEMI.STRONG.CUTMIX_PROB", "1.0",
                        "INPUT.SIZE_DIVISIBILITY", "16")({"file_name": str(path)})
    assert out["image"].shape == (3, 32, 48) and out["cutmix_box"].shape == (32, 48)


def test_rare_class_sampling_keeps_a_class_with_one_eligible_image():
    import numpy as np

    from hvlformer.data.samplers import rare_class_probabilities

    counts = np.array([[5000, 0], [5000, 3000]])
    probabilities, eligible = rare_class_probabilities(counts, temperature=0.01, min_pixels=3000)
    assert [e.tolist() for e in eligible] == [[0, 1], [1]]
    assert probabilities[1] > probabilities[0] > 0
