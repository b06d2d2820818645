"""tools/pseudo_label_quality.py: the pixel tallies by hand, and a run's own unlabeled images with the labels
the training never read (a 2-step semi run of the random-weight tiny config)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, TINY_SEMI_PRETRAINED_CONFIG, short_semi_run


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
    assert out["unconfident_confusion"] == {"a": {}, "b": {"a": 1}, "c": {}}  # the 0.50 pixel, truth b, argmax a
    assert out["label_pixels"] == {"a": 1, "b": 1, "c": 1}


def test_object_verdicts_by_hand(tool):
    """Two objects of class 1 (one named right, one whose only confident pixel is named 2), one unconfident
    object of class 2."""
    label = np.zeros((8, 8), np.int64)
    label[1:3, 1:3] = 1  # object A
    label[5:7, 5:7] = 1  # object B (not 8-connected to A)
    label[1:3, 5:7] = 2
    probs = torch.zeros(3, 8, 8)
    probs[0] = 1.0
    probs[:, 1:3, 1:3] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    probs[:, 5:7, 5:7] = torch.tensor([0.2, 0.4, 0.4])[:, None, None]
    probs[:, 5, 5] = torch.tensor([0.0, 0.0, 1.0])  # B: one pixel named 2, three unconfident ones
    probs[:, 1:3, 5:7] = torch.tensor([0.3, 0.3, 0.4])[:, None, None]
    tally = tool.PseudoLabelTally(3, threshold=0.9)
    tally.add(probs, label)
    out = tally.summary(["bg", "one", "two"])
    assert out["objects"] == {"bg": {"bg": 1}, "one": {"one": 1, "two": 1}, "two": {"none": 1}}
    # every pixel of a 2 x 2 object is within 2 pixels of its border: no inside pixels
    assert out["recall_edge"]["one"] == pytest.approx(4 / 8) and out["recall_inside"]["one"] is None


def test_object_verdicts_by_area(tool):
    """Objects of 1, 2, 4 and 6 pixels in a 10 x 10 image fall into the <2 %, 2-5 % (2 % itself), 2-5 % and
    >=5 % bins with their own verdicts; the bins add up to ``objects``."""
    assert tool.area_bin_names() == ["<2%", "2-5%", ">=5%"]
    label = np.zeros((10, 10), np.int64)
    label[0, 0] = 1                 # 1 px, named right
    label[0, 5:7] = 1               # 2 px, named 2
    label[4:6, 0:2] = 1             # 4 px, unconfident
    label[8:10, 4:7] = 1            # 6 px, named right
    probs = torch.zeros(3, 10, 10)
    probs[0] = 1.0
    probs[:, label == 1] = torch.tensor([0.0, 1.0, 0.0])[:, None]
    probs[:, 0, 5:7] = torch.tensor([0.0, 0.0, 1.0])[:, None]
    probs[:, 4:6, 0:2] = torch.tensor([0.2, 0.5, 0.3])[:, None, None]
    tally = tool.PseudoLabelTally(3, threshold=0.9)
    tally.add(probs, label)
    out = tally.summary(["bg", "one", "two"])
    by_area = out["objects_by_area"]
    assert by_area["<2%"]["one"] == {"one": 1}
    assert by_area["2-5%"]["one"] == {"two": 1, "none": 1}
    assert by_area[">=5%"]["one"] == {"one": 1} and by_area[">=5%"]["bg"] == {"bg": 1}  # 87 background pixels
    assert out["objects"]["one"] == {"one": 2, "two": 1, "none": 1}


def test_object_edges(tool):
    label = np.zeros((12, 12), np.int64)
    label[2:9, 2:9] = 1
    edges = tool.object_edges(label, width=2)
    # the 7 x 7 block: its 3 x 3 centre is more than 2 pixels from the background
    assert not edges[4:7, 4:7].any() and edges[2:9, 2:9].sum() == 49 - 9
    # the background: the band up to 2 pixels around the block; the image border is not an edge
    assert edges[0:11, 0:11].sum() - 40 == 11 * 11 - 49 and not edges[11, :].any() and not edges[:, 11].any()
    assert edges.sum() == 40 + 72
    # recall on the edge and inside: the block's edge named right, its centre named background
    probs = torch.zeros(2, 12, 12)
    probs[0] = 1.0
    probs[:, 2:9, 2:9] = torch.tensor([0.0, 1.0])[:, None, None]
    probs[:, 4:7, 4:7] = torch.tensor([1.0, 0.0])[:, None, None]
    tally = tool.PseudoLabelTally(2, threshold=0.9)
    tally.add(probs, label)
    out = tally.summary(["bg", "block"])
    assert out["recall_edge"] == {"bg": 1.0, "block": 1.0} and out["recall_inside"] == {"bg": 1.0, "block": 0.0}


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A 2-step semi run of the random-weight tiny config on 10 images (4 labeled), checkpoints after each step."""
    return short_semi_run(tmp_path_factory.mktemp("runs") / "semi")


