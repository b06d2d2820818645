"""Paper fidelity and GPU readiness: what only a GPU run with real CLIP weights would otherwise show.

CLIP activation vs weights, losses really in float32 under autocast (and no op that CUDA autocast forbids),
l_mask normalisation (paper supplement eq. 2), the LR of the backbone's new layers, rare-class sampling and the
global batch of the paper configs.
"""
import argparse
import copy
import glob
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from conftest import REPO_ROOT, SEMI_SMALL, TINY_SEMI_CONFIG, load_script
from hvlformer import setup_cfg
from hvlformer.data import register_shapes_semi_split
from hvlformer.engine import get_parameter_groups
from hvlformer.engine.semi_trainer import auto_scale_semi
from hvlformer.engine.train_loop import SemiSupervisedStep
from hvlformer.engine.trainer import describe_batch_recipe
from hvlformer.modeling import clip_loader
from hvlformer.modeling import cmcr as C
from hvlformer.modeling.clip_loader import build_clip_model, check_activation_match
from hvlformer.modeling.htqg import diversity_loss
from hvlformer.modeling.regularization import language_regularization, vision_language_regularization

pytestmark = pytest.mark.usefixtures("single_thread")
PAPER_CONFIGS = sorted(p for p in glob.glob(str(REPO_ROOT / "configs" / "*" / "*.yaml"))
                       if "/tiny/" not in p and not Path(p).name.startswith("Base-"))


def _cfg(config_file, *opts):
    return setup_cfg(argparse.Namespace(config_file=config_file, opts=list(opts)))


def _tiny_semi_model(*opts):
    cfg = _cfg(TINY_SEMI_CONFIG, *SEMI_SMALL, *opts)
    register_shapes_semi_split(cfg)
    torch.manual_seed(0)
    return cfg, build_model(cfg).train()


# --------------------------------------------------------------------------- 1. CLIP activation vs weights
def test_openai_weights_need_the_quickgelu_architecture(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("the activation check must happen before any download")

    monkeypatch.setattr(clip_loader.open_clip, "create_model", no_download)
    with pytest.raises(ValueError, match="ViT-B-16-quickgelu"):
        build_clip_model("ViT-B-16", "openai")
    with pytest.raises(ValueError, match="QuickGELU"):
        check_activation_match("ViT-B-16", "openai")
    check_activation_match("ViT-B-16-quickgelu", "openai")  # matching: no error
    check_activation_match("ViT-B-16", "laion2b_s34b_b88k")  # a GELU-trained tag on a GELU tower


def test_every_shipped_config_matches_its_weights():
    assert len(PAPER_CONFIGS) == 44  # 4 datasets x (5 splits x 2 backbones + 1 HierVL)
    for path in PAPER_CONFIGS + [str(REPO_ROOT / "configs" / "Base-HVLFormer.yaml")]:
        clip = _cfg(path).MODEL.HVLFORMER.CLIP
        check_activation_match(clip.MODEL_NAME, clip.PRETRAINED)
        if clip.PRETRAINED == "openai":
            assert clip.MODEL_NAME == "ViT-B-16-quickgelu", path


# --------------------------------------------------------------------------- 2. losses in fp32, no BCE under autocast
def _guard_autocast_forbidden_ops(monkeypatch):
    """Fail if an op that CUDA autocast refuses runs while autocast is on (CPU autocast allows it)."""
    calls = []
    original_bce, original_module = F.binary_cross_entropy, torch.nn.BCELoss.forward

    def check(name):
        calls.append(name)
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            raise AssertionError(f"{name} called while autocast is enabled (CUDA autocast forbids it)")

    def guarded_bce(*args, **kwargs):
        check("binary_cross_entropy")
        return original_bce(*args, **kwargs)

    def guarded_module(self, *args, **kwargs):
        check("BCELoss")
        return original_module(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy", guarded_bce)
    monkeypatch.setattr(torch.nn.BCELoss, "forward", guarded_module)
    return calls


def test_losses_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    dense, text, reference = torch.randn(2, 16, 4, 4), torch.randn(5, 16), torch.randn(5, 16)
    labels = torch.randint(0, 5, (2, 8, 8))
    logits, masks = torch.randn(2, 6, 6), torch.randn(2, 6, 8, 8)
    queries = torch.randn(3, 5, 32)
    cases = {
        "L^VL": lambda: vision_language_regularization(dense, text, labels),
        "L^L": lambda: language_regularization(text, reference),
        "L_div": lambda: diversity_loss(queries),
        "probability maps": lambda: C.class_probability_maps(logits, masks),
    }
    for name, fn in cases.items():
        reference_value = fn()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = fn()
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, reference_value, rtol=1e-6, atol=1e-6, msg=name)


def _unlabeled_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)
    weak = (images.float() * 0.9).to(torch.uint8)
    strong = images.flip(-1)
    box = torch.zeros(2, 64, 64, dtype=torch.bool)
    box[0, 8:40, 16:48] = True
    mixed = torch.where(box[:, None], strong.flip(0), strong)
    return [{"image": images[i], "image_weak": weak[i], "image_strong": mixed[i], "cutmix_box": box[i],
             "padding": torch.zeros(64, 64, dtype=torch.bool)} for i in range(2)]


