"""Evaluating during training (``TEST.EVAL_PERIOD``) leaves the training run as it was, and every evaluation
reaches ``metrics.json``.

Building the test loader's iterator draws its base seed from torch's global generator, which the training
step also draws from (the point sampling of the mask losses): without
:func:`hvlformer.engine.trainer.preserved_rng_state` around ``Trainer.test`` the weights after N steps depended
on how often the run was evaluated. detectron2's writer writes every 20 steps and the event storage keeps one
latest value per key, so without :class:`hvlformer.engine.trainer.EvaluationWriter` an evaluation between two
writes was lost (every other one with ``TEST.EVAL_PERIOD 10``; docs/RESULTS.md, (a) over the first 100 steps)."""
import json
import random

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIG, short_semi_run
from hvlformer.engine.trainer import preserved_rng_state


def test_preserved_rng_state_restores_torch_numpy_and_python_generators():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = torch.rand(4), np.random.rand(2), random.random()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    with preserved_rng_state():
        torch.rand(100), np.random.rand(7), random.random()  # what an evaluation might draw
        torch.empty((), dtype=torch.int64).random_()  # a DataLoader iterator's base seed
    after = torch.rand(4), np.random.rand(2), random.random()
    assert torch.equal(after[0], expected[0])
    assert np.array_equal(after[1], expected[1]) and after[2] == expected[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 3-step runs of the random-weight tiny config from one seed: evaluated after every step, and only at
    the end (``TEST.EVAL_PERIOD 0``)."""
    root = tmp_path_factory.mktemp("eval_period")
    return {period: short_semi_run(root / f"eval{period}", "SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", period,
                                   "SOLVER.CHECKPOINT_PERIOD", "100", "SEED", "0", config=TINY_CONFIG)
            for period in ("1", "0")}


def test_weights_do_not_depend_on_the_evaluation_period(runs):
    every_step, never = (torch.load(runs[p] / "model_final.pth", map_location="cpu", weights_only=False)["model"]
                         for p in ("1", "0"))
    assert every_step.keys() == never.keys()
    changed = [k for k in never if not torch.equal(every_step[k], never[k])]
    assert not changed, f"evaluating every step changed {len(changed)} tensors, e.g. {changed[:3]}"


def test_every_evaluation_reaches_metrics_json(runs):
    records = [json.loads(line) for line in (runs["1"] / "metrics.json").read_text().splitlines()]
    evaluated = [r["iteration"] for r in records if "sem_seg/mIoU" in r]
    assert evaluated == [0, 1, 3]  # after steps 1 and 2, and at the end; detectron2's writer alone: [1, 3]
