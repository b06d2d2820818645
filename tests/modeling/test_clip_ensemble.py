"""TEST.CLIP_ENSEMBLE: mask pooling, the geometric ensemble per mask and per pixel (hand-computed; only the
pixel level can split a mask), the model wiring (E_I^0 at test, seen / unseen weights, the vocabulary cache,
LEVEL pixel on every inference path) and the shipped tiny CLIP's classification of real shape masks."""
import contextlib
import math

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, TINY_PRETRAINED_CONFIG
from hvlformer.modeling.clip_ensemble import (CLIPEnsemble, geometric_ensemble, mask_pooled_embeddings,
                                              pixel_geometric_ensemble)
from hvlformer.modeling.clip_loader import reference_needed_at_test


def test_mask_pooling_averages_under_the_soft_mask():
    dense = torch.tensor([[[1.0, 0.0], [3.0, 0.0]],      # channel 0 of a 2 x 2 map
                          [[0.0, 2.0], [0.0, 0.0]]])[None]  # channel 1; 1 x 2 x 2 x 2
    big = 30.0  # sigmoid = 1 (to 1e-13)
    masks = torch.tensor([[[big, -big], [-big, -big]],   # query 0: pixel (0, 0) only
                          [[-big, big], [big, -big]],    # query 1: pixels (0, 1) and (1, 0)
                          [[0.0, -big], [0.0, -big]]])[None]  # query 2: half weight on (0, 0) and (1, 0)
    pooled = mask_pooled_embeddings(masks, dense)[0]
    expected = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.5, 1.0], [2.0, 0.0]]), dim=-1)
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=0)
    # masks at a finer resolution are resized to the dense grid first
    fine = torch.nn.functional.interpolate(masks, scale_factor=4, mode="nearest")
    torch.testing.assert_close(mask_pooled_embeddings(fine, dense)[0, :2], expected[:2], atol=1e-3, rtol=0)


def test_geometric_ensemble_matches_the_formula_by_hand():
    decoder = torch.tensor([0.6, 0.2, 0.2])  # two classes, then no object
    clip = torch.tensor([0.1, 0.9])
    logits = geometric_ensemble(decoder.log()[None, None], clip[None, None], torch.tensor([0.4, 0.8]))[0, 0]
    # decoder over the 2 classes: 0.75 / 0.25; class 0 seen (w 0.4), class 1 unseen (w 0.8)
    a, b = 0.75 ** 0.6 * 0.1 ** 0.4, 0.25 ** 0.2 * 0.9 ** 0.8
    expected = torch.tensor([a / (a + b) * 0.8, b / (a + b) * 0.8, 0.2])
    torch.testing.assert_close(logits.exp(), expected, atol=1e-6, rtol=0)
    assert logits.exp()[1] > logits.exp()[0]  # CLIP outvotes the decoder on the unseen class


def test_ensemble_weights_zero_and_one_are_the_decoder_and_clip_alone():
    torch.manual_seed(0)
    pred_logits = torch.randn(2, 5, 4)
    clip = torch.randn(2, 5, 3).softmax(-1)
    alone = geometric_ensemble(pred_logits, clip, torch.zeros(3))
    torch.testing.assert_close(alone.softmax(-1), pred_logits.softmax(-1), atol=1e-6, rtol=0)
    only_clip = geometric_ensemble(pred_logits, clip, torch.ones(3)).exp()
    no_object = pred_logits.softmax(-1)[..., -1:]
    torch.testing.assert_close(only_clip, torch.cat([clip * (1 - no_object), no_object], -1), atol=1e-6, rtol=0)


def test_pixel_ensemble_matches_the_formula_by_hand():
    # one pixel, two classes: decoder scores 0.6 / 0.2 (total 0.8), CLIP logits log 0.1 / log 0.9
    scores = torch.tensor([0.6, 0.2]).view(1, 2, 1, 1)
    clip_logits = torch.tensor([0.1, 0.9]).log().view(1, 2, 1, 1) + 3.0  # a shift does not matter (softmax)
    mixed = pixel_geometric_ensemble(scores, clip_logits, torch.tensor([0.4, 0.8]))[0, :, 0, 0]
    a, b = 0.75 ** 0.6 * 0.1 ** 0.4, 0.25 ** 0.2 * 0.9 ** 0.8
    torch.testing.assert_close(mixed, torch.tensor([a / (a + b), b / (a + b)]) * 0.8, atol=1e-6, rtol=0)