def _labeled_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        label = torch.randint(0, 6, (64, 64), generator=g)
        label[:4] = 255
        out.append({"image": torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8), "sem_seg": label,
                    "height": 64, "width": 64})
    return out


def _one_step(model, amp):
    step = SemiSupervisedStep(model, [_labeled_batch()], [_unlabeled_batch()],
                              torch.optim.SGD(model.parameters(), lr=0.0), amp=amp)
    torch.manual_seed(123)  # the same point sampling in both runs
    step.train(0, 1)
    return {k: v.latest() for k, v in step.storage.histories().items() if k.startswith("loss")}


def test_semi_step_under_bf16_autocast_matches_fp32(monkeypatch):
    calls = _guard_autocast_forbidden_ops(monkeypatch)
    cfg, model = _tiny_semi_model("SEMI.CONFIDENCE_THRESHOLD", "0.0")
    fp32 = _one_step(copy.deepcopy(model), amp=None)
    bf16 = _one_step(model, amp=torch.bfloat16)
    assert "binary_cross_entropy" in calls  # l_mask ran (under the guard)
    assert {"loss_cmcr_mask", "loss_cmcr_class", "loss_cmcr_align", "loss_ce", "loss_reg_vision_language"} <= set(fp32)
    assert set(bf16) == set(fp32)
    for key, value in fp32.items():
        assert math.isfinite(bf16[key]), key
        # bf16 has an 8-bit mantissa: the network's activations differ by ~1 %; the losses themselves are fp32
        assert bf16[key] == pytest.approx(value, rel=0.05, abs=2e-3), key


# ------------------------------------------------------------------- 3. l_mask over all pixels (supplement eq. 2)
def test_l_mask_averages_over_all_pixels_with_a_known_confident_fraction():
    # 4 x 4 pixels, 2 classes; exactly 4 of 16 pixels are confident (a quarter)
    target = torch.full((1, 2, 4, 4), 0.5)
    target[0, 0, 0, :] = 0.99
    target[0, 1, 0, :] = 0.01
    confidence, pseudo = target.max(1)
    confident = confidence >= 0.95
    assert confident.float().mean().item() == 0.25
    view = torch.full((1, 2, 4, 4), 0.5)
    view[0, 0], view[0, 1] = 0.8, 0.2
    per_pixel = -(math.log(0.8) + math.log(1 - 0.2))  # BCE of both class maps at a confident pixel
    value = C.mask_consistency(view, pseudo, confident)
    assert value.item() == pytest.approx(4 * per_pixel / 16, rel=1e-5)  # not per_pixel (confident-only mean)
    # padded pixels are not image pixels: half the image padded -> averaged over the 8 valid pixels
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    valid[0, 2:] = False
    assert C.mask_consistency(view, pseudo, confident & valid, valid).item() == pytest.approx(4 * per_pixel / 8,
                                                                                                rel=1e-5)


