"""tools/semi_vs_supervised.py: the command line of each run, reuse of finished runs, the summary.

The training runs themselves are replaced by a fake ``train_net.py`` process; the benchmark numbers are in
docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path
from typing import List

import numpy as np
import pytest


@pytest.fixture()
def tool(load_tool):
    return load_tool("semi_vs_supervised")


@pytest.fixture()
def fake_train(tool, monkeypatch):
    """Replace the training process: it writes the log and checkpoint a real run leaves and reports an
    mIoU of 40 + the number of runs so far (square IoU: 10 + that number, in the format of detectron2's
    SemSegEvaluator log line); returns the list of command lines it was called with."""
    calls: List[List[str]] = []

    def fake_run(command, cwd, env, capture_output, text):
        calls.append(command)
        out = Path(command[command.index("OUTPUT_DIR") + 1])
        miou = 40.0 + len(calls)
        results = (f"OrderedDict([('sem_seg', {{'mIoU': np.float64({miou}), 'IoU-background': np.float64(97.5), "
                   f"'BoundaryIoU-background': np.float64(3.0), 'min(IoU, B-Iou)-background': np.float64(3.0), "
                   f"'IoU-square': np.float64({miou - 30}), 'mACC': np.float64(80.0)}})])\n")
        log = results + f"copypaste: Task: sem_seg\ncopypaste: mIoU,fwIoU,mACC,pACC\ncopypaste: {miou:.4f},1.0,2.0,3.0\n"
        (out / "log.txt").write_text(log)
        (out / "model_final.pth").write_bytes(b"weights")
        return subprocess.CompletedProcess(command, 0, stdout=log, stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)  # also the one tools/_common.py calls
    return calls


def _args(tmp_path: Path, **overrides) -> argparse.Namespace:
    values = dict(num_labeled=25, image_size=96, iters=50, workers=0, threads=1, opts=[], semi_opts=[], semi_name="semi",
                  output_dir=tmp_path, clip_weights="", clip_model="")
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


def test_clip_weights_go_to_every_pretrained_arm_and_not_the_random_one(tool, fake_train, tmp_path):
    weights = tmp_path / "other_clip.pt"
    weights.write_bytes(b"other weights")
    args = _args(tmp_path, clip_weights=str(weights))
    for variant in ("supervised", "semi", "supervised_learnable", "supervised_random"):
        tool.run(variant, 0, args)
    for command in fake_train[:3]:
        assert command[-2:] == ["MODEL.HVLFORMER.CLIP.PRETRAINED", str(weights)]
    assert "MODEL.HVLFORMER.CLIP.PRETRAINED" not in fake_train[3]
    # ... but it gets the pretrained config's prompts (the random config keeps the paper's)
    random_arm = fake_train[3]
    assert random_arm[random_arm.index("MODEL.HVLFORMER.TEXT.REFERENCE_TEMPLATE") + 1] == "a photo of a {}."
    assert random_arm[random_arm.index("MODEL.HVLFORMER.TEXT.DESCRIPTIONS") + 1] == \
        "datasets/descriptions/shapes_tiny_clip.json"
    # the run records the weights it was trained from
    recorded = json.loads((tmp_path / "supervised_seed0" / "benchmark_clip.json").read_text())
    assert recorded == {"pretrained": str(weights), "sha256": hashlib.sha256(b"other weights").hexdigest()}


def test_opts_reach_every_arm_and_win_over_the_random_arms_prompts(tool, fake_train, tmp_path):
    """--opts (the paper's prompts here) reach every arm; the random arm's copy of the pretrained config's
    prompts comes before them, and a semi setting or an arm's own switch after them."""
    paper = ["MODEL.HVLFORMER.TEXT.REFERENCE_TEMPLATE", "a clean origami of a {} with attributes: {}"]
    args = _args(tmp_path, opts=paper, semi_opts=["SEMI.CONFIDENCE_THRESHOLD", "0.8"])
    for variant in ("supervised", "semi_no_mask", "supervised_learnable", "supervised_random"):
        tool.run(variant, 0, args)
    for command in fake_train:
        at = len(command) - 1 - command[::-1].index("MODEL.HVLFORMER.TEXT.REFERENCE_TEMPLATE")  # the last one wins
        assert command[at + 1] == paper[1]
    semi = fake_train[1]
    assert semi.index(paper[0]) < semi.index("SEMI.CONFIDENCE_THRESHOLD") < semi.index("SEMI.MASK_CONSISTENCY")


def test_clip_model_goes_with_the_weights_to_the_pretrained_arms(tool, fake_train, tmp_path):
    """--clip-model names the architecture of --clip-weights (the v3 candidate's linear-stem tower); the
    random arm keeps its own."""
    args = _args(tmp_path, clip_model="HVL-Tiny-ViT-P8", clip_weights="v3.pt")
    tool.run("supervised", 0, args)
    tool.run("supervised_random", 0, args)
    assert fake_train[0][-4:] == ["MODEL.HVLFORMER.CLIP.MODEL_NAME", "HVL-Tiny-ViT-P8",
                                  "MODEL.HVLFORMER.CLIP.PRETRAINED", "v3.pt"]
    assert "MODEL.HVLFORMER.CLIP.MODEL_NAME" not in fake_train[1]


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


def _launcher(tool, config, out, root):
    """``run_train_net`` of ``config`` for 3 steps into ``out``, every run counted as finished."""
    from _common import run_train_net

    opts = ["SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out)]
    return lambda: run_train_net(tool.TRAIN_NET, config, opts, out, root, 1, finished=lambda run: True)


def test_run_is_repeated_when_the_clip_weights_change(tool, fake_train, tmp_path):
    """Same command line, other CLIP weights (a checkpoint retrained in place, or another file): not reused.
    Runs from before ``benchmark_clip.json`` are judged by the weights path of their dumped config."""
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"first weights")
    config = tmp_path / "config.yaml"
    config.write_text(f"_BASE_: {tool.SUPERVISED}\nMODEL:\n  HVLFORMER:\n    CLIP:\n      PRETRAINED: '{weights}'\n")
    out = tmp_path / "run"
    launch = _launcher(tool, config, out, tmp_path)
    assert launch() is not None and launch() is None and len(fake_train) == 1
    recorded = json.loads((out / "benchmark_clip.json").read_text())
    assert recorded == {"pretrained": str(weights), "sha256": hashlib.sha256(b"first weights").hexdigest()}
    weights.write_bytes(b"retrained weights")  # same path, other bytes
    assert launch() is not None and len(fake_train) == 2
    assert launch() is None
    # a run from before the weights record: its dumped config names the weights file
    (out / "benchmark_clip.json").unlink()
    (out / "config.yaml").write_text(f"MODEL:\n  HVLFORMER:\n    CLIP:\n      PRETRAINED: {weights}\n")
    assert launch() is None and len(fake_train) == 2
    (out / "config.yaml").write_text("MODEL:\n  HVLFORMER:\n    CLIP:\n      PRETRAINED: other.pt\n")
    assert launch() is not None and len(fake_train) == 3


def test_run_is_repeated_when_the_config_file_changes(tool, fake_train, tmp_path):
    """Same command line and weights, but the config file (or a _BASE_ of it) was edited: not reused. Runs
    from before ``benchmark_config.json`` are judged without it."""
    config = tmp_path / "config.yaml"
    config.write_text(f"_BASE_: {tool.SUPERVISED}\n")
    out = tmp_path / "run"
    launch = _launcher(tool, config, out, tmp_path)
    assert launch() is not None and launch() is None and len(fake_train) == 1
    config.write_text(f"_BASE_: {tool.SUPERVISED}\nMODEL:\n  HVLFORMER:\n    TEXT:\n"
                      "      REFERENCE_TEMPLATE: 'a picture of a {}.'\n")
    assert launch() is not None and len(fake_train) == 2
    assert launch() is None
    (out / "benchmark_config.json").unlink()  # a run from before the config record
    config.write_text(f"_BASE_: {tool.SUPERVISED}\n")
    assert launch() is None and len(fake_train) == 2


def test_run_with_an_outdated_hash_is_judged_by_its_own_config(tool, fake_train, tmp_path):
    """A stored config hash can differ for a run of the same config (a key listed in KEYS_ADDED_LATER after the
    run hashed it): the run's dumped config.yaml then decides, key by key."""
    from _common import resolved_cfg

    out = tmp_path / "run"
    launch = _launcher(tool, tool.SUPERVISED, out, tmp_path)
    assert launch() is not None and len(fake_train) == 1
    (out / "benchmark_config.json").write_text(json.dumps({"config_sha256": "an older hash"}))
    assert launch() is not None and len(fake_train) == 2  # no config.yaml (the fake run dumps none): run again
    (out / "benchmark_config.json").write_text(json.dumps({"config_sha256": "an older hash"}))
    opts = json.loads((out / "benchmark_opts.json").read_text())
    (out / "config.yaml").write_text(resolved_cfg(tool.SUPERVISED, opts).dump())
    assert launch() is None and len(fake_train) == 2  # the run's own config is the requested one: reused
    (out / "config.yaml").write_text(resolved_cfg(tool.SUPERVISED, [*opts, "SOLVER.BASE_LR", "0.123"]).dump())
    assert launch() is not None and len(fake_train) == 3


def test_failed_run_raises_with_its_stderr(tool, monkeypatch, tmp_path):
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(
        command, 1, stdout="", stderr="KeyError: 'Non-existent config key: SEMI.TYPO'"))
    with pytest.raises(RuntimeError, match=r"(?s)semi seed 1 failed:.*SEMI.TYPO"):
        tool.run("semi", 1, _args(tmp_path))


