"""Optimizer parameter groups, full-model gradient clipping, WarmupPolyLR and config errors."""
import argparse

import pytest
import torch
from detectron2.config import get_cfg
from torch import nn

from conftest import repo_path
from hvlformer.config import add_hvlformer_config
from hvlformer.engine import build_lr_scheduler, build_optimizer, get_parameter_groups
from hvlformer.engine.setup import setup_cfg


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.visual = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))  # the pretrained CLIP tower
        self.backbone.visual.positional_embedding = nn.Parameter(torch.zeros(4, 3))
        self.backbone.pyramid = nn.ConvTranspose2d(3, 3, 2, 2)  # new layers of the backbone
        self.head = nn.Linear(3, 2)
        self.norm = nn.GroupNorm(1, 3)
        self.query = nn.Embedding(5, 3)
        self.context = nn.Parameter(torch.zeros(8, 3))
        self.frozen = nn.Linear(3, 3).requires_grad_(False)


def _cfg(**solver):
    cfg = get_cfg()
    add_hvlformer_config(cfg)
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.WEIGHT_DECAY = 0.01
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


def test_parameter_groups():
    groups = {g["name"]: g for g in get_parameter_groups(Toy(), 1e-4, 0.01, 0.0, 0.0, 0.1)}
    assert "frozen.weight" not in groups  # frozen parameters cost no optimizer state
    assert groups["backbone.visual.0.weight"]["lr"] == pytest.approx(1e-5)
    assert groups["backbone.visual.0.weight"]["weight_decay"] == 0.01
    assert groups["backbone.visual.1.weight"]["weight_decay"] == 0.0
    assert groups["backbone.visual.1.weight"]["lr"] == pytest.approx(1e-5)
    assert groups["backbone.visual.positional_embedding"]["weight_decay"] == 0.0
    # the backbone's new (randomly initialised) pyramid trains at the head LR
    assert groups["backbone.pyramid.weight"]["lr"] == pytest.approx(1e-4)
    assert groups["backbone.pyramid.bias"]["lr"] == pytest.approx(1e-4)
    assert groups["head.weight"] == {**groups["head.weight"], "lr": 1e-4, "weight_decay": 0.01}
    assert groups["norm.weight"]["weight_decay"] == 0.0
    assert groups["query.weight"]["weight_decay"] == 0.0
    assert groups["context"]["weight_decay"] == 0.0 and groups["context"]["lr"] == 1e-4


def test_lr_multipliers_longest_prefix_wins_over_the_backbone_multiplier():
    multipliers = [("backbone.", 0.5), ("backbone.visual.0.", 0.0), ("head.", 2.0)]
    groups = {g["name"]: g for g in get_parameter_groups(Toy(), 1e-4, 0.01, 0.0, 0.0, 0.1,
                                                           lr_multipliers=multipliers)}
    assert groups["backbone.visual.0.weight"]["lr"] == 0.0  # the longer prefix, not "backbone."
    assert groups["backbone.visual.1.weight"]["lr"] == pytest.approx(5e-5)  # replaces BACKBONE_MULTIPLIER 0.1
    assert groups["backbone.pyramid.weight"]["lr"] == pytest.approx(5e-5)
    assert groups["head.weight"]["lr"] == pytest.approx(2e-4)
    assert groups["query.weight"]["lr"] == pytest.approx(1e-4)  # no prefix: the base LR
    assert groups["backbone.visual.0.weight"]["weight_decay"] == 0.01  # decay rules unchanged


def test_lr_multiplier_zero_keeps_parameters_at_their_initial_values():
    cfg = _cfg(LR_MULTIPLIERS=[["head.", 0.0]], BACKBONE_MULTIPLIER=1.0)
    model = Toy()
    head_before = model.head.weight.detach().clone()
    query_before = model.query.weight.detach().clone()
    optimizer = build_optimizer(cfg, model)
    x = torch.randn(4, 3)
    (model.head(model.query(torch.arange(5))).pow(2).sum() + model.head(x).sum()).backward()
    optimizer.step()
    assert torch.equal(model.head.weight, head_before)  # weight decay is scaled by the LR too
    assert not torch.equal(model.query.weight, query_before)


def test_lr_multipliers_reject_unknown_prefixes_and_bad_entries():
    with pytest.raises(ValueError, match="no trainable parameter starts with 'htqg.hqg.'.*backbone.visual"):
        build_optimizer(_cfg(LR_MULTIPLIERS=[["htqg.hqg.", 0.0]]), Toy())
    with pytest.raises(ValueError, match="no trainable parameter.*'frozen.'"):  # frozen ones do not count
        build_optimizer(_cfg(LR_MULTIPLIERS=[["frozen.", 0.5]]), Toy())
    with pytest.raises(ValueError, match=">= 0"):
        build_optimizer(_cfg(LR_MULTIPLIERS=[["head.", -1.0]]), Toy())
    with pytest.raises(ValueError, match="pairs"):
        build_optimizer(_cfg(LR_MULTIPLIERS=[["head.", 0.1, 2]]), Toy())
    with pytest.raises(ValueError, match="'head.' is listed twice"):
        build_optimizer(_cfg(LR_MULTIPLIERS=[["head.", 0.1], ["head.", 0.0]]), Toy())


def test_lr_multipliers_from_the_command_line():
    cfg = setup_cfg(argparse.Namespace(config_file="", opts=["SOLVER.LR_MULTIPLIERS", "[['htqg.hqg.', 0.1]]"]))
    assert [tuple(entry) for entry in cfg.SOLVER.LR_MULTIPLIERS] == [("htqg.hqg.", 0.1)]


def test_full_model_gradient_clipping_clips_the_global_norm():
    cfg = _cfg(OPTIMIZER="SGD", BASE_LR=1.0, MOMENTUM=0.0, WEIGHT_DECAY=0.0)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(cfg, model)
    model(torch.randn(16, 4) * 100).sum().backward()
    optimizer.step()
    # with SGD lr 1, the update is exactly the clipped gradient: global norm 0.01
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert step.norm().item() == pytest.approx(0.01, rel=1e-4)


def test_warmup_poly_schedule():
    cfg = _cfg(LR_SCHEDULER_NAME="WarmupPolyLR", MAX_ITER=100, WARMUP_ITERS=10, WARMUP_FACTOR=0.001,
               WARMUP_METHOD="linear", POLY_LR_POWER=0.9, BASE_LR=1.0)
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[5] < lrs[9] < 1.0  # linear warm-up
    for it in (20, 50, 90):  # after warm-up: (1 - it/max_iter) ** 0.9
        assert lrs[it] == pytest.approx((1 - it / 100) ** 0.9, rel=1e-6)


def test_unknown_config_key_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  HVLFORMER:\n    NUM_QUERY_LEVEL: 2\n")
    with pytest.raises(KeyError, match="NUM_QUERY_LEVEL"):
        setup_cfg(argparse.Namespace(config_file=str(bad), opts=[]))
    with pytest.raises(KeyError, match="PTRM.MODES"):
        setup_cfg(argparse.Namespace(config_file="", opts=["MODEL.HVLFORMER.PTRM.MODES", "none"]))


def test_shipped_configs_load():
    for path in ("configs/Base-HVLFormer.yaml", "configs/tiny/hvlformer_tiny_shapes.yaml"):
        cfg = setup_cfg(argparse.Namespace(config_file=str(repo_path(path)), opts=[]))
        assert cfg.MODEL.META_ARCHITECTURE == "HVLFormer"