def test_cmcr_l_mask_weights_each_view_over_all_pixels():
    # one layer, weak and strong views equal; a quarter of the original view's pixels confident
    logits = torch.full((1, 2, 3), -30.0)
    logits[0, 0, 0] = logits[0, 1, 1] = 30.0  # query k is class k
    target_masks = torch.zeros(1, 2, 4, 4)
    target_masks[0, 0, 0, :] = 30.0  # row 0: class 0 confident; elsewhere 50/50
    target_masks[0, 1, 0, :] = -30.0
    view_masks = torch.zeros(1, 2, 4, 4)
    view_masks[0, 0] = math.log(4.0)  # sigmoid = 0.8 -> class-0 share 0.8 / 1.3
    attn = torch.full((1, 2, 1), 1.0)
    out = {"pred_logits": logits, "pred_masks": target_masks, "attn_maps": attn, "aux_outputs": []}
    view = {"pred_logits": logits, "pred_masks": view_masks, "attn_maps": attn, "aux_outputs": []}
    loss = C.CMCRLoss(use_class=False, use_align=False)
    padding = torch.zeros(1, 32, 32, dtype=torch.bool)
    terms = loss(loss.targets(out), view, view, padding, padding.clone(), torch.tensor([0]))
    p0 = 0.8 / 1.3
    per_pixel = -2 * math.log(p0)
    assert terms["loss_cmcr_mask"].item() == pytest.approx((0.5 + 0.1) * 4 * per_pixel / 16, rel=1e-4)
    assert terms["stat_confident_fraction"].item() == pytest.approx(0.25)


# --------------------------------------------------------------------------- 4. LR of the new pyramid layers
def test_backbone_multiplier_covers_the_pretrained_encoder_only():
    cfg, model = _tiny_semi_model()
    groups = {g["name"]: g["lr"] for g in get_parameter_groups(model, 1e-4, 0.01, 0.0, 0.0, 0.1)}
    visual = [n for n in groups if n.startswith("backbone.visual.")]
    pyramid = [n for n in groups if n.startswith("backbone.pyramid.")]
    assert visual and pyramid and len(visual) + len(pyramid) == len([n for n in groups if n.startswith("backbone.")])
    assert all(groups[n] == pytest.approx(1e-5) for n in visual)
    assert {"backbone.pyramid.res2.0.weight", "backbone.pyramid.res2.3.weight", "backbone.pyramid.res3.weight"} <= set(pyramid)
    assert all(groups[n] == pytest.approx(1e-4) for n in pyramid)  # new layers: the head LR
    assert all(lr == pytest.approx(1e-4) for n, lr in groups.items() if not n.startswith("backbone.visual."))


# --------------------------------------------------------------------------- 5. rare-class sampling in the paper configs
def test_rare_class_sampling_on_in_paper_configs_off_in_tiny():
    for path in PAPER_CONFIGS:
        rcs = _cfg(path).SEMI.RARE_CLASS_SAMPLING
        assert (rcs.ENABLED, rcs.TEMPERATURE, rcs.MIN_PIXELS) == (True, 0.01, 3000), path
    for path in glob.glob(str(REPO_ROOT / "configs" / "tiny" / "*.yaml")):
        assert not _cfg(path).SEMI.RARE_CLASS_SAMPLING.ENABLED, path


