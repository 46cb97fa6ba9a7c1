#!/usr/bin/env bash
# Rerun the kernel tests and the compile test (every kernel compiled for sm_90 and sm_80 on the
# CPU, within their shared memory) under another Triton: `scripts/test_triton_version.sh VERSION
# [PYTEST ARGS...]`, e.g. `scripts/test_triton_version.sh 3.6.0 -x`.
#
# It makes (or reuses) a virtual environment with that triton and the CPU build of torch
# (VENV, default ${TMPDIR:-/tmp}/ddpm-fast-triton-VERSION; TORCH, default torch==2.13.0), installs
# this checkout into it without its dependencies and the pure ones it needs, then runs
# tests/kernels and tests/test_engine.py under the Triton interpreter, and compile_kernels.py for
# sm_90 and sm_80. NUMPY pins numpy (e.g. NUMPY='<2.4': Triton < 3.7's interpreter fails on
# NumPy >= 2.4, and tests/conftest.py skips what that breaks, so with NumPy < 2.4 they all run).
# PYTHON names the interpreter that makes the environment (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: $0 TRITON_VERSION [PYTEST ARGS...]" >&2
    exit 2
fi
version=$1
shift
venv=${VENV:-${TMPDIR:-/tmp}/ddpm-fast-triton-$version}
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q "${TORCH:-torch==2.13.0}" "triton==$version" "numpy${NUMPY:-}"
"$py" -m pip install -q --no-deps -e .
"$py" -m pip install -q einops safetensors tqdm Pillow pytest
"$py" -c 'import numpy, torch, triton; print(f"triton {triton.__version__}, torch {torch.__version__}, numpy {numpy.__version__}")'

status=0
# The compile test on its own first, with its output: a shared-memory line per kernel.
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
for arch in 90 80; do
    env -u TRITON_INTERPRET TRITON_CACHE_DIR="$cache/$arch" \
        "$py" tests/kernels/compile_kernels.py "$arch" || status=$?
done
TRITON_INTERPRET=1 "$py" -m pytest -q -p no:cacheprovider -rs tests/kernels tests/test_engine.py \
    "$@" || status=$?
exit "$status"
