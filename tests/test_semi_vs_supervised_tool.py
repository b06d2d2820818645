"""tools/semi_vs_supervised.py: the command line of each run, reuse of finished runs, the summary.

The training runs themselves are replaced by a fake ``train_net.py`` process; the benchmark numbers are in
docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
from pathlib import Path
from typing import List

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "semi_vs_supervised.py"


@pytest.fixture()
def tool():
    spec = importlib.util.spec_from_file_location("semi_vs_supervised", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def fake_train(tool, monkeypatch):
    """Replace the training process: it writes the log and checkpoint a real run leaves and reports an
    mIoU of 40 + the number of runs so far; returns the list of command lines it was called with."""
    calls: List[List[str]] = []

    def fake_run(command, cwd, env, capture_output, text):
        calls.append(command)
        out = Path(command[command.index("OUTPUT_DIR") + 1])
        miou = 40.0 + len(calls)
        log = f"copypaste: Task: sem_seg\ncopypaste: mIoU,fwIoU,mACC,pACC\ncopypaste: {miou:.4f},1.0,2.0,3.0\n"
        (out / "log.txt").write_text(log)
        (out / "model_final.pth").write_bytes(b"weights")
        return subprocess.CompletedProcess(command, 0, stdout=log, stderr="")

    monkeypatch.setattr(tool.subprocess, "run", fake_run)
    return calls


def _args(tmp_path: Path, **overrides) -> argparse.Namespace:
    values = dict(num_labeled=25, image_size=96, iters=50, workers=0, threads=1, semi_opts=[], semi_name="semi",
                  output_dir=tmp_path)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_run_command_line_and_folder(tool, fake_train, tmp_path):
    args = _args(tmp_path, semi_name="t08", semi_opts=["SEMI.CONFIDENCE_THRESHOLD", "0.8"])
    assert tool.run("semi_no_mask", 2, args) == pytest.approx(41.0)
    command = fake_train[0]
    assert command[command.index("--config-file") + 1] == str(tool.SEMI)
    assert command[command.index("OUTPUT_DIR") + 1] == str(tmp_path / "t08_no_mask_seed2")
    # the seed fixes the split and the run; the semi setting and then the ablation switch come last
    assert command[command.index("DATASETS.SHAPES.SEED") + 1] == "2" and command[command.index("SEED") + 1] == "2"
    assert command[-4:] == ["SEMI.CONFIDENCE_THRESHOLD", "0.8", "SEMI.MASK_CONSISTENCY", "False"]
    assert json.loads((tmp_path / "t08_no_mask_seed2" / "benchmark_opts.json").read_text()) == command[4:]

    tool.run("supervised", 2, args)
    supervised = fake_train[1]
    assert "SEMI.CONFIDENCE_THRESHOLD" not in supervised  # semi settings stay out of the supervised run
    assert supervised[-2:] == ["DATASETS.TRAIN", "('shapes_labeled',)"]
    assert supervised[supervised.index("OUTPUT_DIR") + 1] == str(tmp_path / "supervised_seed2")


def test_finished_run_is_reused_only_for_the_same_command_line(tool, fake_train, tmp_path):
    args = _args(tmp_path)
    first = tool.run("semi", 0, args)
    assert tool.run("semi", 0, args) == first and len(fake_train) == 1  # read back from its log
    changed = _args(tmp_path, semi_opts=["SEMI.CMCR_WEIGHT", "2.0"])
    assert tool.run("semi", 0, changed) == pytest.approx(42.0) and len(fake_train) == 2
    # a run without its final checkpoint (interrupted) is repeated
    (tmp_path / "semi_seed0" / "model_final.pth").unlink()
    tool.run("semi", 0, changed)
    assert len(fake_train) == 3


def test_failed_run_raises_with_its_stderr(tool, monkeypatch, tmp_path):
    monkeypatch.setattr(tool.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
        command, 1, stdout="", stderr="KeyError: 'Non-existent config key: SEMI.TYPO'"))
    with pytest.raises(RuntimeError, match=r"(?s)semi seed 1 failed:.*SEMI.TYPO"):
        tool.run("semi", 1, _args(tmp_path))


def test_summarise(tool):
    summary = tool.summarise([50.0, 53.0, 56.0])
    assert summary["mean"] == 53.0 and summary["min"] == 50.0 and summary["max"] == 56.0
    assert summary["std"] == pytest.approx(2.45, abs=0.01)  # population std: sqrt(6)
    assert tool.summarise([51.234])["std"] == 0.0
