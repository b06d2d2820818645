"""Checkpoints: strict loading for inference, one summary line for fine-tuning, resume fallback, atomic saves."""
import functools
import logging
import os

import pytest
import torch
from torch import nn

from conftest import TINY_PRETRAINED_CONFIG
from hvlformer.checkpoint import (
    CheckpointMismatchError,
    DamagedCheckpointError,
    HVLFormerCheckpointer,
    group_layers,
)



@pytest.fixture(scope="module")
def pretrained_cfg(tiny_cfg):
    """The tiny config with the shipped tiny CLIP."""
    return functools.partial(tiny_cfg, config=TINY_PRETRAINED_CONFIG)


@pytest.fixture(scope="module")
def build(tiny_model):
    """Its model, as ``build_model`` returns it (seed 0)."""
    return functools.partial(tiny_model, config=TINY_PRETRAINED_CONFIG, train=None, register=False)


class Net(nn.Module):
    def __init__(self, extra: bool = False):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        if extra:
            self.extra = nn.Linear(2, 2)


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory, single_thread, build, pretrained_cfg):
    """A checkpoint of the tiny model trained with the 'text' classifier, with its config.yaml."""
    folder = tmp_path_factory.mktemp("text_run")
    model = build("MODEL.HVLFORMER.CLASSIFIER", "text")
    HVLFormerCheckpointer(model, str(folder)).save("model_final")
    (folder / "config.yaml").write_text(pretrained_cfg("MODEL.HVLFORMER.CLASSIFIER", "text").dump())
    return folder / "model_final.pth"


def test_strict_load_names_the_uninitialised_layers_and_the_saved_config(text_checkpoint, single_thread, build):
    model = build()  # the plain config: 'linear' classifier
    with pytest.raises(CheckpointMismatchError) as info:
        HVLFormerCheckpointer(model, strict=True).load(str(text_checkpoint))
    message = str(info.value)
    assert "transformer_decoder.class_embed (bias, weight)" in message
    assert "randomly initialised" in message
    assert f"--config-file {text_checkpoint.parent / 'config.yaml'}" in message
    # the matching config loads without complaint and gives the same weights
    text_model = build("MODEL.HVLFORMER.CLASSIFIER", "text")
    HVLFormerCheckpointer(text_model, strict=True).load(str(text_checkpoint))
    saved = torch.load(text_checkpoint, map_location="cpu")["model"]
    for key, value in text_model.state_dict().items():
        torch.testing.assert_close(value, saved[key])


def test_predictor_refuses_a_checkpoint_of_another_config(text_checkpoint, single_thread, pretrained_cfg):
    from hvlformer.predictor import HVLFormerPredictor

    with pytest.raises(CheckpointMismatchError, match="class_embed"):
        HVLFormerPredictor(pretrained_cfg("MODEL.WEIGHTS", str(text_checkpoint)))


def test_query_norm_mismatch_names_the_switch(tmp_path, single_thread, build):
    """A checkpoint from before the HQG output LayerNorm (MODEL.HVLFORMER.QUERY_NORM) is refused with the
    switch that loads it; the opposite (LayerNorm weights the model lacks) is refused too, not dropped."""
    plain = build("MODEL.HVLFORMER.QUERY_NORM", "False")
    HVLFormerCheckpointer(plain, str(tmp_path)).save("plain")
    with pytest.raises(CheckpointMismatchError, match="MODEL.HVLFORMER.QUERY_NORM False") as info:
        HVLFormerCheckpointer(build(), strict=True).load(str(tmp_path / "plain.pth"))
    assert "htqg.hqg.heads.0.3 (bias, weight)" in str(info.value)
    HVLFormerCheckpointer(build("MODEL.HVLFORMER.QUERY_NORM", "False"), strict=True).load(str(tmp_path / "plain.pth"))
    HVLFormerCheckpointer(build(), str(tmp_path)).save("normed")
    with pytest.raises(CheckpointMismatchError, match="trained with MODEL.HVLFORMER.QUERY_NORM True"):
        HVLFormerCheckpointer(plain, strict=True).load(str(tmp_path / "normed.pth"))


