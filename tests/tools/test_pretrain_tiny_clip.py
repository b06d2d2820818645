"""tools/pretrain_tiny_clip.py: pooling, AUROC, the pretraining loss learns, a smoke run of the tool, and the
shipped checkpoint (hash, loading through the config route, a non-trivial zero-shot result)."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tiny_clip_pretraining as tiny  # tools/tiny_clip_pretraining/ (tests/conftest.py puts tools/ on sys.path)
import torch

from conftest import REPO_ROOT, TINY_PRETRAINED_CONFIG

RECORD = REPO_ROOT / "docs" / "results" / "tiny_clip_pretraining.json"  # v2, the linear-stem model of the results
# the first shipped model (no region term), kept so that the results measured from it stay reproducible
RECORD_V1 = REPO_ROOT / "docs" / "results" / "tiny_clip_pretraining_v1.json"
RECORD_V3 = REPO_ROOT / "docs" / "results" / "tiny_clip_pretraining_v3.json"  # the candidate (configs load v2)
# the conv-stem tower HVL-Tiny-ConvViT-P8: the model the tiny configs load
RECORD_CONV = REPO_ROOT / "docs" / "results" / "tiny_clip_pretraining_conv.json"


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("pretrain_tiny_clip")


def test_gwrp_matches_hand_computation(tool):
    scores = torch.tensor([[[0.1, 0.9], [0.7, 0.2], [0.4, 0.5]]])  # B=1, N=3, K=2
    decay = torch.tensor([0.5, 1.0])
    out = tiny.gwrp(scores, decay)
    w = np.array([1.0, 0.5, 0.25]) / 1.75
    assert out[0, 0].item() == pytest.approx(float(np.dot(w, [0.7, 0.4, 0.1])))
    assert out[0, 1].item() == pytest.approx(float(np.mean([0.9, 0.5, 0.2])))  # decay 1 = mean


def test_region_tags_and_cell_pooling_by_hand(tool):
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 0, 0] = 3          # one pixel of kind 3 in the top-left 2 x 2 cell: 1/4 of it
    labels[0, 2:, 2:] = 5        # kind 5 fills the bottom-right cell
    tags = tiny.region_tags(labels, 2, 0.25)
    assert tags.shape == (1, 2, 2, tiny.ALL_KINDS)
    assert tags[0, 0, 0].nonzero().flatten().tolist() == [0, 3]
    assert tags[0, 1, 1].nonzero().flatten().tolist() == [5]
    assert tags[0, 0, 1].nonzero().flatten().tolist() == [0] and tags[0, 1, 0].nonzero().flatten().tolist() == [0]
    assert tiny.region_tags(labels, 2, 0.3)[0, 0, 0].nonzero().flatten().tolist() == [0]
    # a 4 x 4 patch grid in 2 x 2 cells; the score of patch (r, c) is 10 r + c
    probs = torch.tensor([[10.0 * r + c] for r in range(4) for c in range(4)]).view(1, 16, 1)
    pooled = tiny.cell_pooled(probs, (4, 4), 2, torch.tensor([1.0]))  # decay 1 = mean of the cell
    assert pooled.shape == (1, 2, 2, 1)
    assert pooled[0, :, :, 0].tolist() == [[5.5, 7.5], [25.5, 27.5]]
    top = tiny.cell_pooled(probs, (4, 4), 2, torch.tensor([1e-9]))  # decay ~0 = max of the cell
    torch.testing.assert_close(top[0, :, :, 0], torch.tensor([[11.0, 13.0], [31.0, 33.0]]))


def test_auroc_matches_pairwise_count(tool):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)  # many ties
    positives = rng.random(40) < 0.4
    pos, neg = scores[positives], scores[~positives]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert tiny.auroc(scores, positives) == pytest.approx(pairwise)
    assert tiny.auroc(np.arange(4.0), np.array([False, False, True, True])) == 1.0
    assert np.isnan(tiny.auroc(np.arange(3.0), np.zeros(3, dtype=bool)))


def test_draw_batch_tags_follow_the_captions(tool):
    images, labels, captions, tags = tiny.draw_batch(range(6), "pretrain", 0, 64, 11)
    assert images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8 and labels.shape == (6, 64, 64)
    names = tiny.vocabulary()
    assert (tags[:, 0] == 1).all()
    for caption, row in zip(captions, tags):
        for k in range(1, 11):
            said = names[k] in caption or (names[k] + "s") in caption or (k == 5 and "crosses" in caption)
            assert bool(row[k]) == said, (caption, names[k])


def test_draw_batch_from_another_class_table_keeps_layouts_and_labels(tool):
    """--classes-file (evaluation only): the same images' layouts and labels, other pixels where the swapped
    table draws differently (square and cross), the same pixels elsewhere (up to the JPEG round trip's
    reach: its 16 px blocks around the changed pixels)."""
    plain, plain_labels, captions, tags = tiny.draw_batch(range(4), "val", 0, 64, 6)
    swapped, labels, swapped_captions, swapped_tags = tiny.draw_batch(
        range(4), "val", 0, 64, 6, classes_file="shapes_square_cross_textures_swapped.json")
    assert torch.equal(labels, plain_labels) and torch.equal(tags, swapped_tags)
    pair = torch.isin(labels, torch.tensor([2, 5]))
    assert pair.sum() > 500
    differs = (swapped.int() - plain.int()).abs().amax(dim=1) > 8
    assert differs[pair].float().mean() > 0.3
    far = torch.nn.functional.max_pool2d(pair[:, None].float(), 31, stride=1, padding=15)[:, 0] == 0
    assert not differs[far].any()


def test_short_text_pass_equals_open_clip_encode_text(tool, single_thread):
    clip_model, tokenizer = tiny.build_model(0)
    model = tiny.TinyClipPretrainer(clip_model, tokenizer)
    tokens = tokenizer(["a photo of a star.", "two red speckled circles and a square on a noisy grey background."])
    expected = torch.nn.functional.normalize(clip_model.encode_text(tokens), dim=-1)
    torch.testing.assert_close(model.encode_text(tokens), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                                     (0.0, 0.0, 0.0, 0.0, 0.0, 1.0)], ids=["v2-terms", "swap", "names"])
def test_pretraining_loss_decreases_on_a_tiny_batch(tool, single_thread, weights):
    clip_model, tokenizer = tiny.build_model(0)
    model = tiny.TinyClipPretrainer(clip_model, tokenizer, loss_weights=weights, region_cell=16)
    negatives = []
    images, labels, captions, tags = tiny.draw_batch(range(8), "pretrain", 0, 32, 11, random_hue_probability=0.5,
                                                     negatives=negatives)
    cell_tags = tiny.region_tags(labels, 16, 0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(25):
        losses = model.losses(images, captions, tags, cell_tags, negatives)
        history.append({k: float(v.detach()) for k, v in losses.items()})
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    keys = ("clip", "tag", "dense", "region") if weights[0] > 0 else ("swap",) if weights[4] > 0 else ("names",)
    assert ("swap" in history[0]) == (weights[4] > 0) and ("names" in history[0]) == (weights[5] > 0)
    for key in keys:
        assert history[-1][key] < 0.75 * history[0][key], (key, history[0][key], history[-1][key])


@pytest.mark.parametrize("model_name", ["HVL-Tiny-ViT-P8", "HVL-Tiny-ConvViT-P8"])
def test_no_weight_decay_on_embeddings_norms_and_biases(tool, model_name):
    """Both tower kinds: decay on weight matrices and kernels only (the timm tower's pos_embed / cls_token
    are 3-D, yet embeddings like open_clip's positional_embedding / class_embedding)."""
    from hvlformer.modeling.clip_loader import build_clip_model

    clip_model, tokenizer = build_clip_model(model_name)
    model = tiny.TinyClipPretrainer(clip_model, tokenizer)
    decay, no_decay = tiny.param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert len(decayed) + len(undecayed) == len(names)
    embeddings = ({"clip.visual.trunk.pos_embed", "clip.visual.trunk.cls_token"} if "Conv" in model_name
                  else {"clip.visual.positional_embedding", "clip.visual.class_embedding"})
    assert embeddings | {"clip.token_embedding.weight", "clip.positional_embedding"} <= undecayed
    assert all(n.endswith("bias") or "norm" in n or "ln" in n or n in embeddings or "embedding" in n or "scale" in n
               or n.endswith("tag_bias") or n.endswith("dense_bias") for n in undecayed)
    stem = "clip.visual.trunk.patch_embed.proj.0.weight" if "Conv" in model_name else "clip.visual.conv1.weight"
    assert {stem, "clip.text_projection"} <= decayed


def test_colour_twins_pair_the_kinds_that_share_a_hue_family(tool):
    names = tiny.vocabulary()
    twins = {names[k]: names[t] for k, t in tiny.colour_twins().items()}
    assert twins == {"circle": "triangle", "triangle": "circle", "square": "cross", "cross": "square",
                     "star": "ellipse", "ellipse": "star", "ring": "diamond", "diamond": "ring",
                     "hexagon": "crescent", "crescent": "hexagon"}


def test_swapped_captions_rename_one_kind_and_keep_everything_else(tool):
    negatives = []
    _, _, captions, tags = tiny.draw_batch(range(12), "pretrain", 0, 64, 11, negatives=negatives)
    plain = tiny.draw_batch(range(12), "pretrain", 0, 64, 11)
    assert captions == plain[2] and torch.equal(tags, plain[3])  # asking for negatives changes nothing else
    names = tiny.vocabulary()
    twins = {names[k]: names[t] for k, t in tiny.colour_twins().items()}
    def mentioned(text):
        return {n for n in names[1:] if re.search(rf"\b{n}(e?s)?\b", text)}

    changed = 0
    for caption, negative, row in zip(captions, negatives, tags):
        present = {names[k] for k in range(1, 11) if row[k]}
        assert mentioned(caption) == present
        if not present:
            assert negative == caption
            continue
        changed += 1
        # one kind k renamed to its twin (merged with the twin's own count when the twin is there too)
        options = [(present - {k}) | {twins[k]} for k in present]
        assert mentioned(negative) in options, (caption, negative)
        assert mentioned(negative) != present
    assert changed >= 10


def test_tool_smoke_run_writes_checkpoint_and_metrics(tool, tmp_path, single_thread, capsys):
    out = tmp_path / "tiny.pt"
    code = tool.main(["--steps", "2", "--batch-size", "4", "--image-size", "32", "--threads", "1", "--log-every", "1",
                      "--num-seg-images", "4", "--num-presence-images", "12", "--eval-split", "dev", "--out", str(out)])
    assert code == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert [e["step"] for e in record["losses"]] == [1, 2]
    metrics = record["metrics"]
    assert set(metrics["dense_iou"]) == {"background", "circle", "square", "triangle", "star", "cross"}
    assert len(metrics["global_auroc"]) == 10 and "dev" in metrics["seg_split"]
    state = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    # --verify retrains with the recorded options: the same weights, the same metrics
    capsys.readouterr()
    assert tool.main(["--verify", "--out", str(out)]) == 0
    verify = json.loads(capsys.readouterr().out.split('{\n  "verify"')[-1].join(['{"verify"', '']))["verify"]
    assert verify == {"dense_miou": 0.0, "global_auroc_min": 0.0, "weights_equal": True}
    # --eval-only with another class table of the generator records the table; without --eval-only it is refused
    eval_args = ["--eval-only", str(out), "--image-size", "32", "--num-seg-images", "4", "--num-presence-images", "12",
                 "--eval-split", "dev", "--threads", "1"]
    capsys.readouterr()
    assert tool.main(eval_args + ["--classes-file", "shapes_square_cross_textures_swapped.json"]) == 0
    swapped = json.loads(capsys.readouterr().out)
    assert swapped["classes_file"] == "shapes_square_cross_textures_swapped.json"
    assert tool.main(eval_args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert "classes_file" not in plain and plain["dense_confusion_percent"]["square"] != swapped["dense_confusion_percent"]["square"]
    with pytest.raises(SystemExit, match="--eval-only"):
        tool.main(["--classes-file", "shapes_square_cross_textures_swapped.json", "--steps", "1"])


# ------------------------------------------------------------------------------------- shipped checkpoint
def _record(path: Path = RECORD):
    return json.loads(path.read_text())


ALL_RECORDS = pytest.mark.parametrize("record_path", [RECORD, RECORD_V1, RECORD_V3, RECORD_CONV],
                                      ids=["v2", "v1", "v3", "conv"])


@ALL_RECORDS
def test_shipped_checkpoint_hash_and_size(record_path):
    record = _record(record_path)
    path = REPO_ROOT / record["checkpoint"]
    data = path.read_bytes()
    assert len(data) <= 16 * 2 ** 20 and len(data) == record["size_bytes"]
    assert hashlib.sha256(data).hexdigest() == record["sha256"]
    assert tool_digest(path) == record["weights_sha256"]


@ALL_RECORDS
def test_verify_replays_the_recorded_options(tool, record_path):
    """--verify retrains with exactly the recorded options; options newer than a record were off in it."""
    record = _record(record_path)
    replayed = tool._training_options(tool.parse_args(tool._replay_command(record)))
    assert {k: v for k, v in replayed.items() if k in record["options"]} == record["options"]
    # v1 predates the region term and the random hue: replayed with both off
    assert replayed["region_weight"] == record["options"].get("region_weight", 0.0)
    assert replayed["random_hue"] == record["options"].get("random_hue", 0.0)


def test_records_name_their_training_options():
    """The shipped model is the one with the region term; the first one had none (its options predate it)."""
    assert _record()["options"]["region_weight"] == 1.0
    assert "region_weight" not in _record(RECORD_V1)["options"]
    assert _record()["checkpoint"] != _record(RECORD_V1)["checkpoint"]
    # the v3 candidate: 4,000 steps with the names kept apart, its own file
    v3 = _record(RECORD_V3)["options"]
    assert (v3["steps"], v3["name_weight"], v3["region_weight"], v3["swap_weight"]) == (4000, 1.0, 1.0, 0.0)
    assert _record(RECORD_V3)["checkpoint"] not in (_record()["checkpoint"], _record(RECORD_V1)["checkpoint"])
    # the conv-stem tower: v3's losses on another architecture, its own file
    conv = _record(RECORD_CONV)
    assert (conv["model"], conv["options"]["model"]) == ("HVL-Tiny-ConvViT-P8",) * 2
    assert {k: v for k, v in conv["options"].items() if k not in ("model", "steps", "threads")} == \
        {k: v for k, v in v3.items() if k not in ("model", "steps", "threads")}
    assert conv["checkpoint"] not in [_record(r)["checkpoint"] for r in (RECORD, RECORD_V1, RECORD_V3)]


def tool_digest(path: Path) -> str:
    return tiny.weights_digest(torch.load(path, weights_only=True))


def test_tiny_config_loads_the_shipped_checkpoint_from_any_directory(tmp_path, monkeypatch):
    """MODEL.HVLFORMER.CLIP.PRETRAINED of the tiny config is relative to the repository root; it loads
    through the ordinary route (build_clip_model) also from another working directory."""
    from hvlformer.config import add_hvlformer_config
    from hvlformer.modeling.clip_loader import build_clip_model
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_hvlformer_config(cfg)
    cfg.merge_from_file(TINY_PRETRAINED_CONFIG)
    record = _record(RECORD_CONV)
    assert cfg.MODEL.HVLFORMER.CLIP.PRETRAINED == record["checkpoint"]
    assert cfg.MODEL.HVLFORMER.CLIP.MODEL_NAME == record["model"]
    monkeypatch.chdir(tmp_path)
    model, _ = build_clip_model(cfg.MODEL.HVLFORMER.CLIP.MODEL_NAME, cfg.MODEL.HVLFORMER.CLIP.PRETRAINED)
    state = torch.load(REPO_ROOT / record["checkpoint"], weights_only=True)
    assert set(model.state_dict()) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(model.state_dict()[key], value.to(model.state_dict()[key].dtype), msg=key)


def test_shipped_checkpoint_is_a_zero_shot_segmenter(tool, single_thread):
    """The model the tiny configs load, on 8 held-out images with the plain prompts: four times the mIoU of predicting background everywhere,
    every class above chance (the red kinds the first model lost to background above 50 IoU), and presence
    well above chance for every name on 60 images. (The full numbers are in
    docs/results/tiny_clip_pretraining_conv.json.)"""
    from hvlformer.modeling.clip_loader import build_clip_model

    record = _record(RECORD_CONV)
    model, tokenizer = build_clip_model(record["model"], str(REPO_ROOT / record["checkpoint"]))
    metrics = tiny.evaluate(model, tokenizer, "val", num_seg_images=8, num_presence_images=60, batch_size=30)
    _, labels, _, _ = tiny.draw_batch(range(8), "val", 0, 128, 6)
    all_background_miou = 100.0 * float((labels == 0).float().mean()) / 6
    assert metrics["dense_miou"] >= 4 * all_background_miou
    assert min(metrics["dense_iou"].values()) >= 20.0
    assert metrics["dense_iou"]["circle"] >= 50.0 and metrics["dense_iou"]["triangle"] >= 50.0
    finite = [v for v in metrics["global_auroc"].values() if not np.isnan(v)]
    assert min(finite) >= 0.75 and np.mean(finite) >= 0.9


def test_pure_patches_keep_the_requested_kinds_with_their_share(tool):
    class PatchMeans:  # stands in for the model: each patch's "embedding" is its mean colour
        def encode_image(self, images):
            pooled = torch.nn.functional.avg_pool2d(images.float(), 8)
            return None, pooled.flatten(2).transpose(1, 2), pooled.shape[-2:]

    names = tiny.vocabulary()
    pair = (names.index("square"), names.index("cross"))
    features, owners = tiny.evaluation._pure_patches(PatchMeans(), "probe", 20, 64, pair, batch_size=8)
    assert set(owners.tolist()) == set(pair) and features.shape == (owners.numel(), 3)
    # the same patches counted straight from the label maps
    _, labels, _, _ = tiny.draw_batch(range(20), "probe", 0, 64, 11)
    expected = 0
    for kind in pair:
        share = torch.nn.functional.avg_pool2d((labels == kind).float()[:, None], 8)
        expected += int((share >= 0.7).sum())
    assert owners.numel() == expected


def test_twin_patch_probe_of_the_v2_model(tool, single_thread):
    from hvlformer.modeling.clip_loader import build_clip_model

    clip_model, tokenizer = build_clip_model(tiny.MODEL_NAME, str(tool.DEFAULT_OUT))
    model = tiny.TinyClipPretrainer(clip_model, tokenizer).eval()
    # positive control: two kinds of different colours are told apart by the probe and by zero-shot
    control = tiny.twin_patch_probe(model, "dev", num_images=40, pairs=[("circle", "square")])["circle/square"]
    assert control["linear_probe"] >= 97.0 and control["zero_shot"] >= 95.0 and control["test_patches"] > 100
    twins = tiny.twin_patch_probe(model, "dev", num_images=100)
    assert set(twins) == {"square/cross", "star/ellipse"}
    for pair in twins.values():
        assert pair["test_patches"] > 500 and 50.0 <= pair["constant_guess"] <= 100.0
        # v2's patch embeddings barely tell the colour twins apart (docs/RESULTS.md): the limit of (a), (c), (d)
        assert pair["linear_probe"] <= 75.0 and pair["zero_shot"] <= 75.0


def test_v3_candidate_tells_star_from_ellipse(tool, single_thread):
    """Longer pretraining with the names kept apart (v3) learns what v2's patches lack for star/ellipse."""
    from hvlformer.modeling.clip_loader import build_clip_model

    clip_model, tokenizer = build_clip_model(tiny.MODEL_NAME, str(REPO_ROOT / _record(RECORD_V3)["checkpoint"]))
    model = tiny.TinyClipPretrainer(clip_model, tokenizer).eval()
    pair = tiny.twin_patch_probe(model, "dev", num_images=100, pairs=[("star", "ellipse")])["star/ellipse"]
    assert pair["linear_probe"] >= 80.0 and pair["zero_shot"] >= 80.0
    with torch.no_grad():
        cosine = model.encode_text(model.prompt_tokens)
    names = tiny.vocabulary()
    assert float(cosine[names.index("square")] @ cosine[names.index("cross")]) < 0.5  # v2: 0.96


def test_conv_stem_model_tells_the_colour_twins_apart(tool, single_thread):
    """The conv-stem tower (the tiny configs' model) learns what the linear-stem towers' patches lack: square
    from cross (v2 / v3 about 67-70 %, docs/RESULTS.md; this model 95.2 % on the held-out images)."""
    from hvlformer.modeling.clip_loader import build_clip_model

    record = _record(RECORD_CONV)
    clip_model, tokenizer = build_clip_model(record["model"], str(REPO_ROOT / record["checkpoint"]))
    model = tiny.TinyClipPretrainer(clip_model, tokenizer).eval()
    twins = tiny.twin_patch_probe(model, "dev", num_images=100)
    assert twins["square/cross"]["linear_probe"] >= 85.0 and twins["square/cross"]["zero_shot"] >= 85.0
    assert twins["star/ellipse"]["linear_probe"] >= 95.0 and twins["star/ellipse"]["zero_shot"] >= 95.0
