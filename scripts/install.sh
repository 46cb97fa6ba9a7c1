#!/usr/bin/env bash
# Install ddpm-fast into the active Python environment: `scripts/install.sh [EXTRAS]`, e.g.
# `scripts/install.sh dev` for the test tools.
#
# torch is the one heavy dependency, and which build is right depends on the machine, so:
# - a torch that is already installed (>= 2.4) is kept: install your CUDA build first if you
#   want a particular one;
# - otherwise, on a machine with an NVIDIA driver, pip picks torch from PyPI (a CUDA build);
# - otherwise (no GPU: CI, laptops) it asks for torch==2.13.0, which on this project's build
#   machines is a CPU build on local disk, installed in seconds with no download.
#
# ONNX Runtime (the engine's CPU executor, and ddpm_fast.export) is always installed: the `onnx`
# extra (onnxruntime-gpu) on a machine with an NVIDIA driver and the `onnx-cpu` extra
# (onnxruntime, the CPU build) elsewhere; an ONNX Runtime build already installed is kept. The two
# builds share the `onnxruntime` package, so never both. (`pip install .` alone installs neither:
# the engine then runs its PyTorch step on the CPU.)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python=${PYTHON:-python}

has_dist() { "$python" -m pip show -q "$1" >/dev/null 2>&1; }
if command -v nvidia-smi >/dev/null 2>&1; then gpu=1; else gpu=0; fi

IFS=, read -ra requested <<< "$extras"
chosen=()
onnx=""
for extra in ${requested[@]+"${requested[@]}"}; do
    case "$extra" in
        onnx) onnx=${onnx:-auto} ;;
        onnx-cpu) onnx=onnx-cpu ;;
        "") ;;
        *) chosen+=("$extra") ;;
    esac
done
onnx=${onnx:-auto}
if [ "$onnx" = auto ]; then
    if has_dist onnxruntime-gpu; then
        onnx=onnx
    elif has_dist onnxruntime; then
        onnx=onnx-cpu
    elif [ "$gpu" = 1 ]; then
        onnx=onnx
    else
        onnx=onnx-cpu
    fi
fi
if [ -n "$onnx" ]; then
    chosen+=("$onnx")
fi
extras=$(IFS=,; echo "${chosen[*]-}")

if "$python" -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split(".")[:2]); sys.exit(v < (2, 4))' 2>/dev/null; then
    echo "install.sh: keeping torch $("$python" -c 'import torch; print(torch.__version__)')"
elif [ "$gpu" = 1 ]; then
    "$python" -m pip install "torch>=2.4"
else
    "$python" -m pip install "torch==2.13.0"
fi
constraints=()
if [ "$onnx" = onnx ] && [ "$gpu" = 1 ]; then
    # onnxruntime-gpu 1.27 and later are built for CUDA 13; with a CUDA 12 torch (whose nvidia-*
    # wheels are the CUDA libraries ONNX Runtime finds) take the last CUDA 12 builds.
    cuda=$("$python" -c 'import torch; print((torch.version.cuda or "").split(".")[0])' 2>/dev/null || true)
    if [ "$cuda" = 12 ]; then
        constraints+=("onnxruntime-gpu<1.27")
    fi
fi
"$python" -m pip install -e ".${extras:+[$extras]}" ${constraints[@]+"${constraints[@]}"}
