#!/usr/bin/env bash
# README command 1: install everything HVLFormer needs on a fresh Python >= 3.10 machine (CPU or GPU).
# Idempotent: a second run finds everything in place and only checks it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

# 1. PyTorch. PyPI's builds are CUDA builds; they also run on a machine without a GPU.
#    A torch that is already importable (e.g. a cluster's own build) is kept.
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  "$PY" -m pip install "torch==2.14.0" "torchvision==0.29.0"
fi

# 2. detectron2 (not on PyPI): see tools/install_detectron2.py; does nothing if it already imports.
"$PY" tools/install_detectron2.py

# 3. The project (editable) and its pure-Python dependencies, plus the test tools.
#    Skipped when `hvlformer` already resolves to this checkout and the dependencies are satisfied.
if ! "$PY" tools/check_install.py >/dev/null 2>&1; then
  "$PY" -m pip install -e ".[test]"
fi
"$PY" tools/check_install.py