def test_summarise(tool):
    summary = tool.summarise([50.0, 53.0, 56.0])
    assert summary["mean"] == 53.0 and summary["min"] == 50.0 and summary["max"] == 56.0
    assert summary["std"] == pytest.approx(2.45, abs=0.01)  # population std: sqrt(6)
    assert tool.summarise([51.234])["std"] == 0.0


def test_experiments_are_one_command_each(tool, fake_train, tmp_path):
    """(a) anchors, (b) pretraining, (d) table4: the arms' command lines, shared runs, the JSON table."""
    common = ["--iters", "20", "--workers", "0", "--parallel", "1", "--output-dir", str(tmp_path)]
    out = tool.main(["--experiment", "anchors", "--seeds", "0", "1", "--json-out", str(tmp_path / "a.json"), *common])
    assert len(fake_train) == 4
    learnable = [c for c in fake_train if "learnable" in c]
    assert len(learnable) == 2 and all(c[c.index("MODEL.HVLFORMER.QUERY_SOURCE") + 1] == "learnable" for c in learnable)
    assert all(c[-2:] == ["DATASETS.TRAIN", "('shapes_labeled',)"] for c in fake_train)
    assert out["mIoU"]["supervised"]["seeds"] == [0, 1]
    diff = out["textual_minus_learnable"]
    assert diff["runs"] == [round(out["mIoU"]["supervised"]["runs"][i] - out["mIoU"]["supervised_learnable"]["runs"][i], 2)
                            for i in range(2)]
    assert json.loads((tmp_path / "a.json").read_text()) == out
    # the machine the numbers came from (runs are deterministic on one machine only)
    import torch
    environment = out["setup"]["environment"]
    assert environment["torch"] == torch.__version__ and environment["numpy"] == np.__version__
    assert environment["cpu"] and set(environment) == {"cpu", "python", "torch", "numpy", "opencv", "open_clip"}

    # (b) reuses the supervised runs and adds the random-init ones (another config)
    out = tool.main(["--experiment", "pretraining", "--seeds", "0", "1", *common])
    assert len(fake_train) == 6
    assert all(c[c.index("--config-file") + 1] == str(tool.RANDOM) for c in fake_train[4:])
    assert set(out) >= {"mIoU", "pretrained_minus_random"}

    # (d) the toy Table 4: first and last rows on --seeds, the middle rows on --row-seeds
    out = tool.main(["--experiment", "table4", "--seeds", "0", "1", "--row-seeds", "0", *common])
    rows = list(out["mIoU"])
    assert rows == ["t4_baseline", "t4_tqdm", "t4_htqg", "t4_hqg_levels", "t4_sre", "supervised", "semi_only_mask",
                    "semi_no_align", "semi"]
    assert out["mIoU"]["t4_baseline"]["seeds"] == [0, 1] and out["mIoU"]["t4_sre"]["seeds"] == [0]
    baseline = [c for c in fake_train if str(tmp_path / "t4_baseline_seed0") in c][0]
    for key, value in (("MODEL.HVLFORMER.QUERY_SOURCE", "learnable"), ("MODEL.HVLFORMER.SRE.MODE", "none"),
                       ("MODEL.HVLFORMER.PTRM.MODE", "none"), ("MODEL.HVLFORMER.NUM_QUERY_LEVELS", "1")):
        assert baseline[baseline.index(key) + 1] == value
    # the paper's baseline (TQDM): textual queries from the class names, otherwise the learnable row's setting
    tqdm_row = [c for c in fake_train if str(tmp_path / "t4_tqdm_seed0") in c][0]
    assert "MODEL.HVLFORMER.QUERY_SOURCE" not in tqdm_row
    for key, value in (("MODEL.HVLFORMER.TEXT.PROMPT_STYLE", "names"), ("MODEL.HVLFORMER.SRE.MODE", "none"),
                       ("MODEL.HVLFORMER.PTRM.MODE", "none"), ("MODEL.HVLFORMER.NUM_QUERY_LEVELS", "1")):
        assert tqdm_row[tqdm_row.index(key) + 1] == value
    htqg_row = [c for c in fake_train if str(tmp_path / "t4_htqg_seed0") in c][0]
    assert "MODEL.HVLFORMER.TEXT.PROMPT_STYLE" not in htqg_row  # + HTQG: the config's descriptions
    # the paper's baseline against learnable queries: both rows of seeds 0 and 1; seed 0's are reused
    launched = len(fake_train)
    tqdm = tool.main(["--experiment", "tqdm", "--seeds", "0", "1", *common])
    assert list(tqdm["mIoU"]) == ["t4_baseline", "t4_tqdm"] and len(fake_train) == launched + 1  # t4_tqdm seed 1
    assert tqdm["tqdm_minus_learnable"]["runs"] == [round(tqdm["mIoU"]["t4_tqdm"]["runs"][i]
                                                          - tqdm["mIoU"]["t4_baseline"]["runs"][i], 2) for i in range(2)]
    only_mask = [c for c in fake_train if str(tmp_path / "semi_only_mask_seed0") in c][0]
    assert only_mask[only_mask.index("SEMI.CLASS_CONSISTENCY") + 1] == "False"
    assert "full_minus_baseline" in out

    # (c) and (a) in one command: every run above is reused (supervised, semi, learnable of seeds 0, 1)
    launched = len(fake_train)
    out = tool.main(["--experiment", "semi_and_anchors", "--seeds", "0", "1", *common])
    assert len(fake_train) == launched and list(out["mIoU"]) == ["supervised", "semi", "supervised_learnable"]
    for name, arm, minus in (("semi_minus_supervised", "semi", "supervised"),
                             ("textual_minus_learnable", "supervised", "supervised_learnable")):
        assert out[name]["runs"] == [round(out["mIoU"][arm]["runs"][i] - out["mIoU"][minus]["runs"][i], 2)
                                     for i in range(2)]


