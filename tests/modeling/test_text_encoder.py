"""Text side: CLIPTextEncoder (frozen E_T + learnable context) and the class descriptions."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never wait for a model hub

import json

import pytest
import torch
import torch.nn.functional as F

from hvlformer.modeling.clip_loader import build_clip_model
from hvlformer.modeling.text import (
    CLIPTextEncoder,
    load_class_descriptions,
    reference_prompts,
    resolve_descriptions_path,
)

LONG = " ".join(["a very long description of a striped cat"] * 20)  # far beyond 77 tokens


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tokenizer = build_clip_model("HVL-Tiny-ViT")
    return model.eval(), tokenizer


def test_only_context_is_trainable(tiny):
    model, tokenizer = tiny
    enc = CLIPTextEncoder(model, tokenizer, num_context=8).train()
    assert enc.context.shape == (8, 64) and (enc.embed_dim, enc.width, enc.context_length) == (64, 64, 77)
    assert not any(m.training for m in enc.tower.modules())  # the frozen tower stays in eval mode
    out = enc([["a cat", "a small cat"], ["a dog"], ["a red bus"]])
    assert out.shape == (3, 64)
    (out * torch.randn_like(out)).sum().backward()
    assert enc.context.grad is not None and enc.context.grad.abs().sum() > 0
    for name, p in enc.named_parameters():
        if name != "context":
            assert not p.requires_grad and p.grad is None, name
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == ["context"]
    assert enc.no_weight_decay() == {"context"}


@pytest.mark.parametrize("model_name", ["HVL-Tiny-ViT", "HVL-Tiny-EVA"])  # CLIP and CustomTextCLIP layouts
def test_without_context_equals_open_clip(model_name):
    torch.manual_seed(0)
    model, tokenizer = build_clip_model(model_name)
    texts = ["a cat", "a photo of a big red bus on a street.", LONG]
    with torch.no_grad():
        expected = model.eval().encode_text(tokenizer(texts))
        enc0 = CLIPTextEncoder(model, tokenizer, num_context=0)
        assert enc0.context is None
        torch.testing.assert_close(enc0.encode(texts), expected, atol=1e-5, rtol=0)
        enc8 = CLIPTextEncoder(model, tokenizer, num_context=8)
        torch.testing.assert_close(enc8.encode(texts, use_context=False), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(enc8.reference_embeddings(texts), F.normalize(expected, dim=-1),
                                   atol=1e-5, rtol=0)


def test_context_insertion_and_shifted_eot_pooling(tiny):
    model, tokenizer = tiny
    n = 2
    enc = CLIPTextEncoder(model, tokenizer, num_context=n)
    L = enc.context_length
    ids = tokenizer(["a cat"])[0]
    assert ids[:4].tolist() == [tokenizer.sot_token_id, ids[1], ids[2], tokenizer.eot_token_id] and ids[4] == 0

    # by hand: [SOT, ctx1, ctx2, a, cat, EOT, pad...]; EOT lands at 3 + n = 5
    with torch.no_grad():
        tok = model.token_embedding(ids[: L - n])
        seq = torch.cat([tok[:1], enc.context, tok[1:]]).unsqueeze(0) + model.positional_embedding
        hidden = model.ln_final(model.transformer(seq, attn_mask=model.attn_mask))[0]
        expected = hidden[5] @ model.text_projection
        unshifted = hidden[3] @ model.text_projection
        got = enc.encode(["a cat"])[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - unshifted).abs().max() > 1e-3  # pooling at the unshifted position would be wrong

    seq_ids, pool = enc.tokenize(["a cat", LONG])
    assert seq_ids.shape == (2, L - n)
    assert pool.tolist() == [3 + n, L - 1]  # an over-long text is truncated and still ends with EOT
    assert seq_ids[1, -1] == tokenizer.eot_token_id

    with torch.no_grad():  # the context changes E_T([ctx, desc]) but not E_T(desc)
        plain, with_ctx = enc.encode(["a cat"], use_context=False), enc.encode(["a cat"])
        enc.context.add_(1.0)
        assert torch.equal(enc.encode(["a cat"], use_context=False), plain)
        assert not torch.allclose(enc.encode(["a cat"]), with_ctx)


def test_forward_averages_descriptions(tiny):
    model, tokenizer = tiny
    enc = CLIPTextEncoder(model, tokenizer, num_context=8).train()
    prompts = [["a cat on a sofa.", "a sleeping cat.", "a cat outdoors."], ["a dog."]]
    with torch.no_grad():
        out = enc(prompts)
        cat = enc.encode(prompts[0]).mean(dim=0)  # mean of the unnormalised encodings, then normalise
        dog = enc.encode(prompts[1])[0]
    torch.testing.assert_close(out, F.normalize(torch.stack([cat, dog]), dim=-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_eval_cache(tiny):
    model, tokenizer = tiny
    enc = CLIPTextEncoder(model, tokenizer, num_context=8)
    prompts = [["a cat."], ["a dog.", "a puppy."]]

    enc.train()
    assert enc(prompts) is not enc(prompts)  # never cached in training mode
    assert enc(prompts).requires_grad

    enc.eval()
    first = enc(prompts)
    assert enc(prompts) is first and not first.requires_grad

    opt = torch.optim.SGD(enc.parameters(), lr=0.5)  # an optimizer step modifies the context in place
    enc.context.grad = torch.ones_like(enc.context)
    opt.step()
    after_step = enc(prompts)
    assert after_step is not first and not torch.allclose(after_step, first)
    assert enc(prompts) is after_step

    other = enc([["a cat."], ["a bus."]])  # new vocabulary
    assert not torch.allclose(other, after_step)
    assert enc(prompts) is not after_step
    torch.testing.assert_close(enc(prompts), after_step)

    cached = enc(prompts)
    enc.context.data.mul_(2.0)  # e.g. an EMA update through .data (no version bump)
    assert enc(prompts) is not cached


# ------------------------------------------------------------------------------------------ descriptions
def write_descriptions(path, classes, attributes=("consumer photos", "object-centric")):
    path.write_text(json.dumps({"dataset": "toy", "attributes": list(attributes), "classes": classes}))
    return str(path)


def test_descriptions_fallback():
    d = load_class_descriptions(None, ["cat", "dog"], 4, fallback_template="a photo of a {}.")
    assert d.prompts == [["a photo of a cat."], ["a photo of a dog."]] and d.attributes == []
    assert load_class_descriptions("", ["cat"]).prompts == [["a photo of a cat."]]


def test_descriptions_file(tmp_path):
    path = write_descriptions(tmp_path / "toy.json", {
        "cat": ["c1", "c2", "c3", "c4", "c5"],
        "dog": ["d1", "d2"],
        "unused": ["u1"],
    })
    d = load_class_descriptions(path, ["dog", "cat"], num_descriptions=4)
    assert d.prompts == [["d1", "d2"], ["c1", "c2", "c3", "c4"]]  # dataset order, at most R, fewer is fine
    assert d.attributes == ["consumer photos", "object-centric"] and d.source == path

    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_class_descriptions(str(tmp_path / "missing.json"), ["cat"])
    with pytest.raises(ValueError, match="'bird'"):
        load_class_descriptions(path, ["cat", "bird"])
    empty = write_descriptions(tmp_path / "empty.json", {"cat": []})
    with pytest.raises(ValueError, match="'cat'"):
        load_class_descriptions(empty, ["cat"])


def test_resolve_descriptions_path(tmp_path, monkeypatch):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_descriptions_path("", "no_such_dataset_xyz") is None
    assert resolve_descriptions_path("", None) is None
    assert resolve_descriptions_path("explicit/missing.json", "toy") == "explicit/missing.json"

    (tmp_path / "datasets" / "descriptions").mkdir(parents=True)
    local = write_descriptions(tmp_path / "datasets" / "descriptions" / "toy.json", {"cat": ["c"]})
    assert os.path.samefile(resolve_descriptions_path("", "toy"), local)
    other = write_descriptions(tmp_path / "other.json", {"cat": ["c"]})
    assert resolve_descriptions_path(other, "toy") == other  # an explicit path wins

    elsewhere = tmp_path / "d2" / "descriptions"
    elsewhere.mkdir(parents=True)
    write_descriptions(elsewhere / "toy2.json", {"cat": ["c"]})
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    assert os.path.samefile(resolve_descriptions_path("", "toy2"), elsewhere / "toy2.json")


def test_reference_prompts(tiny):
    assert reference_prompts(["cat", "dog"], ["consumer photos", "object-centric"]) == [
        "a clean origami of a cat with attributes: consumer photos, object-centric",
        "a clean origami of a dog with attributes: consumer photos, object-centric",
    ]
    assert reference_prompts(["cat"], [], "a photo of a {}.") == ["a photo of a cat."]
    model, tokenizer = tiny
    enc = CLIPTextEncoder(model, tokenizer, num_context=8)
    ref = enc.reference_embeddings(reference_prompts(["cat", "dog"], []))
    assert ref.shape == (2, 64) and not ref.requires_grad
    torch.testing.assert_close(ref.norm(dim=-1), torch.ones(2))