def test_run_on_its_unlabeled_images(tool, two_step_run, tmp_path):
    out = two_step_run
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
    first_path = tmp_path / "first" / "model_0000000.pth"  # a copy: the module's run stays as trained
    (tmp_path / "first").mkdir()
    for name in ("config.yaml", "model_0000001.pth", "model_final.pth"):
        (tmp_path / "first" / name).symlink_to(out / name)
    first = torch.load(out / "model_0000000.pth", map_location="cpu", weights_only=False)
    first["model"] = {k: v * 0 if v.is_floating_point() else v for k, v in first["model"].items()}
    torch.save(first, first_path)
    over = tool.main([str(tmp_path / "first"), "--over-training"])["runs"][0]["over_training"]
    assert [(o["iteration"], o["weights"]) for o in over] == [(1, "model_0000000.pth"), (2, "model_0000001.pth")]
    assert run["weights"] == "model_final.pth"
    strip = lambda d: {k: v for k, v in d.items() if k not in ("iteration", "weights", "run")}
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


def test_run_on_its_images_from_another_class_table(tool, two_step_run, tmp_path):
    """--classes-file: the same unlabeled images drawn with square's and cross's textures swapped: the same
    hidden labels, other pixels (so other predictions), the table recorded; not with --over-training."""
    plain = tool.main([str(two_step_run)])["runs"][0]
    swapped = tool.main([str(two_step_run), "--classes-file", "shapes_square_cross_textures_swapped.json"])["runs"][0]
    assert swapped["classes_file"] == "shapes_square_cross_textures_swapped.json" and "classes_file" not in plain
    assert swapped["label_pixels"] == plain["label_pixels"] and swapped["images"] == plain["images"] == 6
    assert swapped["mean_confidence"] != plain["mean_confidence"]  # the model saw other images
    with pytest.raises(SystemExit):
        tool.main([str(two_step_run), "--over-training", "--classes-file", "shapes_square_cross_textures_swapped.json"])


def test_run_scored_at_one_decoder_layer(tool, two_step_run):
    """--layer N: the pseudo-labels of decoder layer N (CMCR's numbering 1..DEC_LAYERS); the last layer is the
    default's, an earlier one gives other probabilities on the same pixels; a layer the model lacks is refused,
    and so is --layer with --over-training."""
    plain = tool.main([str(two_step_run)])["runs"][0]
    last = tool.main([str(two_step_run), "--layer", "3"])["runs"][0]  # the tiny random config has 3 decoder layers
    first = tool.main([str(two_step_run), "--layer", "1"])["runs"][0]
    assert last.pop("layer") == 3 and first.pop("layer") == 1 and "layer" not in plain
    assert last == plain
    assert first["label_pixels"] == plain["label_pixels"] and first["mean_confidence"] != plain["mean_confidence"]
    for missing in ("0", "4"):
        with pytest.raises(ValueError, match=r"layers 1\.\.3"):
            tool.main([str(two_step_run), "--layer", missing])
    with pytest.raises(SystemExit):
        tool.main([str(two_step_run), "--over-training", "--layer", "1"])