def test_only_runs_the_named_arms(tool, fake_train, tmp_path):
    """--only semi trains the semi arm alone: its table, no difference; the full command then trains only what
    is missing (the supervised runs) and reuses the semi ones."""
    common = ["--iters", "20", "--workers", "0", "--parallel", "1", "--output-dir", str(tmp_path), "--seeds", "0", "1"]
    out = tool.main(["--only", "semi", "--json-out", str(tmp_path / "semi.json"), *common])
    assert list(out["mIoU"]) == ["semi"] and out["mIoU"]["semi"]["runs"] == [41.0, 42.0]
    assert out["setup"]["only"] == ["semi"] and "semi_minus_supervised" not in out
    assert json.loads((tmp_path / "semi.json").read_text()) == out
    assert [c[c.index("OUTPUT_DIR") + 1] for c in fake_train] == [str(tmp_path / "semi_seed0"), str(tmp_path / "semi_seed1")]
    full = tool.main(common)
    assert len(fake_train) == 4 and all("supervised_seed" in c[c.index("OUTPUT_DIR") + 1] for c in fake_train[2:])
    assert full["mIoU"]["semi"]["runs"] == [41.0, 42.0] and full["semi_minus_supervised"]["runs"] == [-2.0, -2.0]
    with pytest.raises(SystemExit):
        tool.main(["--only", "supervised_learnable", *common])  # not an arm of (c)