def test_committed_configs_are_what_the_generator_writes():
    gen = load_script("tools/generate_configs.py")
    for name, dataset in gen.DATASETS.items():
        folder = REPO_ROOT / "configs" / dataset.get("dir", name)
        assert (folder / f"Base-{name}.yaml").read_text() == gen.base_config(name, dataset)
        for count in dataset["counts"]:
            for backbone in gen.BACKBONES:
                path = folder / f"hvlformer_{backbone}_{name}_{count}.yaml"
                assert path.read_text() == gen.split_config(name, dataset, count, backbone), path
        path = folder / f"hiervl_vitb16_{name}_{dataset['counts'][0]}.yaml"
        assert path.read_text() == gen.split_config(name, dataset, dataset["counts"][0], "vitb16", hiervl=True)


# --------------------------------------------------------------------------- 8. the global batch on any GPU count
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_paper_configs_keep_the_global_batch_on_any_gpu_count(world_size):
    cfg = _cfg(str(REPO_ROOT / "configs" / "voc" / "hvlformer_vitb16_voc_92.yaml"))
    scaled = auto_scale_semi(cfg, world_size)
    assert (scaled.SOLVER.IMS_PER_BATCH_LABELED, scaled.SOLVER.IMS_PER_BATCH_UNLABELED) == (8, 8)
    assert scaled.SOLVER.BASE_LR == cfg.SOLVER.BASE_LR and scaled.SOLVER.MAX_ITER == cfg.SOLVER.MAX_ITER
    text = describe_batch_recipe(scaled, world_size)
    per_gpu = 8 // world_size
    assert "global batch: 8 labeled + 8 unlabeled" in text
    assert f"per GPU: {per_gpu} labeled + {per_gpu} unlabeled" in text
    assert f"max iterations: {cfg.SOLVER.MAX_ITER}" in text and "base LR: 0.0001" in text


def test_rescaling_only_when_asked_and_logged():
    cfg = _cfg(str(REPO_ROOT / "configs" / "voc" / "hvlformer_vitb16_voc_92.yaml"), "SOLVER.REFERENCE_WORLD_SIZE", "2")
    scaled = auto_scale_semi(cfg, 1)
    assert (scaled.SOLVER.IMS_PER_BATCH_LABELED, scaled.SOLVER.IMS_PER_BATCH_UNLABELED) == (4, 4)
    assert scaled.SOLVER.BASE_LR == pytest.approx(cfg.SOLVER.BASE_LR / 2)
    assert scaled.SOLVER.MAX_ITER == 2 * cfg.SOLVER.MAX_ITER
    text = describe_batch_recipe(scaled, 1, original=cfg)
    assert "RESCALED" in text and "REFERENCE_WORLD_SIZE=2" in text
    with pytest.raises(ValueError, match="divisible"):
        describe_batch_recipe(cfg, 3)


# --------------------------------------------------------------------------- 6. E_I^0 = the pretrained encoder
@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory):
    """A local 'pretrained' CLIP checkpoint of the tiny architecture (stands in for the openai weights)."""
    torch.manual_seed(42)
    model, _ = build_clip_model("HVL-Tiny-ViT")
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return str(path), model


def _visual_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_no_pretrained_weights_switch_l_v_off_with_one_warning(caplog):
    from detectron2.utils import logger as d2_logger

    d2_logger._LOG_COUNTER.clear()
    with caplog.at_level(logging.WARNING, logger="hvlformer"):
        _, model = _tiny_semi_model()
        _tiny_semi_model()
    assert sum("SWITCHED OFF" in r.getMessage() for r in caplog.records) == 1  # said once
    assert model.backbone.reference_tower is None and model.criterion.loss_weights["reg_vision"] == 0.0
    assert "loss_reg_vision" not in model(_labeled_batch())


