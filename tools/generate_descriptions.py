#!/usr/bin/env python
"""Regenerate dataset-aware class descriptions with any OpenAI-compatible chat endpoint (optional).

The project ships hand-checked descriptions in ``datasets/descriptions/<dataset>.json``; this tool is never
needed to train or evaluate. It reproduces the paper's MLLM prompting (paper Sec. 3.1 / eq. 1) for users who have an
endpoint (OpenAI, a local vLLM / llama.cpp / Ollama server, ...):

    export OPENAI_API_KEY=...
    python tools/generate_descriptions.py --dataset voc --base-url https://api.openai.com/v1 --model gpt-4o \
        --out datasets/descriptions/voc.json

For each class the model is asked for R (default 4) distinct, attribute-rich one-sentence descriptions of
how the class looks in the dataset's imagery, given the dataset attributes (paper Table A.1). Every
answer is checked: a JSON list of R distinct strings, each within CLIP's 77-token context together with
SOT/EOT and the learnable context tokens (``77 - 2 - --context-tokens`` BPE tokens, 67 by default);
an answer that fails is asked for again (``--retries``). The output has the schema of the shipped files
(``{"dataset", "attributes", "classes": {name: [sentences]}}``); with ``--resume`` classes already in the
output file are kept. Custom datasets: ``--classes`` (or ``--classes-file``, one name per line) and
``--attributes``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
#: Dataset attributes of the paper's Table A.1.
TABLE_A1 = {
    "voc": ["Consumer-grade imagery", "Object-centric scenes", "Varied viewpoints and perspectives",
            "Diverse object scales", "Partial occlusions", "Truncated objects", "Moderate clutter"],
    "coco81": ["Consumer-grade imagery", "Everyday scenes", "Diverse viewpoints", "Crowded compositions",
               "Strong occlusions", "Rich contextual cues", "Small object presence", "Human activity focus"],
    "ade20k": ["Scene-focused", "Complex spatial layouts", "High category diversity",
               "Varied viewpoints and perspectives", "High scene clutter", "Rich contextual relationships"],
    "cityscapes": ["Urban street scenes", "Vehicle-mounted camera", "Egocentric viewpoint",
                   "Real-world driving conditions", "Structured road layouts", "Dynamic traffic context",
                   "Outdoor environments", "Pedestrians and vehicles"],
}
SYSTEM = ("You write short visual descriptions of object and stuff classes for a CLIP text encoder used in "
          "semantic segmentation. Answer with JSON only.")
USER = ("Dataset: {dataset}. Dataset attributes: {attributes}.\n"
        "Class: \"{cls}\".\n"
        "Write {r} distinct, attribute-rich, one-sentence descriptions of how a \"{cls}\" typically appears in "
        "this dataset's images: its appearance (shape, parts, material, colour), its context and "
        "surroundings, the viewpoint and scale at which it is seen, and typical occlusion or truncation. "
        "Each sentence must stand alone, describe only this class, and stay under {words} words. "
        "Answer with a JSON list of {r} strings and nothing else.")


def token_counter() -> Callable[[str], int]:
    """BPE tokens of a text without SOT/EOT, with CLIP's tokenizer (open_clip, offline)."""
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-16")
    return lambda text: len(tok.encode(text))


