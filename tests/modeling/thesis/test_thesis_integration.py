"""The thesis modules inside the HVLFormer model (docs/THESIS_MODULES.md, Integration): each switch builds its
module as a submodule, adds its losses to the loss dict with the config weights, changes the outputs (CAA and
the class refinement only once trained: they start as the identity), trains on a fixed batch, and leaves the
paper's model untouched when off. The category filter decodes each image on its kept classes only."""
import pytest
import torch

from conftest import make_tiny_model
from hvlformer.modeling.inference import scores_and_alignment
from hvlformer.modeling.thesis import ecac_vocabulary_index

pytestmark = pytest.mark.usefixtures("single_thread")
# the shared small tiny model, with fewer sampled points for the mask losses
POINTS = ["MODEL.HVLFORMER.TRAIN_NUM_POINTS", "256"]
CAA = ["MODEL.HVLFORMER.CAA.ENABLED", "True"]
# the memory loss from the first step, so that every ECAC term is in the first loss dict
ECAC = ["MODEL.HVLFORMER.ECAC.ENABLED", "True", "MODEL.HVLFORMER.ECAC.MEMORY_START_ITER", "0"]
REFINEMENT = ["MODEL.HVLFORMER.LSMSEG.CLASS_REFINEMENT", "True"]
FUSION = ["MODEL.HVLFORMER.LSMSEG.FUSION", "True"]
CAA_LOSSES = {"loss_caa_affinity": "MODEL.HVLFORMER.CAA.AFFINITY_WEIGHT", "loss_caa_aux": "MODEL.HVLFORMER.CAA.AUX_WEIGHT"}
ECAC_LOSSES = {"loss_ecac_student": "MODEL.HVLFORMER.ECAC.STUDENT_CE_WEIGHT",
               "loss_ecac_teacher": "MODEL.HVLFORMER.ECAC.TEACHER_CE_WEIGHT",
               "loss_ecac_memory": "MODEL.HVLFORMER.ECAC.MEMORY_WEIGHT",
               "loss_ecac_kl": "MODEL.HVLFORMER.ECAC.KL_WEIGHT",
               "loss_ecac_intra_variance": "MODEL.HVLFORMER.ECAC.INTRA_VARIANCE_WEIGHT"}
DEFAULT_WEIGHTS = {"MODEL.HVLFORMER.CAA.AFFINITY_WEIGHT": 1.0, "MODEL.HVLFORMER.CAA.AUX_WEIGHT": 0.4,
                   "MODEL.HVLFORMER.ECAC.STUDENT_CE_WEIGHT": 1.0, "MODEL.HVLFORMER.ECAC.TEACHER_CE_WEIGHT": 1.0,
                   "MODEL.HVLFORMER.ECAC.MEMORY_WEIGHT": 1.0, "MODEL.HVLFORMER.ECAC.KL_WEIGHT": 1.0,
                   "MODEL.HVLFORMER.ECAC.INTRA_VARIANCE_WEIGHT": 50.0}


def make_model(*opts, train=True):
    return make_tiny_model(*POINTS, *opts, train=train)