def test_reference_encoder_is_the_pretrained_one_on_every_rank_and_after_model_weights(tmp_path, pretrained_file):
    from detectron2.checkpoint import DetectionCheckpointer

    path, clip = pretrained_file
    expected = _visual_state(clip.visual)
    models = []
    for seed in (1, 2):  # DDP ranks differ by their seed only
        cfg = _cfg(TINY_SEMI_CONFIG, *SEMI_SMALL, "MODEL.HVLFORMER.CLIP.PRETRAINED", path)
        register_shapes_semi_split(cfg)
        torch.manual_seed(seed)
        models.append(build_model(cfg).train())
    for model in models:
        for key, value in _visual_state(model.backbone.reference_tower).items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    # a trained checkpoint given as MODEL.WEIGHTS replaces the encoder, never the reference
    trained = models[0]
    with torch.no_grad():
        for p in trained.backbone.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    DetectionCheckpointer(trained, save_dir=str(tmp_path)).save("trained")
    cfg = _cfg(TINY_SEMI_CONFIG, *SEMI_SMALL, "MODEL.HVLFORMER.CLIP.PRETRAINED", path, "MODEL.WEIGHTS",
               str(tmp_path / "trained.pth"))
    register_shapes_semi_split(cfg)
    finetune = build_model(cfg).train()
    DetectionCheckpointer(finetune).load(cfg.MODEL.WEIGHTS)
    torch.testing.assert_close(_visual_state(finetune.backbone.visual), _visual_state(trained.backbone.visual))
    for key, value in _visual_state(finetune.backbone.reference_tower).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    # L^V: the fine-tuned f_CLS against the PRETRAINED encoder's f_CLS (not against itself: > 0)
    from hvlformer.modeling.backbone import CLIPViTBackbone

    pretrained_backbone = CLIPViTBackbone(visual=copy.deepcopy(clip.visual), out_indices=[0, 1, 2, 3],
                                          frozen_reference=False).eval()
    batch = _labeled_batch()
    images = finetune.preprocess_images(batch).tensor
    with torch.no_grad():
        losses = finetune(batch)
        f_cls = finetune.backbone(images)["clip_global"]
        f_cls0 = pretrained_backbone(images)["clip_global"]
    expected_l_v = F.mse_loss(f_cls, f_cls0)
    assert expected_l_v.item() > 1e-4
    assert losses["loss_reg_vision"].item() == pytest.approx(expected_l_v.item(), rel=1e-4)


def test_evaluation_never_loads_clip_pretrained_when_model_weights_are_given(tmp_path, monkeypatch):
    from detectron2.checkpoint import DetectionCheckpointer

    from hvlformer.predictor import HVLFormerPredictor

    _, model = _tiny_semi_model()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    created = []
    original = clip_loader.open_clip.create_model

    def offline_create_model(name, pretrained=None, **kwargs):
        created.append(pretrained)
        if pretrained:
            raise RuntimeError("offline: no download allowed")
        return original(name, pretrained=None, **kwargs)

    monkeypatch.setattr(clip_loader.open_clip, "create_model", offline_create_model)
    opts = [*SEMI_SMALL, "MODEL.HVLFORMER.CLIP.PRETRAINED", "/not/downloaded/clip.pt",
            "MODEL.WEIGHTS", str(tmp_path / "model_final.pth")]
    predictor = HVLFormerPredictor(_cfg(TINY_SEMI_CONFIG, *opts))
    assert created and not any(created)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(predictor.model.state_dict()[key], value, msg=key)
    # train_net --eval-only builds the model the same way
    train_net = load_script("projects/HVLFormer/train_net.py")
    args = argparse.Namespace(config_file=TINY_SEMI_CONFIG, opts=[*opts, "OUTPUT_DIR", str(tmp_path / "eval")],
                              eval_only=True, resume=False, num_gpus=1, num_machines=1, machine_rank=0)
    loggers = [logging.getLogger(name) for name in ("hvlformer", "detectron2", "fvcore", "d2")]
    saved = [(lg.propagate, list(lg.handlers), lg.level) for lg in loggers]
    try:
        results = train_net.main(args)
    finally:  # train_net sets up its log files; leave the test process's logging as it was
        for lg, (propagate, handlers, level) in zip(loggers, saved):
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()
            lg.propagate, lg.handlers, lg.level = propagate, handlers, level
    assert "sem_seg" in results and "mIoU" in results["sem_seg"]


