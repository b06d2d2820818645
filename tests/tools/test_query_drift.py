"""tools/query_drift.py: the rebuilt initial model is the run's, and the drift measures on known queries."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_CONFIG, TINY_SEMI_CONFIG, short_semi_run


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("query_drift")


@pytest.fixture(scope="module")
def lr0_runs(tmp_path_factory):
    """One-step runs at LR 0 (their checkpoints hold the initial weights) of the supervised and semi trainers."""
    root = tmp_path_factory.mktemp("lr0")
    return {name: short_semi_run(root / name, "SOLVER.MAX_ITER", "1", "SOLVER.BASE_LR", "0.0", "SEED", "3",
                                 config=config)
            for name, config in (("supervised", TINY_CONFIG), ("semi", TINY_SEMI_CONFIG))}


@pytest.mark.parametrize("trainer", ["supervised", "semi"])
def test_initial_model_is_the_runs_start(tool, lr0_runs, trainer):
    """A run at LR 0 keeps its initial weights: the rebuilt model must equal its checkpoint tensor for tensor
    (not only the queries), for both trainers; the tool then reports no drift."""
    run = lr0_runs[trainer]
    rebuilt = tool.initial_model(run).state_dict()
    saved = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert set(saved) <= set(rebuilt)
    differing = [key for key in saved if not torch.equal(saved[key], rebuilt[key])]
    assert not differing, differing[:5]
    steps = tool.run_drift(run)["steps"]
    assert [s["step"] for s in steps] == [0, 1]
    assert steps[1]["cos_to_start"] == pytest.approx(1.0, abs=1e-6) and steps[1]["relative_change"] == 0.0


def test_every_checkpoint_is_read_in_step_order(tool, lr0_runs, tmp_path):
    """A checkpoint whose HQG weights differ (standing for a trained one) is read at its step: its queries moved,
    model_final.pth (the last step again) is not counted twice."""
    run = Path(shutil.copytree(lr0_runs["supervised"], tmp_path / "run"))
    final = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 0
    moved = {**final, "iteration": 9, "model": dict(final["model"])}
    weight = "htqg.hqg.heads.0.0.weight"
    moved["model"][weight] = final["model"][weight].flip(0)  # another first layer for level 0
    torch.save(moved, run / "model_0000009.pth")
    record = tool.run_drift(run)
    assert record["query_source"] == "text" and len(record["classes"]) == 6
    assert [s["step"] for s in record["steps"]] == [0, 1, 10]
    assert record["steps"][1]["relative_change"] == 0.0 and 0 < record["steps"][2]["relative_change"]
    assert record["steps"][2]["cos_to_start"] < 1.0 and record["steps"][2]["text_cos_to_start"] == 1.0


def test_drift_measures_on_known_queries(tool):
    levels, classes, width = 2, 3, 4
    q0 = torch.zeros(levels, classes, width)
    q0[:, torch.arange(classes), torch.arange(classes)] = 2.0  # mutually orthogonal classes
    text = torch.eye(classes, 5)
    start = {"queries": q0, "text": text}
    assert tool.drift(start, start) == {"cos_to_start": 1.0, "cos_to_start_per_class": [1.0] * 3,
                                        "relative_change": 0.0, "class_cosine": 0.0, "text_cos_to_start": 1.0}
    flipped = q0.clone()
    flipped[:, 0] *= -1  # class 0 reversed: cosine -1, |q - q0| = 2 |q0|
    shared = torch.ones(levels, classes, width)  # every class the same query
    moved = tool.drift(start, {"queries": flipped, "text": text})
    assert moved["cos_to_start_per_class"] == [-1.0, 1.0, 1.0]
    assert moved["cos_to_start"] == pytest.approx(1 / 3, abs=1e-4)
    assert moved["relative_change"] == pytest.approx(2 / 3, abs=1e-4)
    collapsed = tool.drift(start, {"queries": shared, "text": torch.roll(text, 1, dims=0)})
    assert collapsed["class_cosine"] == 1.0 and collapsed["text_cos_to_start"] == 0.0
    assert collapsed["cos_to_start"] == pytest.approx(0.5, abs=1e-4)  # (2, 0, 0, 0) against (1, 1, 1, 1)


def test_run_without_a_fixed_seed_is_refused(tool, tmp_path):
    (tmp_path / "config.yaml").write_text(f"_BASE_: {TINY_CONFIG}\nSEED: -1\n")
    with pytest.raises(ValueError, match="SEED is -1"):
        tool.initial_model(tmp_path)