def chat(base_url: str, model: str, messages: List[Dict[str, str]], api_key: Optional[str],
         temperature: float = 0.7, timeout: float = 120.0) -> str:
    """One ``POST {base_url}/chat/completions``; returns the first choice's message content."""
    body = json.dumps({"model": model, "messages": messages, "temperature": temperature}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{req.full_url}: HTTP {e.code}: {e.read()[:500]!r}") from e
    except urllib.error.URLError as e:
        raise RuntimeError(f"{req.full_url}: cannot connect ({e.reason}).") from e
    try:
        return data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise RuntimeError(f"{req.full_url}: unexpected response {str(data)[:300]}") from e


def parse_answer(text: str, r: int, max_tokens: int, count_tokens: Callable[[str], int]) -> List[str]:
    """The R sentences of a model answer; ``ValueError`` saying what is wrong."""
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        raise ValueError("the answer is not a JSON list")
    items = json.loads(text[start:end + 1])
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError("the answer is not a list of strings")
    items = [" ".join(s.split()) for s in items if s.strip()]
    if len(items) < r:
        raise ValueError(f"{len(items)} descriptions instead of {r}")
    items = items[:r]
    if len({s.lower() for s in items}) != r:
        raise ValueError("duplicate descriptions")
    for s in items:
        n = count_tokens(s)
        if n > max_tokens:
            raise ValueError(f"{n} tokens (limit {max_tokens}): {s!r}")
    return items


def describe_class(ask: Callable[[List[Dict[str, str]]], str], dataset: str, attributes: Sequence[str], cls: str,
                   r: int, max_tokens: int, count_tokens: Callable[[str], int], retries: int = 3) -> List[str]:
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": USER.format(dataset=dataset, attributes=", ".join(attributes), cls=cls,
                                                        r=r, words=max(10, max_tokens * 2 // 3))}]
    problem = ""
    for _ in range(retries + 1):
        answer = ask(messages)
        try:
            return parse_answer(answer, r, max_tokens, count_tokens)
        except (ValueError, json.JSONDecodeError) as e:
            problem = str(e)
            messages = messages[:2] + [{"role": "assistant", "content": answer},
                                       {"role": "user", "content": f"That answer is invalid: {problem}. Try again."}]
    raise RuntimeError(f"class {cls!r}: no valid answer after {retries + 1} tries (last problem: {problem}).")


def _class_names(args: argparse.Namespace) -> List[str]:
    if args.classes:
        return list(args.classes)
    if args.classes_file:
        return [line.strip() for line in Path(args.classes_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    path = REPO / "projects" / "HVLFormer" / "hvlformer" / "data" / "classes" / f"{args.dataset}.json"
    if not path.is_file():
        raise SystemExit(f"No class list for dataset {args.dataset!r} ({path}); give --classes or --classes-file.")
    return json.loads(path.read_text(encoding="utf-8"))["classes"]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None, ask: Optional[Callable[[List[Dict[str, str]]], str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, help="voc, coco81, ade20k, cityscapes, or a custom name")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                   help="OpenAI-compatible API base URL")
    p.add_argument("--model", default="gpt-4o")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--out", default=None, help="output JSON (default: datasets/descriptions/<dataset>.json)")
    p.add_argument("--classes", nargs="+", default=None, help="class names (custom datasets)")
    p.add_argument("--classes-file", default=None, help="file with one class name per line (custom datasets)")
    p.add_argument("--attributes", nargs="+", default=None, help="dataset attributes (default: paper Table A.1)")
    p.add_argument("--num-descriptions", type=int, default=4, help="R")
    p.add_argument("--context-tokens", type=int, default=8, help="learnable context tokens sharing CLIP's 77")
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--resume", action="store_true", help="keep classes already in the output file")
    p.add_argument("--dry-run", action="store_true", help="print the first prompt and exit")
    args = p.parse_args(argv)

    classes = _class_names(args)
    attributes = args.attributes or TABLE_A1.get(args.dataset)
    if not attributes:
        raise SystemExit(f"Give --attributes for the custom dataset {args.dataset!r}.")
    out = Path(args.out) if args.out else REPO / "datasets" / "descriptions" / f"{args.dataset}.json"
    max_tokens = 77 - 2 - args.context_tokens
    if args.dry_run:
        print(USER.format(dataset=args.dataset, attributes=", ".join(attributes), cls=classes[0],
                          r=args.num_descriptions, words=max(10, max_tokens * 2 // 3)))
        return 0
    if ask is None:
        key = os.environ.get(args.api_key_env)
        ask = lambda messages: chat(args.base_url, args.model, messages, key, args.temperature)  # noqa: E731
    done: Dict[str, List[str]] = {}
    if args.resume and out.is_file():
        done = json.loads(out.read_text(encoding="utf-8")).get("classes", {})
    count = token_counter()
    result = {"dataset": args.dataset, "attributes": list(attributes), "classes": {}}
    start = time.perf_counter()
    for i, cls in enumerate(classes, 1):
        if cls in done and len(done[cls]) >= args.num_descriptions:
            result["classes"][cls] = done[cls]
            continue
        result["classes"][cls] = describe_class(ask, args.dataset, attributes, cls, args.num_descriptions,
                                                max_tokens, count, args.retries)
        _write_json(out, result)  # progress survives an interruption (use --resume)
        print(f"[{i}/{len(classes)}] {cls}")
    _write_json(out, result)
    print(f"wrote {out} ({len(classes)} classes, {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