def test_run_scored_with_the_pseudo_label_refinement(tool, two_step_run):
    """--opts SEMI.LABEL_REFINEMENT_ITERATIONS N: the same images and labels, the teacher's maps refined with the
    image's colours (so other confidences), the overrides recorded; --opts is refused with --teacher clip and
    without pairs."""
    plain = tool.main([str(two_step_run)])["runs"][0]
    refined = tool.main([str(two_step_run), "--opts", "SEMI.LABEL_REFINEMENT_ITERATIONS", "10"])["runs"][0]
    assert refined["opts"] == ["SEMI.LABEL_REFINEMENT_ITERATIONS", "10"] and "opts" not in plain
    assert refined["label_pixels"] == plain["label_pixels"] and refined["images"] == plain["images"]
    # the scored maps are the model's refinement of its own prediction, image by image (a 2-step model's maps are
    # nearly flat, so the summary statistics may move only in their last digits; the maps are compared instead)
    cfg, model, images = tool.unlabeled_shapes(two_step_run, 1, opts=["SEMI.LABEL_REFINEMENT_ITERATIONS", "10"])
    image, _ = next(images)
    model.label_refinement, refinement = None, model.label_refinement
    raw = tool.teacher_probabilities(model, image)
    model.label_refinement = refinement
    scored = tool.teacher_probabilities(model, image)
    torch.testing.assert_close(scored, refinement(raw[None], image[None].float())[0])
    assert (scored - raw).abs().max() > 1e-4
    for bad in (["--opts", "SEMI.LABEL_REFINEMENT_ITERATIONS"], ["--teacher", "clip", "--opts", "SEED", "1"]):
        with pytest.raises(SystemExit):
            tool.main([str(two_step_run), *bad])


def test_the_clip_guidance_labels_do_not_depend_on_the_trained_model(tool, tmp_path):
    """--teacher clip: the frozen pretrained CLIP's zero-shot labels (SEMI.CLIP_GUIDANCE_*) of the run's unlabeled
    images, at the guidance's threshold: the same statistics from the run's weights and from zeroed trained
    weights (the model's own predictions change), and refused with --layer / --over-training."""
    out = short_semi_run(tmp_path / "semi", "SOLVER.MAX_ITER", "1", "DATASETS.SHAPES.NUM_TRAIN", "8",
                         "MODEL.HVLFORMER.DEC_LAYERS", "2", config=TINY_SEMI_PRETRAINED_CONFIG)
    clip = tool.main([str(out), "--teacher", "clip", "--threads", "2"])["runs"][0]
    own = tool.main([str(out), "--threads", "2"])["runs"][0]
    assert clip["teacher"] == "clip" and clip["threshold"] == 0.9 and "teacher" not in own and own["threshold"] == 0.95
    assert clip["label_pixels"] == own["label_pixels"] and clip["mean_confidence"] != own["mean_confidence"]
    assert clip["confident_accuracy"] > 0.5  # the tiny CLIP is right on most pixels it is sure of
    # --edge-margin: the guidance's object interiors only, a subset of the confident pixels
    inner = tool.main([str(out), "--teacher", "clip", "--edge-margin", "1", "--threads", "2"])["runs"][0]
    assert clip["edge_margin"] == 0 and inner["edge_margin"] == 1
    assert 0 < inner["confident_fraction"] < clip["confident_fraction"]
    with pytest.raises(SystemExit):
        tool.main([str(out), "--edge-margin", "1"])
    zeroed = tmp_path / "zeroed"
    zeroed.mkdir()
    (zeroed / "config.yaml").symlink_to(out / "config.yaml")
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    # every trained weight zeroed; the text tower is frozen in training (it is CLIP's), so it stays
    assert any(k.startswith("text_encoder.") for k in state["model"])
    state["model"] = {k: v * 0 if v.is_floating_point() and not k.startswith("text_encoder.") else v
                      for k, v in state["model"].items()}
    torch.save(state, zeroed / "model_final.pth")
    again = tool.main([str(zeroed), "--teacher", "clip", "--threads", "2"])["runs"][0]
    assert {k: v for k, v in again.items() if k != "run"} == {k: v for k, v in clip.items() if k != "run"}
    assert tool.main([str(zeroed), "--threads", "2"])["runs"][0]["mean_confidence"] != own["mean_confidence"]
    for refused in (["--layer", "1"], ["--over-training"]):
        with pytest.raises(SystemExit):
            tool.main([str(out), "--teacher", "clip", *refused])