# --------------------------------------------------------------------------- 7. clip_zero_shot keeps several classes
def test_zero_shot_relevance_keeps_every_present_class():
    from hvlformer.modeling.htqg import HTQG, clip_zero_shot_relevance

    torch.manual_seed(0)
    classes = torch.eye(5)  # 5 classes, orthogonal embeddings
    # image 0 shows classes 0, 1, 2 (equally); image 1 shows 3 clearly and 4 nearly as much (cos 0.6 vs 0.62)
    image = torch.stack([classes[:3].sum(0), 0.62 * classes[3] + 0.6 * classes[4] + 0.1 * classes[0]])
    expected = torch.tensor([[1.0, 1, 1, 0, 0], [0, 0, 0, 1, 1]])
    torch.testing.assert_close(clip_zero_shot_relevance(image, classes, temperature=0.05, threshold=0.5), expected)
    htqg = HTQG(text_dim=5, hidden_dim=8, num_levels=3, feature_channels=[6, 7, 8], sre_mode="clip_zero_shot")
    features = [torch.randn(2, c, 4, 4) for c in (6, 7, 8)]
    weighted, q_hat, extras = htqg(classes, features, global_embedding=image)
    for b in range(2):
        for k in range(5):
            if expected[b, k]:
                torch.testing.assert_close(weighted[b, :, k], q_hat[:, k])  # keeps its queries, all levels
            else:
                assert torch.all(weighted[b, :, k] == 0)


def test_zero_shot_uses_the_frozen_pretrained_encoder_on_unlabeled_and_test_images(pretrained_file):
    path, clip = pretrained_file
    # the zero-shot relevance is HierVL's (its other options off)
    _, model = _tiny_semi_model("MODEL.HVLFORMER.CLIP.PRETRAINED", path, "MODEL.HVLFORMER.SRE.MODE", "clip_zero_shot",
                                "MODEL.META_ARCHITECTURE", "HierVL", "MODEL.HIERVL.NUM_INSTANCE_QUERIES", "0",
                                "MODEL.HIERVL.TEXT_CROSS_ATTENTION", "False", "MODEL.HIERVL.PROMPT_WEIGHT", "0.0",
                                "MODEL.HIERVL.MASKED_VL_WEIGHT", "0.0", "MODEL.HIERVL.UNLABELED_LOSS", "cmcr")
    with torch.no_grad():  # the fine-tuned encoder has moved away from the pretrained one
        for p in model.backbone.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seen = []
    original_forward = model.htqg.forward

    def spy(class_embeddings, features, global_embedding=None, presence=None):
        seen.append((global_embedding, presence))
        return original_forward(class_embeddings, features, global_embedding=global_embedding, presence=presence)

    model.htqg.forward = spy
    images = model.preprocess_images(_labeled_batch()).tensor
    with torch.no_grad():
        reference = model.backbone.reference_global_embedding(images)
        fine_tuned = model.backbone(images)["clip_global"]
        assert not torch.allclose(reference, fine_tuned, atol=1e-3)
        model.predict(images, model.encode_text())  # unlabeled views: no presence
        model.eval()
        model(_labeled_batch())  # test time: the same rule
    assert len(seen) == 2
    for embedding, presence in seen:
        assert presence is None
        torch.testing.assert_close(embedding, reference)


# --------------------------------------------------------------------------- 9. tests that fail when the code is wrong
def _two_class_outputs(class0_logit, class1_logit):
    """One decoder layer, K = 2, query k = class k with certainty; per-pixel class-k mask logits given as
    ``B x h x w`` tensors. The per-class probability map is sigmoid(m_k) / (sigmoid(m_0) + sigmoid(m_1))."""
    batch = class0_logit.shape[0]
    logits = torch.full((batch, 2, 3), -30.0)
    logits[:, 0, 0] = logits[:, 1, 1] = 30.0
    masks = torch.stack([class0_logit, class1_logit], dim=1)
    return {"pred_logits": logits, "pred_masks": masks, "attn_maps": torch.ones(batch, 2, 1), "aux_outputs": []}


