"""TEST.BEST_CHECKPOINT: the weights of the best evaluation kept as model_best.pth, its record restored on resume,
a metric the evaluation does not produce named as an error, and the EMA teacher's results usable as the metric."""
import json
from types import SimpleNamespace

import pytest
import torch
from detectron2.utils.events import EventStorage

from conftest import TINY_CONFIG, short_semi_run
from hvlformer.engine.trainer import BestCheckpointer


class _RecordingCheckpointer:
    def __init__(self, save_dir):
        self.save_dir, self.saved = str(save_dir), []

    def save(self, name, **extra):
        self.saved.append((name, extra["iteration"]))


def _hook(tmp_path, start_iter, metric="sem_seg/mIoU"):
    checkpointer = _RecordingCheckpointer(tmp_path)
    hook = BestCheckpointer(10, checkpointer, metric)
    hook.trainer = SimpleNamespace(start_iter=start_iter, iter=start_iter, max_iter=100, storage=None)
    return hook, checkpointer


def _evaluate(hook, storage, iteration, miou):
    storage.iter = iteration
    storage.put_scalars(**{"sem_seg/mIoU": miou, "loss_ce": 1.0}, smoothing_hint=False)
    hook.trainer.storage = storage
    hook._best_checking()


def test_best_record_survives_a_resume_and_a_fresh_run_starts_over(tmp_path):
    first, saved = _hook(tmp_path, 0)
    first.before_train()
    with EventStorage(0) as storage:
        for iteration, miou in ((9, 40.0), (19, 55.0), (29, 50.0)):
            _evaluate(first, storage, iteration, miou)
    assert saved.saved == [("model_best", 9), ("model_best", 19)]
    assert json.loads((tmp_path / "model_best.json").read_text()) == \
        {"metric_name": "sem_seg/mIoU", "metric": 55.0, "iteration": 19}
    # resumed after step 29: a worse evaluation keeps the best of before the interruption, a better one replaces it
    resumed, saved = _hook(tmp_path, 30)
    resumed.before_train()
    assert (resumed.best_metric, resumed.best_iter) == (55.0, 19)
    with EventStorage(30) as storage:
        _evaluate(resumed, storage, 39, 52.0)
        assert saved.saved == []
        _evaluate(resumed, storage, 49, 58.0)
    assert saved.saved == [("model_best", 49)]
    # a new run from step 0 in the same folder does not inherit the old best
    fresh, saved = _hook(tmp_path, 0)
    fresh.before_train()
    assert fresh.best_metric is None
    with EventStorage(0) as storage:
        _evaluate(fresh, storage, 9, 30.0)
    assert saved.saved == [("model_best", 9)]


def test_a_metric_the_evaluation_does_not_produce_is_an_error(tmp_path):
    hook, saved = _hook(tmp_path, 0, metric="sem_seg/miou")
    with EventStorage(0) as storage, pytest.raises(ValueError, match=r"'sem_seg/miou'.*sem_seg/mIoU"):
        _evaluate(hook, storage, 9, 40.0)
    assert saved.saved == []


def test_other_processes_of_a_distributed_run_neither_check_nor_save(tmp_path, monkeypatch):
    """detectron2's evaluation stores its results on the main process only: another process must not take the
    missing metric for a wrong name."""
    from detectron2.utils import comm

    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    hook, saved = _hook(tmp_path, 0)
    with EventStorage(0) as storage:
        storage.put_scalars(loss_ce=1.0)
        hook.trainer.storage = storage
        hook._best_checking()
    assert saved.saved == [] and not (tmp_path / "model_best.json").exists()


def test_model_best_holds_the_weights_of_the_best_evaluation(tmp_path):
    """3 steps of the random-weight tiny config, evaluated after every step, a checkpoint after every step:
    model_best.pth equals the checkpoint of the step with the best mIoU in metrics.json (the first one on a tie)."""
    out = short_semi_run(tmp_path / "run", "SOLVER.MAX_ITER", "3", "TEST.EVAL_PERIOD", "1", "SEED", "0",
                         "TEST.BEST_CHECKPOINT.METRIC", "sem_seg/mIoU", config=TINY_CONFIG)
    evaluations = [(r["iteration"], r["sem_seg/mIoU"]) for r in map(json.loads, (out / "metrics.json").read_text().splitlines())
                   if "sem_seg/mIoU" in r]
    assert [i for i, _ in evaluations] == [0, 1, 3]
    best_iteration, best = max(evaluations, key=lambda e: (e[1], -e[0]))
    record = json.loads((out / "model_best.json").read_text())
    assert record["iteration"] == best_iteration and record["metric"] == pytest.approx(best)
    source = out / ("model_final.pth" if best_iteration == 3 else f"model_{best_iteration:07d}.pth")
    best_weights, source_weights = (torch.load(p, map_location="cpu", weights_only=False)["model"]
                                    for p in (out / "model_best.pth", source))
    assert all(torch.equal(best_weights[k], source_weights[k]) for k in source_weights)


def test_the_ema_teachers_results_can_choose_the_best_checkpoint(tmp_path):
    """The teacher's evaluation hook runs before the best-checkpoint hook, so "teacher/sem_seg/mIoU" exists when
    it is read (in the other order the run stops with the metric named as missing)."""
    out = short_semi_run(tmp_path / "semi", "TEST.EVAL_PERIOD", "1", "SEMI.TEACHER", "ema",
                         "TEST.BEST_CHECKPOINT.METRIC", "teacher/sem_seg/mIoU")
    assert json.loads((out / "model_best.json").read_text())["metric_name"] == "teacher/sem_seg/mIoU"
    assert (out / "model_best.pth").is_file()