def test_shape_mismatch_is_an_error_in_strict_mode(tmp_path):
    torch.save({"model": {"body.weight": torch.zeros(5, 3), "body.bias": torch.zeros(4),
                          "head.weight": torch.zeros(2, 4), "head.bias": torch.zeros(2)}}, tmp_path / "m.pth")
    with pytest.raises(CheckpointMismatchError, match=r"body.weight: \(5, 3\) in the checkpoint, \(4, 3\) in the model"):
        HVLFormerCheckpointer(Net(), strict=True).load(str(tmp_path / "m.pth"))
    assert "config.yaml" in str(pytest.raises(CheckpointMismatchError, HVLFormerCheckpointer(Net(), strict=True).load,
                                              str(tmp_path / "m.pth")).value)


def test_fine_tuning_is_permissive_with_one_summary_line(tmp_path, caplog):
    HVLFormerCheckpointer(Net(), str(tmp_path)).save("base")
    model = Net(extra=True)
    before = model.extra.weight.clone()
    with caplog.at_level(logging.INFO):
        HVLFormerCheckpointer(model).load(str(tmp_path / "base.pth"))
    torch.testing.assert_close(model.extra.weight, before)  # fresh layer kept
    lines = [r.getMessage() for r in caplog.records if "fine-tuning from" in r.getMessage()]
    assert len(lines) == 1 and "4 of 6 model tensors loaded" in lines[0] and "extra (bias, weight)" in lines[0]
    assert not [r for r in caplog.records if "not found in the checkpoint" in r.getMessage()]


def test_resume_skips_a_truncated_last_checkpoint(tmp_path, caplog):
    model = Net()
    checkpointer = HVLFormerCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000149", iteration=149)
    with torch.no_grad():
        model.head.weight.fill_(7.0)
    checkpointer.save("model_0000199", iteration=199)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000199.pth"
    data = (tmp_path / "model_0000199.pth").read_bytes()
    (tmp_path / "model_0000199.pth").write_bytes(data[: len(data) // 2])  # cut off, as by kill -9

    fresh = Net()
    with caplog.at_level(logging.WARNING):
        extra = HVLFormerCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 149
    assert not torch.all(fresh.head.weight == 7.0)
    text = caplog.text
    assert "model_0000199.pth is damaged" in text and "resumed from" in text and "model_0000149.pth" in text


def test_resume_with_only_damaged_checkpoints_is_a_clear_error(tmp_path):
    (tmp_path / "model_0000009.pth").write_bytes(b"")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(DamagedCheckpointError, match="no checkpoint in .* can be loaded"):
        HVLFormerCheckpointer(Net(), str(tmp_path)).resume_or_load("", resume=True)
    with pytest.raises(DamagedCheckpointError, match="model_0000009.pth is damaged"):
        HVLFormerCheckpointer(Net(), strict=True).load(str(tmp_path / "model_0000009.pth"))
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        HVLFormerCheckpointer(Net(), strict=True).load(str(tmp_path / "nothere.pth"))


def test_saving_is_atomic(tmp_path, monkeypatch):
    model = Net()
    checkpointer = HVLFormerCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000009", iteration=9)
    intact = (tmp_path / "model_0000009.pth").read_bytes()

    real_save = torch.save

    def killed(data, f, *args, **kwargs):  # writes half a file, then the process "dies"
        real_save(data, f, *args, **kwargs)
        f.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000009", iteration=19)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000019", iteration=19)
    assert (tmp_path / "model_0000009.pth").read_bytes() == intact
    assert not (tmp_path / "model_0000019.pth").exists()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]  # no temporary left
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"


def test_group_layers():
    keys = ["a.b.weight", "a.b.bias", "c.w1", "c.w2", "c.w3", "c.w4"]
    assert group_layers(keys) == "a.b (bias, weight); c (4 tensors)"
    assert group_layers(keys, limit=1) == "a.b (bias, weight); ... and 1 more layers"