def test_l_mask_weighs_the_weak_view_one_half_and_the_strong_view_one_tenth():
    ones = torch.ones(1, 4, 4)
    target = _two_class_outputs(30 * ones, -30 * ones)  # class 0 everywhere, confident
    weak = _two_class_outputs(math.log(4) * ones, 0 * ones)  # p0 = 0.8 / 1.3
    strong = _two_class_outputs(0 * ones, math.log(4) * ones)  # p0 = 0.5 / 1.3
    loss = C.CMCRLoss(use_class=False, use_align=False)
    padding = torch.zeros(1, 16, 16, dtype=torch.bool)
    value = loss(loss.targets(target), weak, strong, padding, padding.clone(), torch.tensor([0]))["loss_cmcr_mask"]
    weak_bce, strong_bce = -2 * math.log(0.8 / 1.3), -2 * math.log(0.5 / 1.3)
    assert value.item() == pytest.approx(0.5 * weak_bce + 0.1 * strong_bce, rel=1e-4)
    _, model = _tiny_semi_model()
    assert (model.unlabeled_criterion.weak_weight, model.unlabeled_criterion.strong_weight) == (0.5, 0.1)


def test_cutmix_box_takes_the_pasted_images_pseudo_labels():
    ones = torch.ones(2, 4, 4)
    sign = torch.tensor([1.0, -1.0]).view(2, 1, 1)  # image 0: class 0 everywhere, image 1: class 1
    target = _two_class_outputs(30 * sign * ones, -30 * sign * ones)
    box = torch.zeros(2, 16, 16, dtype=torch.bool)
    box[0, :, :8] = True  # the left half of image 0 comes from image 1
    mixed_sign = torch.where(box[:, ::4, ::4], sign.flip(0), sign)  # the strong view's content, per cell
    logit = math.log(4)
    strong = _two_class_outputs(logit * (mixed_sign > 0).float(), logit * (mixed_sign < 0).float())
    loss = C.CMCRLoss(use_class=False, use_align=False, weak_weight=0.0)
    padding = torch.zeros(2, 16, 16, dtype=torch.bool)
    value = loss(loss.targets(target), target, strong, padding, box, torch.tensor([1, 0]))["loss_cmcr_mask"]
    # every pixel of the strong view agrees with the pasted pseudo-labels with p = 0.8 / 1.3
    assert value.item() == pytest.approx(0.1 * -2 * math.log(0.8 / 1.3), rel=1e-4)


def test_decoder_queries_are_level_major():
    _, model = _tiny_semi_model()
    captured = {}
    original_forward = model.transformer_decoder.forward

    def spy(features, mask_features, queries, **kwargs):
        captured["queries"] = queries
        return original_forward(features, mask_features, queries, **kwargs)

    model.transformer_decoder.forward = spy
    images = model.preprocess_images(_labeled_batch()).tensor
    with torch.no_grad():
        outputs = model.predict(images, model.encode_text())
    refined = outputs.refined_queries  # B x E x K x D
    batch, levels, classes, _ = refined.shape
    assert levels > 1 and classes > 1
    for e in range(levels):
        for k in range(classes):
            torch.testing.assert_close(captured["queries"][:, e * classes + k], refined[:, e, k], rtol=0, atol=0)
    # and the criterion matches query e*K + k to class k
    from hvlformer.modeling.criterion import fixed_matching_indices

    (query, target), = fixed_matching_indices([{"labels": torch.tensor([1, 4])}], classes, levels)
    assert query.tolist() == sorted(e * classes + k for e in range(levels) for k in (1, 4))
