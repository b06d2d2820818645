"""tools/pseudo_label_quality.py: the pixel tallies by hand, and a run's own unlabeled images with the labels
the training never read (a 2-step semi run of the random-weight tiny config)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("pseudo_label_quality")


def test_tally_by_hand(tool):
    tally = tool.PseudoLabelTally(3, threshold=0.9)
    probs = torch.tensor([[[0.95, 0.50], [0.05, 0.00]],   # class 0
                          [[0.05, 0.40], [0.95, 0.02]],   # class 1
                          [[0.00, 0.10], [0.00, 0.98]]])  # class 2
    label = np.array([[0, 1], [2, 255]])  # the last pixel is ignored
    tally.add(probs, label)
    out = tally.summary(["a", "b", "c"])
    # argmax: 0 (right), 0 (wrong, truth 1), 1 (wrong, truth 2); confident: pixels 1 and 3 only
    assert out["pixels"] == 3 and out["accuracy"] == pytest.approx(1 / 3, abs=1e-4)
    assert out["confident_fraction"] == pytest.approx(2 / 3, abs=1e-4)
    assert out["mean_confidence"] == pytest.approx((0.95 + 0.50 + 0.95) / 3, abs=1e-6)  # the ignored 0.98 left out
    assert out["confident_accuracy"] == 0.5
    assert out["precision"] == {"a": 1.0, "b": 0.0, "c": None}
    assert out["recall"] == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert out["confident_confusion"] == {"a": {"a": 1}, "b": {}, "c": {"b": 1}}
    assert out["label_pixels"] == {"a": 1, "b": 1, "c": 1}


def test_run_on_its_unlabeled_images(tool, tmp_path):
    out = tmp_path / "semi"
    opts = ["SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "1",
            "DATASETS.SHAPES.IMAGE_SIZE", "64", "INPUT.CROP.SIZE", "(64, 64)", "INPUT.RESIZE_BASE", "64",
            "DATASETS.SHAPES.NUM_TRAIN", "10", "DATASETS.SHAPES.NUM_VAL", "2", "DATASETS.SHAPES.NUM_LABELED", "4",
            "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out)]
    train = subprocess.run([sys.executable, str(REPO_ROOT / "projects" / "HVLFormer" / "train_net.py"), "--config-file",
                            str(REPO_ROOT / "configs" / "tiny" / "hvlformer_tiny_shapes_semi_random.yaml"), *opts],
                           cwd=REPO_ROOT, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr[-3000:]
    result = tool.main([str(out), "--json-out", str(tmp_path / "q.json")])
    run = result["runs"][0]
    assert run["images"] == 6 and run["pixels"] == 6 * 64 * 64  # the 10 - 4 unlabeled images, every pixel
    assert set(run["precision"]) == {"background", "circle", "square", "triangle", "star", "cross"}
    confident = sum(sum(row.values()) for row in run["confident_confusion"].values())
    assert confident == pytest.approx(run["confident_fraction"] * run["pixels"], abs=1.0)
    # the hidden labels are those of the unlabeled images: the ones the seeded split left out of the 4 labeled
    import cv2
    from hvlformer.data.datasets.register_shapes import shapes_root

    labeled = set(np.random.default_rng(0).permutation(10)[:4].tolist())
    files = sorted((shapes_root(6, 64, 0) / "labels" / "train").glob("*.png"))  # $DETECTRON2_DATASETS of the tests
    assert len(files) == 10
    counts = sum(np.bincount(cv2.imread(str(f), cv2.IMREAD_UNCHANGED).ravel(), minlength=6)
                 for i, f in enumerate(files) if i not in labeled)
    assert list(run["label_pixels"].values()) == counts.tolist()
    with pytest.raises(FileNotFoundError, match="config.yaml not found"):
        tool.evaluate_run(tmp_path)

    # over training: the checkpoints after 1 and 2 steps, in order; the last one is model_final's twin, and the
    # first one's pseudo-labels are its own. Two steps at the warm-up's LR hardly move the weights, so the first
    # checkpoint is zeroed here to see that its weights really are the ones evaluated (not model_final's twice)
    first = torch.load(out / "model_0000000.pth", map_location="cpu", weights_only=False)
    first["model"] = {k: v * 0 if v.is_floating_point() else v for k, v in first["model"].items()}
    torch.save(first, out / "model_0000000.pth")
    over = tool.main([str(out), "--over-training"])["runs"][0]["over_training"]
    assert [(o["iteration"], o["weights"]) for o in over] == [(1, "model_0000000.pth"), (2, "model_0000001.pth")]
    assert run["weights"] == "model_final.pth"
    strip = lambda d: {k: v for k, v in d.items() if k not in ("iteration", "weights")}
    assert strip(over[1]) == strip(run)
    assert strip(over[0]) != strip(run)
    assert over[0]["label_pixels"] == run["label_pixels"]
    assert [i for i, _ in tool.run_checkpoints(out)] == [1, 2]
    (out / "model_0000000.pth").rename(out / "model_0000010.pth")  # numeric order, not the order found
    (out / "model_0000001.pth").rename(out / "model_0000009.pth")
    assert [i for i, _ in tool.run_checkpoints(out)] == [10, 11]
    with pytest.raises(FileNotFoundError, match="no model_NNNNNNN.pth checkpoints"):
        for path in out.glob("model_0*.pth"):
            path.unlink()
        tool.evaluate_over_training(out)


def test_runs_from_before_the_query_norm_load_as_trained(tmp_path, load_tool):
    """A run's config.yaml from before MODEL.HVLFORMER.QUERY_NORM existed is read back with QUERY_NORM False
    (the plain HQG it was trained with); a config that has the key keeps its own value."""
    common = load_tool("_common")
    old = tmp_path / "old.yaml"
    old.write_text("MODEL:\n  HVLFORMER:\n    QUERY_SOURCE: text\n")
    both_older = ["MODEL.HVLFORMER.QUERY_NORM", "False", "SEMI.CLASS_CONSISTENCY_MIXED", "True",
                  "MODEL.HVLFORMER.QUERY_ZERO_BIAS", "False"]
    assert common.settings_of_older_runs(old) == both_older
    new = tmp_path / "new.yaml"
    new.write_text("MODEL:\n  HVLFORMER:\n    QUERY_NORM: true\n    QUERY_ZERO_BIAS: true\n"
                   "SEMI:\n  CLASS_CONSISTENCY_MIXED: false\n")
    assert common.settings_of_older_runs(new) == []
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert common.settings_of_older_runs(empty) == both_older


def test_config_id_ignores_a_later_key_at_its_old_behaviour(load_tool):
    """A run made before a KEYS_ADDED_LATER key existed is still the same run when the key holds the value of
    the old behaviour (so it is reused), and another run when it does not."""
    common = load_tool("_common")
    config = REPO_ROOT / "configs" / "tiny" / "hvlformer_tiny_shapes_semi.yaml"
    current = common.resolved_cfg(config, [])
    before_the_key = current.clone()
    before_the_key.defrost()
    del before_the_key.SEMI["CLASS_CONSISTENCY_MIXED"]
    assert common.config_id(current) == common.config_id(before_the_key)
    assert common.config_id(common.resolved_cfg(config, ["SEMI.CLASS_CONSISTENCY_MIXED", "False"])) != common.config_id(current)
    # QUERY_NORM's old behaviour is False, not the default True: the default is hashed, False is not
    assert common.config_id(common.resolved_cfg(config, ["MODEL.HVLFORMER.QUERY_NORM", "False"])) != common.config_id(current)
    plain = common.resolved_cfg(config, ["MODEL.HVLFORMER.QUERY_NORM", "False"]).clone()
    plain.defrost()
    del plain.MODEL.HVLFORMER["QUERY_NORM"]
    assert common.config_id(common.resolved_cfg(config, ["MODEL.HVLFORMER.QUERY_NORM", "False"])) == common.config_id(plain)
    assert current.SEMI.CLASS_CONSISTENCY_MIXED is True  # config_id did not edit the config it was given


def test_finished_run_cfg_reads_the_run_and_lets_inference_switches_win(tmp_path, load_tool):
    """A finished run's config comes from its own config.yaml (not from the config file it started from),
    MODEL.WEIGHTS points at its model_final.pth (or the checkpoint given), and ``opts`` override both."""
    common = load_tool("_common")
    config = REPO_ROOT / "configs" / "tiny" / "hvlformer_tiny_shapes.yaml"
    run = tmp_path / "run"
    run.mkdir()
    trained = common.resolved_cfg(config, ["INPUT.RESIZE_BASE", "96", "MODEL.HVLFORMER.CLASSIFIER", "text"])
    (run / "config.yaml").write_text(trained.dump())
    with pytest.raises(FileNotFoundError, match="model_final.pth not found"):
        common.finished_run_cfg(run)
    (run / "model_final.pth").write_bytes(b"")
    cfg = common.finished_run_cfg(run)
    assert cfg.INPUT.RESIZE_BASE == 96 and cfg.MODEL.HVLFORMER.CLASSIFIER == "text"  # the run's, not the file's 128
    assert cfg.MODEL.WEIGHTS == str(run / "model_final.pth")
    assert common.finished_run_cfg(run, run / "model_0000099.pth").MODEL.WEIGHTS == str(run / "model_0000099.pth")
    switched = common.finished_run_cfg(run, opts=["TEST.CLIP_ENSEMBLE.ENABLED", "True", "INPUT.RESIZE_BASE", "64"])
    assert switched.TEST.CLIP_ENSEMBLE.ENABLED is True and switched.INPUT.RESIZE_BASE == 64
    assert common.resolved_cfg(config, []).INPUT.RESIZE_BASE == 128  # the test's premise: the file says 128