def test_semi_opts_outside_semi_are_named_as_unpaired(tool, fake_train, tmp_path, capsys):
    """A model key in --semi-opts (learnable queries here) reaches the semi runs only: the tool warns and the JSON
    records it, so a semi - supervised difference that compares two models says so; SEMI. keys are paired."""
    common = ["--iters", "20", "--workers", "0", "--parallel", "1", "--output-dir", str(tmp_path), "--seeds", "0"]
    paired = tool.main(["--semi-opts", "SEMI.TEACHER", "ema", *common])
    assert "semi_opts_not_in_supervised_arms" not in paired["setup"] and "reach the semi arms only" not in \
        capsys.readouterr().err
    out = tool.main(["--semi-name", "learnable", "--semi-opts", "SEMI.TEACHER", "ema", "MODEL.HVLFORMER.QUERY_SOURCE",
                     "learnable", *common])
    assert out["setup"]["semi_opts_not_in_supervised_arms"] == ["MODEL.HVLFORMER.QUERY_SOURCE"]
    assert "--semi-opts MODEL.HVLFORMER.QUERY_SOURCE reach the semi arms only" in capsys.readouterr().err
    supervised = [c for c in fake_train if "supervised_seed0" in c[c.index("OUTPUT_DIR") + 1]]
    assert len(supervised) == 1 and "MODEL.HVLFORMER.QUERY_SOURCE" not in supervised[0]


