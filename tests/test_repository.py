"""What a fresh clone holds: every tracked file is part of the project, not a leftover of a developer's
machine (a link to a folder outside the checkout, a package wheel)."""
import os
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT


def _tracked_entries():
    """``(mode, path)`` of every tracked file; skips when the tests do not run in a git checkout."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(["git", "ls-files", "-s"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return [(line.split()[0], line.split("\t", 1)[1]) for line in listing.stdout.splitlines()]


def test_tracked_links_stay_inside_the_checkout():
    """A tracked symbolic link must point inside the repository: one to a folder of the developer's machine
    (``output -> /work/output``) dangles in a fresh clone, and ``train_net.py``, which writes under
    ``output/`` by default, fails to create its folder there."""
    for mode, path in _tracked_entries():
        if mode != "120000":
            continue
        target = os.readlink(REPO_ROOT / path)
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        assert not os.path.isabs(target) and not resolved.startswith(".."), f"{path} -> {target} leaves the checkout"


def test_no_package_archives_are_tracked():
    """Dependencies come from the package index (tools/install.sh) or a wheelhouse built by
    tools/make_wheelhouse.py, never from files committed to the repository."""
    archives = [path for _, path in _tracked_entries() if path.endswith((".whl", ".tar.gz", ".zip", ".egg"))]
    assert archives == []