def test_pixel_ensemble_weights_zero_and_one_are_the_decoder_and_clip_alone():
    torch.manual_seed(0)
    scores = torch.rand(2, 3, 4, 5) * 2
    clip_logits = torch.randn(2, 3, 4, 5) * 4
    torch.testing.assert_close(pixel_geometric_ensemble(scores, clip_logits, torch.zeros(3)), scores,
                               atol=1e-5, rtol=1e-5)
    only_clip = pixel_geometric_ensemble(scores, clip_logits, torch.ones(3))
    torch.testing.assert_close(only_clip, clip_logits.softmax(1) * scores.sum(1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_only_the_pixel_level_splits_a_mask():
    """One query's mask covers the whole 1 x 4 image as class 0 (seen, p 0.95 over the two classes); E_I^0's
    patches are class 0's on the left half and the unseen class 1's on the right (CLIP: 0.95 each). Per mask,
    CLIP sees the average and the image keeps one label; per pixel, the right half goes to class 1."""
    from hvlformer.modeling.outputs import semantic_scores

    pred_logits = torch.tensor([[[2.0, -1.0, -4.0]]])            # 1 image x 1 query x (2 classes + no object)
    pred_masks = torch.full((1, 1, 1, 4), 6.0)                   # the query's mask: every pixel
    dense = torch.eye(2)[[0, 0, 1, 1]].t().reshape(1, 2, 1, 4)    # patch embeddings: left half e0, right half e1
    ensemble = CLIPEnsemble(logit_scale=math.log(19.0))          # softmax([s, 0]) = [0.95, 0.05]
    text, weights = torch.eye(2), torch.tensor([0.4, 0.8])
    mask_level = semantic_scores(ensemble(pred_logits, pred_masks, dense, text, weights), pred_masks)
    assert mask_level[0].argmax(0).flatten().tolist() == [0, 0, 0, 0]  # one label for the whole mask
    plain = semantic_scores(pred_logits, pred_masks)
    pixel_level = pixel_geometric_ensemble(plain, ensemble.pixel_logits(dense, text), weights)
    assert pixel_level[0].argmax(0).flatten().tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(pixel_level.sum(1), plain.sum(1))  # each pixel keeps the decoder's total
    # pixel_unseen (class 0 seen, class 1 not) splits it the same way: the unseen class's share is the mixture's
    unseen_level = pixel_geometric_ensemble(plain, ensemble.pixel_logits(dense, text), weights,
                                            decoder_split=torch.tensor([True, False]))
    assert unseen_level[0].argmax(0).flatten().tolist() == [0, 0, 1, 1]


def test_pixel_unseen_matches_the_formula_by_hand():
    """One pixel, classes 0 and 1 seen (w 0.4), class 2 unseen (w 0.8): the unseen class gets the mixture's
    probability, the two seen classes share the rest in the decoder's proportions 0.5 : 0.3."""
    scores = torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1) * 2.0  # total 2
    clip_logits = torch.tensor([0.2, 0.2, 0.6]).log().view(1, 3, 1, 1)
    weights, seen = torch.tensor([0.4, 0.4, 0.8]), torch.tensor([True, True, False])
    mixed = pixel_geometric_ensemble(scores, clip_logits, weights, decoder_split=seen)[0, :, 0, 0]
    a, b, c = 0.5 ** 0.6 * 0.2 ** 0.4, 0.3 ** 0.6 * 0.2 ** 0.4, 0.2 ** 0.2 * 0.6 ** 0.8
    unseen = c / (a + b + c)
    expected = torch.tensor([0.5 / 0.8 * (1 - unseen), 0.3 / 0.8 * (1 - unseen), unseen]) * 2.0
    torch.testing.assert_close(mixed, expected, atol=1e-6, rtol=0)
    # the unseen class's score is the plain pixel level's; the seen ones are not
    pixel = pixel_geometric_ensemble(scores, clip_logits, weights)[0, :, 0, 0]
    torch.testing.assert_close(mixed[2], pixel[2], atol=1e-6, rtol=0)
    assert abs(float(mixed[0] - pixel[0])) > 1e-3


def test_pixel_unseen_with_every_name_seen_is_the_decoder_and_with_none_the_pixel_level():
    torch.manual_seed(0)
    scores = torch.rand(2, 4, 3, 5) * 2
    clip_logits = torch.randn(2, 4, 3, 5) * 4
    weights = torch.tensor([0.4, 0.4, 0.8, 0.8])
    every = pixel_geometric_ensemble(scores, clip_logits, weights, decoder_split=torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(every, scores, atol=1e-5, rtol=1e-5)
    none = pixel_geometric_ensemble(scores, clip_logits, weights, decoder_split=torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(none, pixel_geometric_ensemble(scores, clip_logits, weights), atol=1e-6, rtol=0)
    some = pixel_geometric_ensemble(scores, clip_logits, weights, decoder_split=torch.tensor([1, 1, 0, 0]))
    torch.testing.assert_close(some.sum(1), scores.sum(1), atol=1e-5, rtol=1e-5)  # each pixel keeps its total
    ratio = some[:, 0] / some[:, 1]
    torch.testing.assert_close(ratio, scores[:, 0] / scores[:, 1], atol=1e-4, rtol=1e-4)


def test_pixel_unseen_leaves_a_seen_pixel_to_the_decoder_where_the_pixel_level_flips_it():
    """Two seen classes, decoder 0.6 / 0.4 for class 0; CLIP 0.95 for class 1. Per pixel the mixture flips the
    pixel to class 1 (0.6^0.6 0.05^0.4 < 0.4^0.6 0.95^0.4); with the split kept from the decoder it stays 0."""
    scores = torch.tensor([0.6, 0.4]).view(1, 2, 1, 1).expand(1, 2, 1, 2)
    clip_logits = torch.tensor([0.05, 0.95]).log().view(1, 2, 1, 1).expand(1, 2, 1, 2)
    weights = torch.tensor([0.4, 0.4])
    assert pixel_geometric_ensemble(scores, clip_logits, weights)[0].argmax(0).flatten().tolist() == [1, 1]
    kept = pixel_geometric_ensemble(scores, clip_logits, weights, decoder_split=torch.tensor([True, True]))
    torch.testing.assert_close(kept, scores.float())


def test_ensemble_rejects_bad_settings():
    with pytest.raises(ValueError, match="seen_weight"):
        CLIPEnsemble(logit_scale=10.0, seen_weight=1.5)
    with pytest.raises(ValueError, match="TEMPLATE"):
        CLIPEnsemble(logit_scale=10.0, template="a photo")
    with pytest.raises(ValueError, match="logit scale"):
        CLIPEnsemble(logit_scale=0.0)
    with pytest.raises(ValueError, match="LEVEL"):
        CLIPEnsemble(logit_scale=10.0, level="region")
    # the ends of the ranges are settings: CLIP's weight 0 (the decoder alone) and 1 (CLIP alone), any positive scale
    for weight in (0.0, 1.0):
        assert CLIPEnsemble(logit_scale=0.5, seen_weight=weight, unseen_weight=weight).logit_scale == 0.5
    with pytest.raises(ValueError, match="unseen_weight"):
        CLIPEnsemble(logit_scale=10.0, unseen_weight=-0.1)


@pytest.fixture(scope="module")
def ensemble_model(single_thread):
    from conftest import make_tiny_model

    return make_tiny_model("MODEL.HVLFORMER.CLASSIFIER", "text", "TEST.CLIP_ENSEMBLE.ENABLED", "True",
                           config=TINY_PRETRAINED_CONFIG, train=False)


def test_model_builds_the_ensemble_with_clip_scale_and_e_i0(ensemble_model, tiny_cfg):
    ensemble = ensemble_model.clip_ensemble
    assert ensemble_model.backbone.reference_tower is not None
    # the shipped tiny CLIP's learned logit scale (TEMPERATURE 0), not a default
    pretrained = tiny_cfg(config=TINY_PRETRAINED_CONFIG).MODEL.HVLFORMER.CLIP.PRETRAINED
    learned = torch.load(REPO_ROOT / pretrained, weights_only=True)["logit_scale"].float().exp()
    assert ensemble.logit_scale == pytest.approx(float(learned), rel=1e-3)
    assert abs(ensemble.logit_scale - 100.0) > 1.0 and abs(ensemble.logit_scale - 1 / 0.07) > 1.0
    assert (ensemble.seen_weight, ensemble.unseen_weight) == (0.4, 0.8)
    cfg = tiny_cfg("TEST.CLIP_ENSEMBLE.ENABLED", "True", "MODEL.HVLFORMER.CLIP.WEIGHTS_FROM_CHECKPOINT", "True",
                   config=TINY_PRETRAINED_CONFIG)
    assert reference_needed_at_test(cfg)  # evaluating a checkpoint still loads PRETRAINED for E_I^0
    assert not reference_needed_at_test(tiny_cfg(config=TINY_PRETRAINED_CONFIG))
    assert CLIPEnsemble(tiny_cfg("TEST.CLIP_ENSEMBLE.TEMPERATURE", "0.01"), clip_logit_scale=3.0).logit_scale == 100.0


def test_ensemble_without_pretrained_clip_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="CLIP.PRETRAINED"):
        tiny_model("TEST.CLIP_ENSEMBLE.ENABLED", "True")


def test_model_weights_follow_the_training_vocabulary_and_the_cache_follows_the_vocabulary(ensemble_model):
    model, ensemble = ensemble_model, ensemble_model.clip_ensemble
    names = list(model.class_names) + ["ring"]
    weights = ensemble.class_weights(names, model.training_class_names, torch.device("cpu"))
    assert weights.tolist() == pytest.approx([0.4] * 6 + [0.8])
    first = ensemble.class_embeddings(model.text_encoder, model.class_names)
    assert first.shape[0] == 6
    bigger = ensemble.class_embeddings(model.text_encoder, names)
    assert bigger.shape[0] == 7
    torch.testing.assert_close(bigger[:6], first)
    expected = model.text_encoder.reference_embeddings(["a photo of a ring."])[0]
    torch.testing.assert_close(bigger[6], expected)


@contextlib.contextmanager
def attributes(obj, **values):
    """``obj`` with the given attributes set, restored on exit (the module-scoped model is shared)."""
    saved = {name: getattr(obj, name) for name in values}
    try:
        for name, value in values.items():
            setattr(obj, name, value)
        yield obj
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


def use_vocabulary(model, vocabulary):
    """Give ``model`` the class names ``vocabulary``, each with the plain prompt "a photo of a {name}."."""
    model.set_vocabulary(vocabulary, [[f"a photo of a {n}."] for n in vocabulary],
                         [f"a photo of a {n}." for n in vocabulary])


def plain_zero_and_clip_only(model, inputs, level):
    """``sem_seg`` of ``inputs`` without the ensemble, with it at CLIP weights 0, and at weights 1 (CLIP alone),
    the ensemble at ``level``."""
    ensemble = model.clip_ensemble
    with torch.no_grad():
        with attributes(model, clip_ensemble=None):
            plain = model(inputs)[0]["sem_seg"]
        with attributes(ensemble, seen_weight=0.0, unseen_weight=0.0, level=level):
            zero = model(inputs)[0]["sem_seg"]
        with attributes(ensemble, seen_weight=1.0, unseen_weight=1.0, level=level):
            clip_only = model(inputs)[0]["sem_seg"]
    return plain, zero, clip_only


def test_zero_weights_give_the_plain_model_and_weights_change_the_scores(ensemble_model):
    torch.manual_seed(1)
    inputs = [{"image": torch.randint(0, 255, (3, 64, 64)).float(), "height": 64, "width": 64}]
    plain, zero, clip_only = plain_zero_and_clip_only(ensemble_model, inputs, "mask")
    torch.testing.assert_close(zero, plain, atol=1e-5, rtol=1e-5)
    assert (clip_only - plain).abs().max() > 1e-2
    # the ensemble moves mass between classes only: no-object probabilities are the decoder's
    torch.testing.assert_close(clip_only.sum(0), plain.sum(0), atol=1e-4, rtol=1e-4)


VOCABULARY = ["background", "circle", "square", "triangle", "star", "cross", "ring"]  # 5 seen kinds + ring


def shape_vocabulary(model):
    """The 11 names of the 10-kind renderer, and the ensemble's text embeddings of :data:`VOCABULARY`."""
    from hvlformer.data.shapes import shapes_class_names

    names = shapes_class_names(11)
    assert names[:6] == VOCABULARY[:6]
    return names, model.clip_ensemble.class_embeddings(model.text_encoder, VOCABULARY)


def shape_images(model, tag, count, guaranteed):
    """``count`` rendered 128-px images of all 10 kinds (``guaranteed(i)``: a kind drawn in image ``i``), each
    as the model's normalised ``1 x 3 x H x W`` batch and its ``H x W`` label ids."""
    for i in range(count):
        image, label = shape_image(tag, i, guaranteed(i))
        yield model.normalize(image[None]), label


def shape_image(tag, index, guaranteed):
    """Image ``index`` of the 128-px all-10-kinds renderer under ``tag`` (kind ``guaranteed`` drawn in it): the
    ``3 x H x W`` float image (0-255, unnormalised) and its ``H x W`` label ids."""
    from hvlformer.data.shapes import _image_rng, render_shapes_image

    image, label = render_shapes_image(_image_rng(0, tag, index), 128, 11, guaranteed_class=guaranteed)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float(), label


def test_shipped_tiny_clip_names_real_shape_masks(ensemble_model):
    """E_I^0 (the shipped tiny CLIP v2) pooled under a shape's true mask is classified as that shape, for
    a kind never labeled for segmentation ("ring") too: what makes the ensemble useful."""
    model, ensemble = ensemble_model, ensemble_model.clip_ensemble
    names, text = shape_vocabulary(model)
    correct = total = 0
    for x, label in shape_images(model, "ensemble-test", 6, lambda i: names.index("ring") if i % 2 == 0 else 1):
        dense = model.backbone.reference_dense_embedding(x)
        for kind in ("circle", "ring"):
            region = torch.from_numpy(label == names.index(kind))
            if region.sum() < 100:
                continue
            mask_logits = (region.float() * 20 - 10)[None, None]
            pooled = mask_pooled_embeddings(mask_logits, dense)[0, 0]
            total += 1
            correct += int(VOCABULARY[int((pooled @ text.t()).argmax())] == kind)
    assert total >= 4
    assert correct == total
    assert math.isfinite(ensemble.logit_scale)


def test_ema_teacher_shares_e_i0_for_its_evaluation(ensemble_model, tiny_model):
    from hvlformer.engine.ema import EMATeacher

    teacher = EMATeacher(ensemble_model).model
    assert teacher.backbone.reference is ensemble_model.backbone.reference  # shared, not copied
    inputs = [{"image": torch.randint(0, 255, (3, 64, 64)).float(), "height": 64, "width": 64}]
    with torch.no_grad():
        torch.testing.assert_close(teacher(inputs)[0]["sem_seg"], ensemble_model(inputs)[0]["sem_seg"])
    # without the ensemble the teacher still carries no E_I^0 at all
    plain = tiny_model(config=TINY_PRETRAINED_CONFIG, train=False)
    assert plain.backbone.reference is not None and EMATeacher(plain).model.backbone.reference is None


def test_pixel_level_on_the_model_keeps_each_pixels_total_and_reaches_every_path(ensemble_model):
    """LEVEL pixel: zero weights give the plain model; CLIP alone (weights 1) gives each pixel CLIP's own
    argmax of E_I^0's logits with the decoder's total; the sliding-window path mixes too."""
    from hvlformer.modeling.inference import scores_and_alignment, sliding_window_scores

    model, ensemble = ensemble_model, ensemble_model.clip_ensemble
    torch.manual_seed(2)
    inputs = [{"image": torch.randint(0, 255, (3, 64, 64)).float(), "height": 64, "width": 64}]
    plain, zero, clip_only = plain_zero_and_clip_only(model, inputs, "pixel")
    with torch.no_grad(), attributes(ensemble, seen_weight=1.0, unseen_weight=1.0, level="pixel"):
        images = model.normalize(inputs[0]["image"])[None]
        dense = model.backbone.reference_dense_embedding(images)
        logits = ensemble.pixel_logits(dense, ensemble.class_embeddings(model.text_encoder, model.class_names))
        clip_argmax = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear",
                                                      align_corners=False)[0].argmax(0)
        text = model.encode_text()
        whole, _ = scores_and_alignment(model, images, text)
        with attributes(model, sliding_window=True, window_size=64, window_stride=64):
            windowed, _ = sliding_window_scores(model, images[0], text)
    torch.testing.assert_close(zero, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clip_only.sum(0), plain.sum(0), atol=1e-4, rtol=1e-4)
    assert torch.equal(clip_only.argmax(0), clip_argmax)
    assert (clip_only.argmax(0) != plain.argmax(0)).any()
    torch.testing.assert_close(windowed, whole[0], atol=1e-5, rtol=1e-5)  # one window = the whole image
    assert torch.equal(whole[0].argmax(0), clip_argmax)


def test_shipped_tiny_clip_finds_ring_pixels_inside_the_background_at_pixel_level(ensemble_model):
    """E_I^0's per-pixel logits (LEVEL pixel) name most pixels of a hollow ring "ring" with the 7-name
    vocabulary: what a mask-level classification cannot give a ring left under the background's mask."""
    model, ensemble = ensemble_model, ensemble_model.clip_ensemble
    names, text = shape_vocabulary(model)
    hits = total = 0
    for x, label in shape_images(model, "ensemble-pixel-test", 4, lambda i: names.index("ring")):
        logits = ensemble.pixel_logits(model.backbone.reference_dense_embedding(x), text)
        argmax = torch.nn.functional.interpolate(logits, size=label.shape, mode="bilinear",
                                                 align_corners=False)[0].argmax(0)
        ring = torch.from_numpy(label == names.index("ring"))
        hits += int((argmax[ring] == 6).sum())
        total += int(ring.sum())
    assert total > 500
    assert hits / total > 0.5


def test_pixel_level_with_the_category_filter_matches_the_kept_vocabulary(single_thread):
    """LSMSeg's category filter with LEVEL pixel: per image, the scores of the kept classes are those of the
    same model given only those names (CLIP's pixel logits and weights follow the kept classes), the rest 0."""
    from conftest import make_tiny_model
    from hvlformer.modeling.inference import scores_and_alignment

    model = make_tiny_model("MODEL.HVLFORMER.CLASSIFIER", "text", "TEST.CLIP_ENSEMBLE.ENABLED", "True",
                            "TEST.CLIP_ENSEMBLE.LEVEL", "pixel", "MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER", "True",
                            "MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER_TOP_K", "4", config=TINY_PRETRAINED_CONFIG, train=False)
    assert model.clip_ensemble.level == "pixel"
    names = VOCABULARY

    ring = shape_vocabulary(model)[0].index("ring")
    images = next(shape_images(model, "ensemble-filter-test", 1, lambda i: ring))[0].repeat(2, 1, 1, 1)
    images[1] = images[1].flip(-1)
    use_vocabulary(model, names)
    with torch.no_grad():
        text = model.encode_text()
        scores, _ = scores_and_alignment(model, images, text)
        kept = model.category_filter(model.extract_features(images)["clip_dense"], text)["indices"]
        with attributes(model, category_filter=None):
            for b in range(2):
                use_vocabulary(model, [names[i] for i in kept[b]])
                reference, _ = scores_and_alignment(model, images[b: b + 1], model.encode_text())
                torch.testing.assert_close(scores[b, kept[b]], reference[0], atol=1e-5, rtol=1e-5)
                dropped = [k for k in range(len(names)) if k not in kept[b].tolist()]
                assert torch.all(scores[b, dropped] == 0)


def test_pixel_unseen_on_the_model_is_the_plain_model_for_the_training_names_and_splits_like_it(ensemble_model):
    """LEVEL pixel_unseen on the model: with the training vocabulary the output is the plain model's (whatever
    the weights); with "ring" added, ring's scores are LEVEL pixel's and the training names keep the plain
    model's proportions at every pixel."""
    model, ensemble = ensemble_model, ensemble_model.clip_ensemble
    torch.manual_seed(3)
    inputs = [{"image": torch.randint(0, 255, (3, 64, 64)).float(), "height": 64, "width": 64}]
    assert list(model.class_names) == list(model.training_class_names)
    plain, zero, clip_only = plain_zero_and_clip_only(model, inputs, "pixel_unseen")
    torch.testing.assert_close(zero, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clip_only, plain, atol=1e-5, rtol=1e-5)
    training_names = list(model.class_names)

    image, _ = shape_image("ensemble-unseen-test", 0, shape_vocabulary(model)[0].index("ring"))
    inputs = [{"image": image, "height": 128, "width": 128}]
    use_vocabulary(model, VOCABULARY)
    try:
        with torch.no_grad():
            with attributes(model, clip_ensemble=None):
                plain = model(inputs)[0]["sem_seg"]
            with attributes(ensemble, level="pixel"):
                pixel = model(inputs)[0]["sem_seg"]
            with attributes(ensemble, level="pixel_unseen"):
                unseen = model(inputs)[0]["sem_seg"]
    finally:
        use_vocabulary(model, training_names)
    torch.testing.assert_close(unseen[6], pixel[6], atol=1e-5, rtol=1e-4)
    seen_share = unseen[:6] / unseen[:6].sum(0, keepdim=True)
    torch.testing.assert_close(seen_share, plain[:6] / plain[:6].sum(0, keepdim=True), atol=1e-4, rtol=1e-4)
    assert (unseen.argmax(0) == 6).sum() > 100  # the ring still takes pixels
    assert ((pixel.argmax(0) != plain.argmax(0)) & (pixel.argmax(0) < 6)).sum() > (
        (unseen.argmax(0) != plain.argmax(0)) & (unseen.argmax(0) < 6)).sum()
