"""tools/loss_gradients.py: the shares by hand, and on the random-weight tiny semi config, the unlabeled
gradient scaling with SEMI.CMCR_WEIGHT while the supervised one stays."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import REPO_ROOT, short_semi_run


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("loss_gradients")


def test_loss_family(tool):
    assert [tool.loss_family(n) for n in ("loss_ce_0", "loss_ce", "loss_mask_12", "loss_cmcr_mask", "loss_reg_vision")] \
        == ["loss_ce", "loss_ce", "loss_mask", "loss_cmcr_mask", "loss_reg_vision"]


def test_shares_by_hand(tool):
    grads = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0]), "u": torch.tensor([1.0, 1.0])}
    out = tool.gradient_shares(grads, unlabeled=["u"])  # total (2, 3), |total|^2 = 13
    assert out["total_norm"] == pytest.approx(math.sqrt(13))
    assert {k: v["share"] for k, v in out["families"].items()} == pytest.approx({"a": 2 / 13, "b": 6 / 13, "u": 5 / 13})
    assert out["families"]["b"]["norm"] == pytest.approx(2.0)
    assert out["supervised"]["share"] == pytest.approx(8 / 13) and out["unlabeled"]["share"] == pytest.approx(5 / 13)
    assert out["supervised"]["norm"] == pytest.approx(math.sqrt(5))  # (1, 2)
    assert out["cosine_supervised_unlabeled"] == pytest.approx(3 / (math.sqrt(5) * math.sqrt(2)))
    # AdamW's per-parameter scaling: b becomes (0, 1), u (1, 0.5), the total (2, 1.5), |total|^2 = 6.25
    scaled = tool.gradient_shares(grads, unlabeled=["u"], preconditioner=torch.tensor([1.0, 0.5]))
    assert {k: v["share"] for k, v in scaled["families"].items()} == pytest.approx({"a": 0.32, "b": 0.24, "u": 0.44})
    # the groups scaled too: supervised (1, 1), unlabeled (1, 0.5)
    assert scaled["supervised"]["share"] == pytest.approx(0.56) and scaled["unlabeled"]["norm"] == pytest.approx(1.25 ** 0.5)
    # group sums handed in (as the tool's loop does) give the same report
    groups = tool.group_gradients(grads, unlabeled=["u"])
    assert tool.gradient_shares(grads, ["u"], groups=groups) == out
    assert tool.gradient_shares(grads, ["u"], torch.tensor([1.0, 0.5]), groups=groups) == scaled
    # no unlabeled term: the supervised group is everything, the cosine 0
    alone = tool.gradient_shares({"a": torch.tensor([3.0, 4.0])}, unlabeled=["u"])
    assert alone["supervised"]["share"] == pytest.approx(1.0) and alone["unlabeled"]["norm"] == 0.0
    assert alone["cosine_supervised_unlabeled"] == 0.0


def test_module_norms_by_hand(tool):
    out = tool.module_norms(torch.tensor([3.0, 4.0, 1.0, 2.0, 2.0]), ["head.w", "head.b", "backbone.x"], [1, 1, 3])
    assert out == pytest.approx({"head": 5.0, "backbone": 3.0})


def test_unlabeled_gradient_follows_its_weight(tool, single_thread):
    """The same batches twice, SEMI.CMCR_WEIGHT 5 then 10: every unlabeled family's gradient doubles, every
    supervised one is unchanged, and the shares sum to 1."""
    small = ["DATASETS.SHAPES.IMAGE_SIZE", "64", "INPUT.CROP.SIZE", "(64, 64)", "INPUT.RESIZE_BASE", "64",
             "DATASETS.SHAPES.NUM_TRAIN", "10", "DATASETS.SHAPES.NUM_VAL", "2", "DATASETS.SHAPES.NUM_LABELED", "4",
             "SOLVER.IMS_PER_BATCH", "2", "SOLVER.IMS_PER_BATCH_LABELED", "2", "SOLVER.IMS_PER_BATCH_UNLABELED", "2",
             "SEED", "0", "SEMI.ORACLE_LABELS", "True"]  # the oracle: l_mask has targets from the first step
    config = str(REPO_ROOT / "configs" / "tiny" / "hvlformer_tiny_shapes_semi_random.yaml")
    runs = [tool.main(["--config-file", config, "--steps", "1", "--opts", *small, "SEMI.CMCR_WEIGHT", weight])
            ["measurements"][0] for weight in ("5.0", "10.0")]
    base, doubled = runs
    unlabeled = {"loss_cmcr_mask", "loss_cmcr_class", "loss_cmcr_align"}
    assert unlabeled <= set(base["families"]) and base["families"]["loss_cmcr_mask"]["norm"] > 0
    for family, entry in base["families"].items():
        factor = 2.0 if family in unlabeled else 1.0
        assert doubled["families"][family]["norm"] == pytest.approx(factor * entry["norm"], rel=1e-3), family
    assert sum(v["share"] for v in base["families"].values()) == pytest.approx(1.0, abs=1e-4)
    assert base["supervised"]["share"] + base["unlabeled"]["share"] == pytest.approx(1.0, abs=1e-4)
    assert doubled["unlabeled"]["share"] > base["unlabeled"]["share"]
    assert 0 < base["clip_factor"] <= 1 and base["weights"] == "(config start)" and base["iteration"] == 0


def test_a_runs_checkpoints_with_adamw_state(tool, tmp_path):
    """--run: every periodic checkpoint at its own iteration, with AdamW's second moments from the file."""
    out = short_semi_run(tmp_path / "semi", "SEMI.TEACHER", "ema")
    report = tool.main(["--run", str(out), "--steps", "1", "--opts", "SEMI.ORACLE_LABELS", "True"])
    measured = report["measurements"]
    assert [(m["iteration"], m["weights"]) for m in measured] == [(1, "model_0000000.pth"), (2, "model_0000001.pth")]
    for m in measured:
        adam = m["adam"]
        assert sum(adam["families"].values()) == pytest.approx(1.0, abs=1e-4)
        assert adam["supervised"] + adam["unlabeled"] == pytest.approx(1.0, abs=1e-4)
        assert adam["families"] != pytest.approx({k: v["share"] for k, v in m["families"].items()})  # rescaled
    with pytest.raises(FileNotFoundError, match="no model_NNNNNNN.pth"):
        tool.main(["--run", str(tmp_path)])
