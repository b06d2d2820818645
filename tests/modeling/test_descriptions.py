"""Schema of the dataset-aware class descriptions, and the regeneration tool against a local fake endpoint."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import open_clip
import pytest

from conftest import REPO_ROOT, load_script
from hvlformer.data import builtin_class_names
from hvlformer.modeling.text.descriptions import load_class_descriptions, resolve_descriptions_path

DATASETS = {"voc": 21, "coco81": 81, "ade20k": 150, "cityscapes": 19}
R = 4
BUDGET = 77 - 2 - 8  # CLIP context minus SOT/EOT minus the 8 learnable context tokens
TOKENIZER = open_clip.get_tokenizer("ViT-B-16")


def _tool():
    return load_script("tools/generate_descriptions.py", "_hvl_generate_descriptions")


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_descriptions_schema(dataset):
    path = REPO_ROOT / "datasets" / "descriptions" / f"{dataset}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert set(data) == {"dataset", "attributes", "classes"} and data["dataset"] == dataset
    assert data["attributes"] == _tool().TABLE_A1[dataset]  # the paper's Table A.1
    names = builtin_class_names(dataset)
    assert len(names) == DATASETS[dataset]
    assert list(data["classes"]) == names  # every class, in label order, nothing else
    seen = {}
    for name, sentences in data["classes"].items():
        assert len(sentences) == R, name
        for s in sentences:
            assert isinstance(s, str) and s == s.strip() and s.endswith("."), (name, s)
            assert len(s.split()) >= 8, (name, s)  # a real sentence, not "a photo of a X."
            assert s not in seen, f"{name!r} repeats a description of {seen.get(s)!r}: {s}"
            seen[s] = name
            n = len(TOKENIZER.encode(s))
            assert n <= BUDGET, f"{name!r}: {n} tokens > {BUDGET}: {s}"
    # with SOT/EOT and the context the prompt fits CLIP's 77 tokens, untruncated
    longest = max(seen, key=lambda s: len(TOKENIZER.encode(s)))
    assert len(TOKENIZER.encode("x " * 8 + longest)) + 2 <= 77


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_model_loader_finds_and_reads_them(dataset, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    path = resolve_descriptions_path("", dataset)
    shipped = REPO_ROOT / "datasets" / "descriptions" / f"{dataset}.json"
    assert path is not None and Path(path).resolve() == shipped.resolve()
    desc = load_class_descriptions(path, builtin_class_names(dataset), num_descriptions=R)
    assert len(desc.prompts) == DATASETS[dataset] and all(len(p) == R for p in desc.prompts)
    assert desc.attributes


class _FakeEndpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions that answers from a script of replies."""

    replies = []
    requests = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        content = type(self).replies.pop(0)
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_generate_descriptions_against_a_local_endpoint(tmp_path, monkeypatch, capsys):
    good = [f"A distinct sentence number {i} describing the thing in a crowded scene." for i in range(4)]
    too_long = ["word " * 80 + "."] + good[1:]
    _FakeEndpoint.replies = [
        "```json\n" + json.dumps(good) + "\n```",  # class 1: fenced JSON is accepted
        json.dumps(too_long),  # class 2: over the token budget -> asked again
        "not json at all",  # -> asked again
        json.dumps([g.replace("thing", "other") for g in good]),
    ]
    _FakeEndpoint.requests = []
    server = HTTPServer(("127.0.0.1", 0), _FakeEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HVL_TEST_KEY", "secret")
    out = tmp_path / "mine.json"
    try:
        rc = _tool().main([
            "--dataset", "mine", "--classes", "crack", "rust", "--attributes", "Close-up inspection photos",
            "--base-url", f"http://127.0.0.1:{server.server_port}/v1", "--model", "m", "--api-key-env", "HVL_TEST_KEY",
            "--out", str(out)])
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["dataset"] == "mine" and data["attributes"] == ["Close-up inspection photos"]
    assert data["classes"]["crack"] == good and len(data["classes"]["rust"]) == 4
    reqs = _FakeEndpoint.requests
    assert len(reqs) == 4 and all(r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer secret" for r in reqs)
    assert '"crack"' in reqs[0]["body"]["messages"][1]["content"]
    assert "tokens (limit 67)" in reqs[2]["body"]["messages"][-1]["content"]
    # --resume keeps the classes already there (no endpoint needed)
    assert _tool().main(["--dataset", "mine", "--classes", "crack", "rust", "--attributes", "x", "--out", str(out),
                         "--resume"], ask=lambda m: pytest.fail("asked")) == 0


def test_names_style_is_the_class_name_prompt_whatever_the_file(monkeypatch):
    """PROMPT_STYLE "names" (the paper's Table 5 "fixed prompt, class name only", its Table 4 baseline's
    prompt): the fallback template with each class name, no attributes, although a descriptions file with
    sentences and attributes is given."""
    path = REPO_ROOT / "datasets" / "descriptions" / "shapes.json"
    names = ["background", "circle", "square"]
    described = load_class_descriptions(str(path), names)
    assert described.prompts[1] != ["a photo of a circle."] and described.attributes  # the file has both
    plain = load_class_descriptions(str(path), names, style="names")
    assert plain.prompts == [["a photo of a background."], ["a photo of a circle."], ["a photo of a square."]]
    assert plain.attributes == [] and plain.source == "class names: a photo of a {}."
    custom = load_class_descriptions(str(path), names, fallback_template="{}", style="names")
    assert custom.prompts == [["background"], ["circle"], ["square"]]
