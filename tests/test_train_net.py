"""End-to-end runs of projects/HVLFormer/train_net.py on the synthetic dataset, as a user runs it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TINY_CONFIG, TINY_PRETRAINED_CONFIG

TRAIN_NET = REPO_ROOT / "projects" / "HVLFormer" / "train_net.py"
# A small, fast variant of the tiny config: 64 px images, few iterations.
FAST = ["DATASETS.SHAPES.IMAGE_SIZE", "64", "DATASETS.SHAPES.NUM_TRAIN", "48", "DATASETS.SHAPES.NUM_VAL", "8",
        "INPUT.CROP.SIZE", "(64, 64)", "INPUT.RESIZE_BASE", "64", "SOLVER.IMS_PER_BATCH", "4",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "5", "MODEL.HVLFORMER.TRAIN_NUM_POINTS", "512",
        "SEED", "0"]


def run(args, env_extra=None, timeout=600, config=TINY_CONFIG):
    env = dict(os.environ)
    env.update(env_extra or {})
    result = subprocess.run([sys.executable, str(TRAIN_NET), "--config-file", str(config), *args],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.json").read_text().splitlines() if line.strip()]


def final_miou(log):
    """mIoU from detectron2's last "copypaste: mIoU,fwIoU,mACC,pACC" table in the log."""
    found = re.findall(r"copypaste: mIoU,fwIoU,mACC,pACC\n.*copypaste: ([0-9.]+),", log)
    assert found, "no mIoU in the log"
    return float(found[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    log = run(["--num-gpus", "1", *FAST, "SOLVER.MAX_ITER", "200", "SOLVER.CHECKPOINT_PERIOD", "100",
               "TEST.EVAL_PERIOD", "200", "OUTPUT_DIR", str(out)])
    return out, log


def test_training_decreases_loss_and_beats_chance(trained):
    out, log = trained
    records = [r for r in metrics(out) if "total_loss" in r]
    first, last = records[0]["total_loss"], records[-1]["total_loss"]  # medians over 20 iterations
    assert last < 0.8 * first, (first, last)
    # 6 classes, about 75 % background: predicting background everywhere scores about 13 mIoU
    assert final_miou(log) > 20.0
    assert (out / "model_final.pth").exists() and (out / "model_0000099.pth").exists()


def test_eval_only_reproduces_metrics(trained):
    out, log = trained
    eval_log = run(["--eval-only", *FAST, "MODEL.WEIGHTS", str(out / "model_final.pth"),
                    "OUTPUT_DIR", str(out / "eval")])
    assert final_miou(eval_log) == pytest.approx(final_miou(log), abs=1e-6)


def test_resume_continues_from_last_iteration(trained, tmp_path):
    out, _ = trained
    # a copy that stops at iteration 100 (checkpoint model_0000099.pth) then resumes to 110
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    (resume_dir / "model_0000099.pth").write_bytes((out / "model_0000099.pth").read_bytes())
    (resume_dir / "last_checkpoint").write_text("model_0000099.pth")
    log = run(["--resume", *FAST, "SOLVER.MAX_ITER", "110", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(resume_dir)])
    assert "Starting training from iteration 100" in log
    iterations = [r["iteration"] for r in metrics(resume_dir) if "total_loss" in r]
    assert iterations and min(iterations) >= 100 and max(iterations) == 109


def test_resume_skips_a_truncated_last_checkpoint(trained, tmp_path):
    """kill -9 while saving model_0000149.pth (named in last_checkpoint): resume from model_0000099.pth."""
    out, _ = trained
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    (resume_dir / "model_0000099.pth").write_bytes((out / "model_0000099.pth").read_bytes())
    (resume_dir / "model_0000149.pth").write_bytes((out / "model_0000099.pth").read_bytes()[:100_000])
    (resume_dir / "last_checkpoint").write_text("model_0000149.pth")
    log = run(["--resume", *FAST, "SOLVER.MAX_ITER", "102", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(resume_dir)])
    assert "model_0000149.pth is damaged" in log and "resumed from" in log
    assert "Starting training from iteration 100" in log


def test_eval_only_refuses_a_checkpoint_of_another_config(trained):
    """A 'linear' checkpoint evaluated with the 'text' classifier: an error naming the layers, not garbage."""
    out, _ = trained
    result = subprocess.run(
        [sys.executable, str(TRAIN_NET), "--config-file", str(TINY_CONFIG), "--eval-only", *FAST,
         "MODEL.WEIGHTS", str(out / "model_final.pth"), "MODEL.HVLFORMER.CLASSIFIER", "text",
         "OUTPUT_DIR", str(out / "eval_text")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "CheckpointMismatchError" in result.stderr and "transformer_decoder.class_embed" in result.stderr
    assert f"--config-file {out / 'config.yaml'}" in result.stderr


def test_two_process_gloo_run(tmp_path):
    out = tmp_path / "ddp"
    log = run(["--num-gpus", "2", *FAST, "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "4", "OUTPUT_DIR", str(out)],
              env_extra={"OMP_NUM_THREADS": "1"})
    assert "mIoU" in log
    assert (out / "model_final.pth").exists()


@pytest.mark.slow
def test_tiny_config_reaches_50_miou(tmp_path):
    """The README's tiny training command, unchanged: >= 50 mIoU on shapes_val (about 10 min on 2 cores)."""
    log = run(["OUTPUT_DIR", str(tmp_path / "tiny")], timeout=1800, config=TINY_PRETRAINED_CONFIG)
    assert final_miou(log) >= 50.0
