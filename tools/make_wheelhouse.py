#!/usr/bin/env python
"""Build an offline wheelhouse of every HVLFormer dependency, for air-gapped machines (GPU clusters).

Run where the project is installed (``bash tools/install.sh``) and PyPI is reachable:

    python tools/make_wheelhouse.py --out wheelhouse                       # same Python as here
    python tools/make_wheelhouse.py --out wheelhouse --python-version 3.12 --no-torch

and on the offline machine:

    pip install --no-index --find-links wheelhouse hvlformer sal-detectron2

The exact versions installed here are pinned (resolved from the installed distributions, starting at
``hvlformer``, ``sal-detectron2`` and the test tools). Each one is fetched as a binary wheel for the
target Python/platform; a package that only ships a source archive (pure Python, e.g. fvcore) is built
into a wheel here. detectron2 comes as the rewritten pure-Python wheel of tools/install_detectron2.py,
and the project itself as a wheel. ``--no-torch`` leaves out torch, torchvision, triton and the
NVIDIA libraries, for machines with their own PyTorch.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("hvlformer", "sal-detectron2", "pytest")
TORCH_FAMILY = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
PROJECT_PACKAGES = {"hvlformer", "sal-detectron2"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve_installed(python_version: str, include_torch: bool) -> dict[str, str]:
    """name -> installed version, for the dependency closure of ROOTS under the target Python's markers."""
    env = default_environment()
    env["python_version"] = python_version
    env["python_full_version"] = python_version + ".0"
    pinned: dict[str, str] = {}
    stack = list(ROOTS)
    while stack:
        name = _canonical(stack.pop())
        if name in pinned:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here; run `bash tools/install.sh` first")
        pinned[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                continue
            stack.append(req.name)
    if not include_torch:
        pinned = {n: v for n, v in pinned.items() if not TORCH_FAMILY.match(n)}
    return pinned


def _pip(*args: str) -> bool:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=False).returncode == 0


def platform_tags(platform: str) -> list[str]:
    """``manylinux_2_N_x86_64`` -> every manylinux tag it accepts (2_17 .. 2_N, manylinux2014) plus ``any``."""
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not match:
        return [platform, "any"]
    newest, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(newest, 16, -1)]
    return tags + [f"manylinux2014_{arch}", "any"]


def fetch(name: str, version: str, out: Path, python_version: str, platform: str) -> None:
    """Binary wheel for the target, else build one here from the source archive."""
    target = ["--python-version", python_version, "--implementation", "cp"]
    for tag in platform_tags(platform):
        target += ["--platform", tag]
    if _pip("download", "--quiet", "--no-deps", "--only-binary=:all:", *target, "-d", str(out), f"{name}=={version}"):
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not _pip("download", "--quiet", "--no-deps", "--no-binary=:all:", "-d", tmp, f"{name}=={version}"):
            raise SystemExit(f"could not download {name}=={version}")
        archive = next(Path(tmp).iterdir())
        if not _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(archive)):
            raise SystemExit(f"could not build a wheel of {name}=={version}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "wheelhouse")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    parser.add_argument("--platform", default="manylinux_2_35_x86_64",
                        help="newest manylinux tag the target's glibc supports (default: glibc 2.35, "
                             "e.g. Ubuntu 22.04); older manylinux tags are accepted too")
    parser.add_argument("--no-torch", action="store_true", help="leave out torch/torchvision/NVIDIA packages")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pinned = resolve_installed(args.python_version, include_torch=not args.no_torch)
    for name, version in sorted(pinned.items()):
        if name in PROJECT_PACKAGES:
            continue
        print(f"{name}=={version}", flush=True)
        fetch(name, version, args.out, args.python_version, args.platform)
    subprocess.run([sys.executable, str(ROOT / "tools" / "install_detectron2.py"), "--wheel-dir", str(args.out),
                    "--no-requirements"], check=True)
    if not _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(args.out), str(ROOT)):
        raise SystemExit("could not build the hvlformer wheel")
    print(f"wheelhouse ready: {args.out} ({len(list(args.out.glob('*.whl')))} wheels)")
    print(f"offline install: pip install --no-index --find-links {args.out} hvlformer sal-detectron2")


if __name__ == "__main__":
    main()
