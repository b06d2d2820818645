"""The documentation is self-contained: no pointer to a specification outside the repository, and every
relative link (markdown link or ``<img src>``) of the repository's markdown files reaches a file in it,
and a heading of it when the link names one (``file.md#heading``).

The project was designed from a specification that is not shipped; the code cites the paper's sections
and equations instead, and ``docs/DESIGN.md`` keeps the decisions the paper leaves open.
"""
from __future__ import annotations

import os
import re
import subprocess
import unicodedata
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from conftest import REPO_ROOT


# References to the external specification: its file name, the folder it lived in (one level up, or by its
# absolute path) and section numbers written as "<word> 2.4" / "<word> section 2.6" / "<word> §3". The
# patterns are assembled from parts so that this file does not match itself.
_WORD = "SP" + "EC"
EXTERNAL_SPEC = [
    (re.compile(_WORD + r"\.md", re.IGNORECASE), "the external specification file"),
    (re.compile(r"\.\./" + "shared\\b"), "a folder outside the repository"),
    (re.compile(r"/work/" + "shared\\b"), "a folder outside the repository"),
    (re.compile(r"\b" + _WORD + r"\b\s*(?:section\s*|sec\.\s*|§\s*)?\d", re.IGNORECASE), "a specification section"),
]

# Binary or generated files that cannot hold a reference.
SKIP_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".pth", ".pkl", ".whl", ".zip", ".tar", ".gz", ".npy", ".npz"}


def repository_files() -> List[Path]:
    """Tracked and untracked-but-not-ignored files (what a commit would hold); a plain walk without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                             capture_output=True, check=True).stdout.decode("utf-8", "surrogateescape")
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for dirpath, dirnames, filenames in os.walk(REPO_ROOT):
            dirnames[:] = [d for d in dirnames if d not in {".git", "__pycache__", "output", ".pytest_cache"}]
            names += [os.path.relpath(os.path.join(dirpath, f), REPO_ROOT) for f in filenames]
    files = []
    for name in names:
        path = REPO_ROOT / name
        if ".git" in Path(name).parts or path.suffix.lower() in SKIP_SUFFIXES or not path.is_file():
            continue
        files.append(path)
    return files


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # a binary file
        return ""


def external_references(text: str) -> List[Tuple[int, str, str]]:
    """(line number, matched text, what it points to) of every reference to the external specification."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for pattern, what in EXTERNAL_SPEC:
            for m in pattern.finditer(line):
                found.append((lineno, m.group(0), what))
    return found


def test_external_reference_patterns():
    word = "SP" + "EC"
    up, folder = "..", "shared"
    for bad in [f"see `{up}/{folder}/{word}.md`", f"({word} 2.4)", f"({word} section 2.6)", f"{word.lower()} 3.2",
                f"/work/{folder}/papers", f"{word} §3"]:
        assert external_references(bad), bad
    for good in [f"{word} = load_builtin_classes('coco81')", f'{word}["classes"][1:]', f"{word}.loader.exec_module(m)",
                 "paper Sec. 3.2 / eq. 2", "spec_from_file_location", "shared by all classes", "inspect 3 files"]:
        assert not external_references(good), good


def test_no_reference_to_an_external_specification():
    """Nothing in the repository sends a reader to the specification or folder that is not in it."""
    bad = []
    for path in repository_files():
        for lineno, text, what in external_references(read_text(path)):
            bad.append(f"{path.relative_to(REPO_ROOT)}:{lineno}: {text!r} ({what})")
    assert not bad, "cite the paper (paper Sec. X / eq. N) or docs/DESIGN.md instead:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------- markdown links
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*\"([^\"]+)\"", re.IGNORECASE)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
_EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:name|id)\s*=\s*\"([^\"]+)\"", re.IGNORECASE)


def strip_code(text: str) -> str:
    """The text without fenced code blocks and inline code spans (their brackets are not links)."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    kept = []
    for ch in text:
        if ch in " -_" or unicodedata.category(ch)[0] in "LN":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> Set[str]:
    text = _FENCE.sub("", read_text(path))
    seen: Dict[str, int] = {}
    result = set(_EXPLICIT_ANCHOR.findall(text))
    for heading in _HEADING.findall(text):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def relative_links(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, target) of every relative link of a markdown file (web, mail and data links left out)."""
    text = strip_code(read_text(path))
    for pattern in (_MD_LINK, _HTML_LINK):
        for m in pattern.finditer(text):
            target = m.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("//"):
                continue
            yield text.count("\n", 0, m.start()) + 1, target


def markdown_files() -> List[Path]:
    return sorted(p for p in repository_files() if p.suffix.lower() == ".md")


def test_the_documentation_pages_exist():
    for name in ["README.md", "docs/INSTALL.md", "docs/GETTING_STARTED.md", "docs/RESULTS.md", "docs/DESIGN.md"]:
        assert (REPO_ROOT / name).is_file(), name


@pytest.mark.parametrize("name", ["README.md", "docs/INSTALL.md", "docs/GETTING_STARTED.md", "docs/RESULTS.md",
                                  "docs/DESIGN.md", "datasets/README.md", "projects/HVLFormer/demo/README.md",
                                  "docs/results/README.md"])
def test_the_main_pages_are_checked(name):
    assert REPO_ROOT / name in markdown_files(), f"{name} is not among the checked markdown files"


def test_relative_markdown_links_resolve():
    """Every relative link of every markdown file (README.md, docs/*.md, ...) reaches an existing file, and
    the heading it names exists."""
    broken = []
    for md in markdown_files():
        for lineno, target in relative_links(md):
            where = f"{md.relative_to(REPO_ROOT)}:{lineno}: {target}"
            file_part, _, anchor = target.partition("#")
            if file_part:
                base = REPO_ROOT if file_part.startswith("/") else md.parent
                dest = (base / file_part.lstrip("/")).resolve()
                if not dest.exists():
                    broken.append(f"{where} (no such file)")
                    continue
                if REPO_ROOT not in dest.parents and dest != REPO_ROOT:
                    broken.append(f"{where} (outside the repository)")
                    continue
            else:
                dest = md
            if anchor and dest.suffix.lower() == ".md" and anchor.lower() not in anchors(dest):
                broken.append(f"{where} (no heading '#{anchor}' in {dest.relative_to(REPO_ROOT)})")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_readme_keeps_the_two_ci_commands():
    """.ci/run runs the README's two set-up commands exactly as written there."""
    readme = read_text(REPO_ROOT / "README.md")
    ci = read_text(REPO_ROOT / ".ci" / "run")
    for command in ["bash tools/install.sh", "python -m pytest -q"]:
        assert f"\n{command}\n" in readme, command
        assert f"\n{command}\n" in ci, command