def batch(num_classes=6, size=64, seed=0):
    """Two images whose labels are blocks of classes (with an ignored border), so every loss has classes
    present and absent."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(2):
        label = torch.zeros(size, size, dtype=torch.long)
        for j, cls in enumerate(torch.randperm(num_classes, generator=g)[:4]):
            label[(j // 2) * size // 2:(j // 2 + 1) * size // 2, (j % 2) * size // 2:(j % 2 + 1) * size // 2] = cls
        label[:3] = 255
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        out.append({"image": image, "sem_seg": label, "height": size, "width": size})
    return out


def losses_of(model, inputs, seed=0):
    torch.manual_seed(seed)  # the point sampling of the mask loss
    return model(inputs)


def test_modules_are_built_only_when_switched_on():
    off = make_model("MODEL.HVLFORMER.CLASSIFIER", "text")
    assert all(getattr(off, name) is None for name in ("caa", "ecac", "category_filter", "class_refinement", "fusion"))
    on = make_model(*CAA, *ECAC, *REFINEMENT, *FUSION, "MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER", "True",
                    "MODEL.HVLFORMER.CLASSIFIER", "text")
    for name in ("caa", "ecac", "class_refinement", "fusion"):
        assert any(key.startswith(name + ".") for key in on.state_dict()), name  # submodule: in checkpoints
    assert on.category_filter is not None
    # the thesis modules are built after the network: the paper's parameters are initialised identically
    off_state = off.state_dict()
    for key, value in on.state_dict().items():
        if key in off_state:
            assert torch.equal(value, off_state[key]), key
    # the fusion's frozen second encoder stays out of checkpoints and of the optimiser
    assert not any("encoder.body" in key for key in on.state_dict())


@pytest.mark.parametrize("switch,expected", [(CAA, CAA_LOSSES), (ECAC, ECAC_LOSSES)], ids=["caa", "ecac"])
def test_loss_dict_has_the_module_losses_with_their_weights(switch, expected):
    inputs = batch()
    base = losses_of(make_model(), inputs)
    on = losses_of(make_model(*switch), inputs)
    assert set(on) - set(base) == set(expected)
    assert all(torch.isfinite(on[k]) and on[k] > 0 for k in expected)
    # the network's own losses are unchanged by the modules' presence in the loss dict... except through the
    # module's effect on the features (CAA and ECAC at init: none on the decoder outputs)
    for key in ("loss_ce", "loss_div", "loss_reg_language"):
        assert torch.allclose(on[key], base[key]), key
    for key, weight_key in expected.items():
        doubled = losses_of(make_model(*switch, weight_key, str(2 * DEFAULT_WEIGHTS[weight_key])), inputs)
        assert torch.allclose(doubled[key], 2 * on[key], rtol=1e-5), key
        others = [k for k in expected if k != key]
        assert all(torch.allclose(doubled[k], on[k], rtol=1e-5) for k in others), key
        zero = losses_of(make_model(*switch, weight_key, "0.0"), inputs)
        assert key not in zero


def predict(model, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, size, size, generator=g)
    with torch.no_grad():
        text = model.encode_text()
        scores, _ = scores_and_alignment(model, images, text)
    return scores


def test_caa_and_refinement_start_as_identity_and_change_the_outputs_when_trained():
    base = predict(make_model(train=False))
    for switch, layers in ((CAA, lambda m: [m.caa.fuse]), (REFINEMENT, lambda m: [m.class_refinement.out,
                                                                               m.class_refinement.ffn[-1]])):
        model = make_model(*switch, train=False)
        assert torch.equal(predict(model), base), switch          # identity at initialisation
        with torch.no_grad():
            for layer in layers(model):
                layer.weight.normal_(0, 0.5)
        assert (predict(model) - base).abs().max() > 1e-3, switch


def test_caa_output_and_ecac_inference_mix():
    model = make_model(*CAA, train=False)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.predict(images, model.encode_text())
    assert out.caa["coarse_logits"].shape == (2, 6, 8, 8) and out.caa["affinity_logits"].shape == (2, 64, 64)
    base = predict(make_model(train=False))
    ecac = make_model(*ECAC, train=False)
    mixed = predict(ecac)
    assert (mixed - base).abs().max() > 1e-3
    # the inference mix (1 - w) scores + w softmax(O_s): w = 0 gives the host's scores
    ecac.ecac_inference_weight = 0.0
    assert torch.allclose(predict(ecac), base)
    with torch.no_grad():
        out = ecac.predict(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), ecac.encode_text())
    ecac.ecac_inference_weight = 0.5
    student = out.ecac["student_logits"].softmax(1)
    expected = 0.5 * base + 0.5 * torch.nn.functional.interpolate(student, size=(64, 64), mode="bilinear",
                                                                  align_corners=False)
    assert torch.allclose(mixed, expected, atol=1e-6)


def test_fusion_changes_the_features_by_its_weighted_sum():
    model = make_model(*FUSION, train=False)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        clip = model.backbone(images)
        fused = model.extract_features(images)
    assert torch.equal(fused["clip_dense"], clip["clip_dense"]) and torch.equal(fused["res2"], clip["res2"])
    for level in ("res3", "res4", "res5"):
        assert (fused[level] - clip[level]).abs().max() > 1e-4
        assert float(model.fusion.fusion_weight(level).detach()) == pytest.approx(0.5)
    assert (predict(model) - predict(make_model(train=False))).abs().max() > 1e-4


def _with_vocabulary(model, names):
    prompts = [[f"a {n}."] for n in names]
    model.set_vocabulary(names, prompts, [f"a {n}." for n in names])


def test_category_filter_decodes_the_kept_classes_as_a_model_with_that_vocabulary():
    opts = ["MODEL.HVLFORMER.CLASSIFIER", "text"]
    filtered = make_model(*opts, "MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER", "True",
                          "MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER_TOP_K", "4", train=False)
    plain = make_model(*opts, train=False)
    names = list(filtered.class_names) + ["lamp", "tiger", "violin", "kettle"]
    for model in (filtered, plain):
        _with_vocabulary(model, names)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        text = filtered.encode_text()
        scores, _ = scores_and_alignment(filtered, images, text)
        kept = filtered.category_filter(filtered.extract_features(images)["clip_dense"], text)["indices"]
        assert kept.shape == (2, 4)
        for b in range(2):
            # the unfiltered model, given only this image's kept classes, predicts the same scores
            kept_names = [names[i] for i in kept[b]]
            _with_vocabulary(plain, kept_names)
            reference, _ = scores_and_alignment(plain, images[b: b + 1], plain.encode_text())
            assert torch.allclose(scores[b, kept[b]], reference[0], atol=1e-5)
            dropped = [k for k in range(len(names)) if k not in kept[b].tolist()]
            assert torch.all(scores[b, dropped] == 0)
        # a vocabulary of at most k classes is not filtered: the same scores as without the filter
        _with_vocabulary(filtered, names[:4])
        _with_vocabulary(plain, names[:4])
        small_filtered, _ = scores_and_alignment(filtered, images, filtered.encode_text())
        small_plain, _ = scores_and_alignment(plain, images, plain.encode_text())
        assert torch.equal(small_filtered, small_plain)


def test_category_filter_needs_the_text_classifier():
    with pytest.raises(ValueError, match="CLASSIFIER 'text'"):
        make_model("MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER", "True")


@pytest.mark.parametrize("switch,keys", [(CAA, ["loss_caa_affinity", "loss_caa_aux"]),
                                         (ECAC, ["loss_ecac_student", "loss_ecac_teacher"]),
                                         (REFINEMENT, None), (FUSION, None)],
                         ids=["caa", "ecac", "class_refinement", "fusion"])
def test_training_on_a_fixed_batch_decreases_the_module_loss(switch, keys):
    model = make_model(*switch)
    inputs = batch()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def measured(losses):
        return sum(losses[k] for k in keys) if keys else sum(v for k, v in losses.items() if k.startswith("loss"))

    values = []
    for _ in range(6):
        losses = losses_of(model, inputs)
        values.append(float(measured(losses).detach()))
        optimizer.zero_grad()
        sum(v for k, v in losses.items() if k.startswith("loss")).backward()
        optimizer.step()
    assert values[-1] < values[0], values
    if switch is REFINEMENT:  # the module itself trains (its zero-initialised projections move)
        assert model.class_refinement.out.weight.abs().sum() > 0
    if switch is FUSION:
        assert any(float(w.detach()) != 0.0 for w in model.fusion.weight_logits.values())


def test_hiervl_inherits_the_modules():
    """HierVL's own pixel-decoder step (text cross-attention) passes CAA's level hook on."""
    model = make_model("MODEL.META_ARCHITECTURE", "HierVL", *CAA, *REFINEMENT)
    losses = losses_of(model, batch())
    assert {"loss_caa_affinity", "loss_caa_aux"} <= set(losses)
    assert all(torch.isfinite(v) for k, v in losses.items() if k.startswith("loss"))


def memory_rows(model, class_index=None):
    """ECAC's memory row of each class of the model's current vocabulary (or of its classes ``class_index``)."""
    return ecac_vocabulary_index(model.training_class_names, model.class_names, class_index, model.device)


def test_ecac_after_a_new_vocabulary_and_with_the_category_filter():
    """ECAC's memory rows follow the class names: a known name keeps its row, a new one is -1 (local centre,
    no calibration), also for the per-image subsets of the category filter."""
    model = make_model(*ECAC, "MODEL.HVLFORMER.CLASSIFIER", "text", "MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER", "True",
                       "MODEL.HVLFORMER.LSMSEG.CATEGORY_FILTER_TOP_K", "3", train=False)
    training = list(model.class_names)
    assert memory_rows(model) is None
    names = [training[2], "lamp", training[0], "tiger", training[5]]
    _with_vocabulary(model, names)
    assert memory_rows(model).tolist() == [2, -1, 0, -1, 5]
    assert memory_rows(model, torch.tensor([1, 4])).tolist() == [-1, 5]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        scores, _ = scores_and_alignment(model, images, model.encode_text())
    assert scores.shape == (2, 5, 64, 64) and torch.isfinite(scores).all()
    assert ((scores > 0).flatten(2).any(-1).sum(1) <= 3).all()  # 3 classes kept per image
