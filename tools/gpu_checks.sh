#!/usr/bin/env bash
# The GPU measurements of the Triton MSDeformAttn kernels and of the ViT-B/16 VOC semi-supervised model,
# in one command for a machine with a CUDA GPU and the project's environment (tools/install.sh):
#
#     tools/gpu_checks.sh [OUT_DIR] [all|kernels|model]      # OUT_DIR defaults to $OUT or gpu_results
#
#   kernels  the MSDeformAttn tests on the GPU (compiled kernels, not the interpreter), then
#            tools/benchmark_msdeformattn.py on the real shapes with float32 and bfloat16 values
#            (Triton vs PyTorch core vs the ms-deform-attn CUDA op when it loads), about a minute;
#   model    tools/benchmark.py --sweep on configs/voc/hvlformer_vitb16_voc_92.yaml (random weights):
#            4+4 and 8+8 images per GPU x AMP off/on x gradient checkpointing off/on with the Triton core,
#            inference time per 512 x 512 image, and 4+4 with the PyTorch core for comparison.
#
# Every step writes its JSON (or log) to OUT_DIR and the script goes on after a failing step; the exit
# status is non-zero if any step failed. The machine needs no network: CLIP weights are random
# (MODEL.HVLFORMER.CLIP.PRETRAINED ""), and the CUDA op is only tried if importable -- to include it,
# set MSDA_WHEEL to a local ms-deform-attn wheel built for that machine's torch and CUDA.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-gpu_results}}"
WHAT="${2:-all}"
case "$WHAT" in all|kernels|model) ;; *) echo "usage: $0 [OUT_DIR] [all|kernels|model]" >&2; exit 2 ;; esac
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT/projects/HVLFormer${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET  # compiled kernels on the GPU

failed=0
step() {  # step NAME COMMAND...: run, log to OUT_DIR/NAME.log, remember a failure
    local name="$1"; shift
    echo "== $name: $*" >&2
    local start=$SECONDS
    if "$@" > >(tee "$OUT_DIR/$name.log") 2> >(tee "$OUT_DIR/$name.err" >&2); then
        echo "== $name: ok ($((SECONDS - start)) s)" >&2
    else
        echo "== $name: FAILED ($((SECONDS - start)) s)" >&2
        failed=1
    fi
}

python - > "$OUT_DIR/environment.json" <<'EOF'
import json, platform, torch, triton
print(json.dumps({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
                  if torch.cuda.is_available() else None,
                  "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
                  "python": platform.python_version()}, indent=2))
EOF
cat "$OUT_DIR/environment.json" >&2
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "no CUDA device: these are the GPU checks (CPU smoke runs: see docs/RESULTS.md, Benchmarks)" >&2; exit 1; }

if [ -n "${MSDA_WHEEL:-}" ]; then
    target="$(mktemp -d)"
    step msda_install python -m pip install --no-deps --no-index --target "$target" "$MSDA_WHEEL"
    export PYTHONPATH="$target:$PYTHONPATH"
fi

if [ "$WHAT" = all ] || [ "$WHAT" = kernels ]; then
    step pytest_msdeformattn python -m pytest -q -p no:cacheprovider \
        tests/modeling/pixel_decoder/test_ms_deform_attn_triton.py tests/modeling/pixel_decoder/test_ms_deform_attn.py
    step msdeformattn_float32 python tools/benchmark_msdeformattn.py --output "$OUT_DIR/msdeformattn_float32.json"
    step msdeformattn_bfloat16 python tools/benchmark_msdeformattn.py --dtype bfloat16 \
        --output "$OUT_DIR/msdeformattn_bfloat16.json"
fi

if [ "$WHAT" = all ] || [ "$WHAT" = model ]; then
    CONFIG=configs/voc/hvlformer_vitb16_voc_92.yaml
    step train_vitb16_voc_semi python tools/benchmark.py --config-file "$CONFIG" --device cuda --sweep \
        --batch-sizes 4+4,8+8 --amp off,on --checkpointing off,on --impls auto \
        --output "$OUT_DIR/train_vitb16_voc_semi.json" MODEL.HVLFORMER.CLIP.PRETRAINED ""
    step train_vitb16_voc_semi_pytorch_core python tools/benchmark.py --config-file "$CONFIG" --device cuda \
        --sweep --batch-sizes 4+4 --amp off,on --checkpointing off --impls pytorch \
        --output "$OUT_DIR/train_vitb16_voc_semi_pytorch_core.json" MODEL.HVLFORMER.CLIP.PRETRAINED ""
fi

echo "results in $OUT_DIR" >&2
exit $failed