def test_class_ious_reads_the_last_evaluation(tool):
    log = ("OrderedDict([('sem_seg', {'mIoU': np.float64(50.0), 'IoU-square': np.float64(12.5), 'IoU-cross': nan})])\n"
           "copypaste: 50.0\n"
           "OrderedDict([('sem_seg', {'mIoU': 60.0, 'IoU-square': 40.53, 'BoundaryIoU-square': 29.3, "
           "'IoU-a b': np.float64(7.006)})])\n")
    assert tool.class_ious(log) == {"square": 40.53, "a b": 7.01}
    assert tool.class_ious("no evaluation yet") == {}


def test_ceiling_experiment_and_class_ious(tool, fake_train, tmp_path):
    """The ceiling arm trains on every image of shapes_train (same config, seed and steps); every arm's
    per-class IoUs come back per seed, next to the mIoU."""
    common = ["--iters", "20", "--workers", "0", "--parallel", "1", "--output-dir", str(tmp_path)]
    out = tool.main(["--experiment", "ceiling", "--seeds", "0", "1", *common])
    assert list(out["mIoU"]) == ["supervised", "semi", "supervised_all_labeled"]
    ceiling = [c for c in fake_train if "supervised_all_labeled_seed" in c[c.index("OUTPUT_DIR") + 1]]
    assert len(ceiling) == 2
    assert all(c[-2:] == ["DATASETS.TRAIN", "('shapes_train',)"] and c[c.index("--config-file") + 1] == str(tool.SUPERVISED)
               for c in ceiling)
    assert set(out) >= {"semi_minus_supervised", "all_labeled_minus_supervised", "class_IoU"}
    for arm in out["mIoU"]:
        runs = out["mIoU"][arm]["runs"]
        assert out["class_IoU"][arm]["square"] == [round(r - 30, 2) for r in runs]  # same seed order as the mIoU
        assert out["class_IoU"][arm]["background"] == [97.5, 97.5]
        assert out["evaluations"][arm] == {"0": {}, "1": {}}  # the fake runs write no metrics.json


@pytest.mark.parametrize("experiment,key", [("caa", "MODEL.HVLFORMER.CAA.ENABLED"),
                                            ("ecac", "MODEL.HVLFORMER.ECAC.ENABLED"),
                                            ("class_refinement", "MODEL.HVLFORMER.LSMSEG.CLASS_REFINEMENT"),
                                            ("fusion", "MODEL.HVLFORMER.LSMSEG.FUSION")])
def test_thesis_module_experiments(tool, fake_train, tmp_path, experiment, key):
    """(f) supervised vs supervised + one thesis module: the supervised runs keep their folders (reused
    from the other experiments), the module's arm adds its switch after the labeled-only override."""
    common = ["--iters", "20", "--workers", "0", "--parallel", "1", "--output-dir", str(tmp_path)]
    out = tool.main(["--experiment", experiment, "--seeds", "0", "1", *common])
    assert list(out["mIoU"]) == ["supervised", f"supervised_{experiment}"]
    folders = sorted(c[c.index("OUTPUT_DIR") + 1] for c in fake_train)
    assert folders == sorted(str(tmp_path / f"{arm}_seed{s}") for arm in out["mIoU"] for s in (0, 1))
    module_runs = [c for c in fake_train if f"supervised_{experiment}_seed" in c[c.index("OUTPUT_DIR") + 1]]
    assert len(module_runs) == 2 and all(c[c.index(key) + 1] == "True" for c in module_runs)
    assert all(c[c.index("--config-file") + 1] == str(tool.SUPERVISED) for c in fake_train)
    assert all(key not in c for c in fake_train if c not in module_runs)
    diff = out[f"{experiment}_minus_supervised"]
    assert diff["runs"] == [round(out["mIoU"][f"supervised_{experiment}"]["runs"][i]
                                  - out["mIoU"]["supervised"]["runs"][i], 2) for i in range(2)]
    # the supervised runs are shared with the other experiments: (a) finds them and adds only its own arm
    tool.main(["--experiment", "anchors", "--seeds", "0", "1", *common])
    assert len(fake_train) == 6


