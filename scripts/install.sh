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
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python=${PYTHON:-python}

if "$python" -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split(".")[:2]); sys.exit(v < (2, 4))' 2>/dev/null; then
    echo "install.sh: keeping torch $("$python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
    "$python" -m pip install "torch>=2.4"
else
    "$python" -m pip install "torch==2.13.0"
fi
"$python" -m pip install -e ".${extras:+[$extras]}"