def test_runs_from_before_the_query_norm_load_as_trained(tmp_path, load_tool):
    """A run's config.yaml from before MODEL.HVLFORMER.QUERY_NORM existed is read back with QUERY_NORM False
    (the plain HQG it was trained with); a config that has the key keeps its own value."""
    common = load_tool("_common")
    old = tmp_path / "old.yaml"
    old.write_text("MODEL:\n  HVLFORMER:\n    QUERY_SOURCE: text\n")
    both_older = ["MODEL.HVLFORMER.QUERY_NORM", "False", "SEMI.CLASS_CONSISTENCY_MIXED", "True",
                  "MODEL.HVLFORMER.QUERY_ZERO_BIAS", "False", "SEMI.MASK_CONSISTENCY_CLASS_GRADIENT", "True",
                  "SEMI.UNLABELED_START_ITER", "0", "TEST.CLIP_ENSEMBLE.LEVEL", "mask",
                  "DATASETS.SHAPES.CLASSES_FILE", "", "SEMI.CLIP_GUIDANCE_WEIGHT", "0.0",
                  "SEMI.CLIP_GUIDANCE_FINAL_WEIGHT", "0.0", "SEMI.CLIP_GUIDANCE_THRESHOLD", "0.9",
                  "SEMI.CLIP_GUIDANCE_TEMPLATE", "a photo of a {}.", "SEMI.CLIP_GUIDANCE_EDGE_MARGIN", "0",
                  "SEMI.CLIP_RELABEL_OBJECTS", "False", "SEMI.ORACLE_LABELS", "False",
                  "SEMI.MASK_CONSISTENCY_PIXELS", "0", "SEMI.ORACLE_COVERAGE", "all",
                  "SEMI.LABEL_REFINEMENT_ITERATIONS", "0", "SEMI.LABEL_REFINEMENT_DILATIONS", "(1, 2, 4, 8)",
                  "SEMI.LABEL_REFINEMENT_COLOUR_SCALE", "0.3", "SEMI.LABEL_REFINEMENT_POSITION_WEIGHT", "0.01",
                  "DATASETS.SHAPES.RARE_CLASS", "", "DATASETS.SHAPES.RARE_CLASS_LABELED_IMAGES", "2",
                  "TEST.BEST_CHECKPOINT.METRIC", "", "TEST.BEST_CHECKPOINT.MODE", "max", "SOLVER.LR_MULTIPLIERS", "[]"]
    assert common.settings_of_older_runs(old) == both_older
    new = tmp_path / "new.yaml"
    new.write_text("MODEL:\n  HVLFORMER:\n    QUERY_NORM: true\n    QUERY_ZERO_BIAS: true\n"
                   "SEMI:\n  CLASS_CONSISTENCY_MIXED: false\n  MASK_CONSISTENCY_CLASS_GRADIENT: false\n"
                   "  UNLABELED_START_ITER: 600\n"
                   "  CLIP_GUIDANCE_WEIGHT: 0.2\n  CLIP_GUIDANCE_FINAL_WEIGHT: 0.0\n  CLIP_GUIDANCE_THRESHOLD: 0.9\n"
                   "  CLIP_GUIDANCE_TEMPLATE: a photo of a {}.\n  CLIP_GUIDANCE_EDGE_MARGIN: 1\n  CLIP_RELABEL_OBJECTS: true\n"
                   "  ORACLE_LABELS: true\n  MASK_CONSISTENCY_PIXELS: 9216\n  ORACLE_COVERAGE: teacher\n"
                   "  LABEL_REFINEMENT_ITERATIONS: 10\n  LABEL_REFINEMENT_DILATIONS: [1, 2]\n"
                   "  LABEL_REFINEMENT_COLOUR_SCALE: 0.5\n  LABEL_REFINEMENT_POSITION_WEIGHT: 0.0\n"
                   "TEST:\n  CLIP_ENSEMBLE:\n    LEVEL: pixel\n  BEST_CHECKPOINT:\n    METRIC: sem_seg/mIoU\n    MODE: max\n"
                   "DATASETS:\n  SHAPES:\n    CLASSES_FILE: shapes_square_cross_textures_swapped.json\n"
                   "    RARE_CLASS: square\n    RARE_CLASS_LABELED_IMAGES: 2\n"
                   "SOLVER:\n  LR_MULTIPLIERS: []\n")
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
    # an inference-only key added later (TEST.CLIP_ENSEMBLE.LEVEL): runs trained before it are the same runs
    before_level = current.clone()
    before_level.defrost()
    del before_level.TEST.CLIP_ENSEMBLE["LEVEL"]
    assert common.config_id(current) == common.config_id(before_level)
    # a data key added later (DATASETS.SHAPES.CLASSES_FILE): "" is the old data, another table another run
    del before_level.DATASETS.SHAPES["CLASSES_FILE"]
    assert common.config_id(current) == common.config_id(before_level)
    swapped = common.resolved_cfg(config, ["DATASETS.SHAPES.CLASSES_FILE", "shapes_square_cross_textures_swapped.json"])
    assert common.config_id(swapped) != common.config_id(current)
    # the pseudo-label refinement's keys (added later): off and at their defaults, the run before them
    for key in ("ITERATIONS", "DILATIONS", "COLOUR_SCALE", "POSITION_WEIGHT"):
        del before_level.SEMI[f"LABEL_REFINEMENT_{key}"]
    assert common.config_id(current) == common.config_id(before_level)
    refined = common.resolved_cfg(config, ["SEMI.LABEL_REFINEMENT_ITERATIONS", "10"])
    assert common.config_id(refined) != common.config_id(current)


