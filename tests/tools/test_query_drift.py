"""tools/query_drift.py: the rebuilt initial model is the run's, and the drift measures on known queries."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIG, TINY_SEMI_CONFIG, short_semi_run


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("query_drift")


@pytest.mark.parametrize("config", [TINY_CONFIG, TINY_SEMI_CONFIG], ids=["supervised", "semi"])
def test_initial_model_is_the_runs_start(tool, tmp_path, config):
    """A run at LR 0 keeps its initial weights: the rebuilt model must equal its checkpoint tensor for tensor
    (not only the queries), for both trainers; the tool then reports no drift."""
    run = short_semi_run(tmp_path / "run", "SOLVER.MAX_ITER", "1", "SOLVER.BASE_LR", "0.0", "SEED", "3",
                         config=config)
    rebuilt = tool.initial_model(run).state_dict()
    saved = torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert set(saved) <= set(rebuilt)
    differing = [key for key in saved if not torch.equal(saved[key], rebuilt[key])]
    assert not differing, differing[:5]
    steps = tool.run_drift(run)["steps"]
    assert [s["step"] for s in steps] == [0, 1]
    assert steps[1]["cos_to_start"] == pytest.approx(1.0, abs=1e-6) and steps[1]["relative_change"] == 0.0


def test_trained_textual_queries_move(tool, tmp_path):
    run = short_semi_run(tmp_path / "run", "SEED", "3", "SOLVER.WARMUP_FACTOR", "1.0", config=TINY_CONFIG)  # 2 steps
    record = tool.run_drift(run)
    assert record["query_source"] == "text" and len(record["classes"]) == 6
    assert [s["step"] for s in record["steps"]] == [0, 1, 2]
    assert 0 < record["steps"][2]["relative_change"] and record["steps"][2]["cos_to_start"] < 1.0


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
