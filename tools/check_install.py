#!/usr/bin/env python
"""Check that HVLFormer and its dependencies import, and that ``hvlformer`` is this checkout (exit 1 if not)."""
from __future__ import annotations

import importlib
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    problems = []
    for module in ("torch", "torchvision", "detectron2", "open_clip", "fvcore", "pycocotools", "cv2",
                   "numpy", "scipy", "pytest", "hvlformer"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # report every failing import, not only the first
            problems.append(f"import {module}: {type(exc).__name__}: {exc}")
    if not problems:
        import hvlformer

        location = Path(hvlformer.__file__).resolve()
        if ROOT not in location.parents:
            problems.append(f"hvlformer is imported from {location}, not from this checkout {ROOT}")
        else:
            for spec in metadata.requires("hvlformer") or []:
                req = Requirement(spec)
                if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
                    continue
                try:
                    version = metadata.version(req.name)
                except metadata.PackageNotFoundError:
                    problems.append(f"{req.name} is not installed")
                    continue
                if not req.specifier.contains(version, prereleases=True):
                    problems.append(f"{req.name} {version} does not satisfy {req}")
    if problems:
        print("\n".join(problems))
        return 1
    import torch

    print(f"HVLFormer install OK (torch {torch.__version__}, CUDA available: {torch.cuda.is_available()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