def test_config_id_drops_a_group_added_later_whole(load_tool):
    """TEST.BEST_CHECKPOINT came as a group: at its old behaviour the hash is the run's from before it."""
    common = load_tool("_common")
    current = common.resolved_cfg(REPO_ROOT / "configs" / "tiny" / "hvlformer_tiny_shapes.yaml", [])
    before = current.clone()
    before.defrost()
    del before.TEST["BEST_CHECKPOINT"]
    del before.SOLVER["LR_MULTIPLIERS"]
    assert common.config_id(current) == common.config_id(before)


def test_same_config_as_run_compares_the_runs_own_config(tmp_path, load_tool):
    """The key-by-key check behind a differing hash: a key the run lacks passes only as a KEYS_ADDED_LATER key at
    its old behaviour; any other missing, extra or changed key makes it another run."""
    import yaml

    common = load_tool("_common")
    config = REPO_ROOT / "configs" / "tiny" / "hvlformer_tiny_shapes.yaml"
    current = common.resolved_cfg(config, [])
    dumped = yaml.safe_load(current.dump())
    run_config = tmp_path / "config.yaml"

    def same(tree, cfg=current):
        run_config.write_text(yaml.safe_dump(tree))
        return common.same_config_as_run(cfg, run_config)

    assert same(dumped)
    older = yaml.safe_load(current.dump())
    del older["TEST"]["BEST_CHECKPOINT"], older["SOLVER"]["LR_MULTIPLIERS"], older["DATASETS"]["SHAPES"]["RARE_CLASS"]
    assert same(older)  # made before those keys existed, or before they were listed: the same run
    frozen = common.resolved_cfg(config, ["SOLVER.LR_MULTIPLIERS", "[['htqg.hqg.', 0.0]]"])
    assert not same(older, frozen)  # the key at another value than the old behaviour
    lacking = yaml.safe_load(current.dump())
    del lacking["SOLVER"]["BASE_LR"]
    assert not same(lacking)  # not a key added later
    changed = yaml.safe_load(current.dump())
    changed["SOLVER"]["BASE_LR"] = 0.001
    assert not same(changed)
    extra = yaml.safe_load(current.dump())
    extra["SOLVER"]["REMOVED_KEY"] = 1
    assert not same(extra)


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


# tools/object_attribution.py: which queries name the objects of a class (it reuses the tally's verdicts)

@pytest.fixture(scope="module")
def attribution(load_tool):
    return load_tool("object_attribution")