def test_evaluations_over_training_count_steps_and_keep_the_teacher(tool, tmp_path):
    """The curve of a run's evaluations from its metrics.json: detectron2 logs a periodic evaluation at the
    index of the step it follows (399 after 400 steps) and the final one at MAX_ITER; training rows are
    skipped; the EMA teacher's curve is kept beside the model's, and left out when not every evaluation
    has one."""
    rows = [{"iteration": 19, "total_loss": 3.0}, {"iteration": 399, "sem_seg/mIoU": 70.004, "teacher/sem_seg/mIoU": 71.5},
            {"iteration": 419, "total_loss": 2.0}, {"iteration": 800, "sem_seg/mIoU": 80.126, "teacher/sem_seg/mIoU": 82.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert tool.evaluations(tmp_path, 800) == {"iteration": [400, 800], "mIoU": [70.0, 80.13],
                                               "teacher_mIoU": [71.5, 82.0]}
    rows[1].pop("teacher/sem_seg/mIoU")
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows))
    assert tool.evaluations(tmp_path, 800) == {"iteration": [400, 800], "mIoU": [70.0, 80.13]}
    assert tool.evaluations(tmp_path / "no_run", 800) == {}


def test_anchors_frozen_freezes_the_hqg_heads_of_its_own_arm_only(tool, fake_train, tmp_path):
    """(a) with the HQG heads frozen: a third arm beside (a)'s two, sharing their runs, with
    SOLVER.LR_MULTIPLIERS for htqg.hqg. at 0 after the labeled-only override; three paired differences."""
    common = ["--iters", "20", "--workers", "0", "--parallel", "1", "--output-dir", str(tmp_path), "--seeds", "0", "1"]
    tool.main(["--experiment", "anchors", *common])
    out = tool.main(["--experiment", "anchors_frozen", *common])
    assert len(fake_train) == 6 and list(out["mIoU"]) == ["supervised", "supervised_hqg_frozen", "supervised_learnable"]
    frozen = fake_train[4:]
    assert all(c[c.index("OUTPUT_DIR") + 1].startswith(str(tmp_path / "supervised_hqg_frozen_seed")) for c in frozen)
    assert all(c[-2:] == ["SOLVER.LR_MULTIPLIERS", "[['htqg.hqg.', 0.0]]"] for c in frozen)
    assert all("SOLVER.LR_MULTIPLIERS" not in c for c in fake_train[:4])
    assert "MODEL.HVLFORMER.QUERY_SOURCE" not in frozen[0]  # textual queries
    runs = {arm: out["mIoU"][arm]["runs"] for arm in out["mIoU"]}
    for name, arm, minus in (("hqg_frozen_minus_learnable", "supervised_hqg_frozen", "supervised_learnable"),
                             ("hqg_frozen_minus_textual", "supervised_hqg_frozen", "supervised"),
                             ("textual_minus_learnable", "supervised", "supervised_learnable")):
        assert out[name]["runs"] == [round(runs[arm][i] - runs[minus][i], 2) for i in range(2)]


def test_only_two_arms_compares_those_two(tool, fake_train, tmp_path):
    """--only with two arms of a three-arm experiment: their table and the one difference between them."""
    common = ["--iters", "20", "--workers", "0", "--parallel", "1", "--output-dir", str(tmp_path), "--seeds", "3"]
    out = tool.main(["--experiment", "anchors_frozen", "--only", "supervised_hqg_frozen", "supervised", *common])
    assert list(out["mIoU"]) == ["supervised", "supervised_hqg_frozen"] and len(fake_train) == 2
    assert [k for k in out if k.endswith(("_minus_learnable", "_minus_textual"))] == ["hqg_frozen_minus_textual"]
    assert out["hqg_frozen_minus_textual"]["runs"] == [round(out["mIoU"]["supervised_hqg_frozen"]["runs"][0]
                                                             - out["mIoU"]["supervised"]["runs"][0], 2)]
    assert set(out["class_IoU"]) == set(out["evaluations"]) == {"supervised", "supervised_hqg_frozen"}