def test_class_owners_and_query_stats(attribution):
    owners = attribution.class_owners(8, num_levels=2, num_classes=3)
    assert owners.tolist() == [0, 1, 2, 0, 1, 2, -1, -1]  # level-major textual queries, then 2 instance queries
    class_probs = torch.tensor([[0.9, 0.0, 0.0, 0.1], [0.0, 0.2, 0.0, 0.8], [0.0, 0.0, 1.0, 0.0],
                                [0.5, 0.0, 0.0, 0.5], [0.0, 0.6, 0.0, 0.4], [0.0, 0.0, 0.8, 0.2],
                                [0.0, 0.9, 0.0, 0.1], [0.0, 0.9, 0.0, 0.1]])
    masks = torch.zeros(8, 2, 2)
    masks[1] = 1.0
    masks[4, 0, 0] = 1.0
    pixels = torch.tensor([[True, True], [False, False]])
    # class 1's queries are 1 and 4 (the instance queries 6 and 7 are nobody's)
    stats = attribution.query_stats(class_probs, masks, owners, 1, pixels)
    assert stats == pytest.approx({"p_class": 0.4, "p_no_object": 0.6, "mask_on_object": (1.0 + 0.5) / 2})


class _FakeModel:
    """One query per class (background, a, b) on an 8 x 8 image with an object of class a at [2:6, 2:6]: a's
    query says "no a here", b's query covers the object with its mask."""

    num_query_levels = 1
    device = torch.device("cpu")

    def normalize(self, images):
        return images

    def encode_text(self):
        return torch.zeros(3, 4)

    def predict(self, images, text):
        from types import SimpleNamespace

        logits = torch.log(torch.tensor([[[0.97, 0.01, 0.01, 0.01],      # background's query
                                          [0.01, 0.10, 0.01, 0.88],      # a's: mostly no-object
                                          [0.01, 0.01, 0.97, 0.01]]]))   # b's
        masks = torch.full((1, 3, 8, 8), -8.0)
        masks[0, 0] = 8.0
        masks[0, 0, 2:6, 2:6] = -8.0
        masks[0, 2, 2:6, 2:6] = 8.0
        decoder = {"pred_logits": logits, "pred_masks": masks}
        return SimpleNamespace(decoder_outputs=lambda: decoder, relevance=torch.tensor([[0.9, 0.3, 0.7]]))


def test_object_named_by_another_class_queries(attribution):
    label = np.zeros((8, 8), np.int64)
    label[2:6, 2:6] = 1
    (row,) = attribution.image_objects(_FakeModel(), torch.zeros(3, 8, 8), label, class_id=1, threshold=0.9)
    assert row["verdict"] == 2
    assert row["own"] == pytest.approx({"p_class": 0.10, "p_no_object": 0.88, "mask_on_object": torch.sigmoid(
        torch.tensor(-8.0)).item()}, abs=1e-4)
    assert row["verdict_queries"]["mask_on_object"] == pytest.approx(torch.sigmoid(torch.tensor(8.0)).item())
    assert row["verdict_score"]["from_own_queries"] == pytest.approx(1.0, abs=1e-3)
    assert row["relevance_own"] == pytest.approx(0.3) and row["relevance_verdict"] == pytest.approx(0.7)
    assert row["verdict_in_image"] == 0.0  # the image holds no object of class b
    label[7, 0] = 2
    (row,) = attribution.image_objects(_FakeModel(), torch.zeros(3, 8, 8), label, class_id=1, threshold=0.9)
    assert row["verdict_in_image"] == 1.0


def test_attribution_of_a_run_matches_its_object_verdicts(tool, attribution, two_step_run):
    tally = tool.main([str(two_step_run)])["runs"][0]["objects"]
    result = attribution.main([str(two_step_run), "--class", "square"])["runs"][0]
    groups = result["by_verdict"]
    assert {v: g["objects"] for v, g in groups.items()} == tally["square"]  # the same verdicts, object by object
    assert result["objects"] == sum(tally["square"].values()) > 0
    for verdict, group in groups.items():
        assert 0.0 <= group["own"]["mask_on_object"] <= 1.0
        assert ("verdict_queries" in group) == (verdict not in ("square", "none"))
    with pytest.raises(ValueError, match="not one of the run's classes"):
        attribution.attribute_run(two_step_run, "ring")
