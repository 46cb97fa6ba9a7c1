#!/usr/bin/env bash
# A dry run of benchmarks/gpu_suite.sh on this machine, as close to a lent GPU machine as a CPU
# gets: rerun it after any change to the suite (`scripts/gpu_suite_dry_run.sh`, a few minutes).
#
# - The environment: a venv with triton 3.6.0 (the lent machine's), torch 2.13.0 (CPU),
#   numpy 2.5 where it installs, the other libraries that machine has, and not ddpm-fast. It is
#   kept in ${DDPM_FAST_DRYRUN_VENV:-~/.cache/ddpm-fast-dryrun/venv} and reused.
# - The tree: the tracked and untracked-not-ignored files copied to a temporary folder, without
#   .git (what the lent machine receives), and the suite run at its root.
# - Three runs there, with DDPM_FAST_SUITE_DEVICE=cpu (the same stages and control flow on the
#   CPU, the embedded model, a few steps):
#   1. a Python without torch: the preflight must stop in seconds with one line and exit 3;
#   2. the full suite, limits at ${DDPM_FAST_DRYRUN_SCALE:-50}%, in an environment without
#      setuptools and with only `python3` on PATH: the preflight links kernels/ and export/ into
#      ddpm_fast/ and PYTHON falls back to python3;
#   3. --quick, with setuptools >= 70.1 installed: the preflight installs the tree offline
#      (pip install -e --no-index --no-deps --no-build-isolation).
#   After each, the files are checked: machine.txt before the first stage, the stage order, the
#   headline cells first and saved one by one, kernels.json (partial where a limit cut it).
# Results of the last run stay in ${DDPM_FAST_DRYRUN_OUT:-/tmp/ddpm-fast-dryrun}.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${DDPM_FAST_DRYRUN_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ddpm-fast-dryrun/venv}
results=${DDPM_FAST_DRYRUN_OUT:-/tmp/ddpm-fast-dryrun}
scale=${DDPM_FAST_DRYRUN_SCALE:-50}
host_python=${HOST_PYTHON:-python3}
note() { echo "dry run: $*"; }
fail() {
    echo "dry run FAILED: $*" >&2
    exit 1
}

# --- the environment of the lent machine (less CUDA) ---
if [[ ! -x "$venv/bin/python" ]]; then
    note "making $venv (once)"
    "$host_python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0" \
        "triton==3.6.0" einops safetensors tqdm Pillow pytest pytest-benchmark onnx onnxruntime
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "numpy==2.5.*" \
        || note "numpy 2.5 does not install here; keeping $("$venv/bin/python" -c 'import numpy; print(numpy.__version__)')"
fi
vpip=("$venv/bin/python" -m pip -q --disable-pip-version-check)
"${vpip[@]}" uninstall -y ddpm-fast setuptools wheel >/dev/null 2>&1 || true
note "$("$venv/bin/python" -c 'import sys, torch, triton, numpy; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")')"

# --- the tree the lent machine receives ---
work=$(mktemp -d /tmp/ddpm-fast-dryrun-tree.XXXXXX)
trap 'rm -rf "$work"; "${vpip[@]}" uninstall -y ddpm-fast >/dev/null 2>&1 || true' EXIT
tree="$work/repo"
mkdir -p "$tree"
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$tree")
note "copied $(cd "$tree" && find . -type f | wc -l) files to $tree (no .git)"
rm -rf "$results"
mkdir -p "$results"

# check_run OUT LOG MODE: the files a run must leave, and the order of what it printed
check_run() {
    "$venv/bin/python" - "$@" <<'PY' || fail "the files of the $3 run in $1"
import json, sys
from pathlib import Path

out, log, mode = Path(sys.argv[1]), Path(sys.argv[2]).read_text(), sys.argv[3]
for name in ("preflight.txt", "machine.txt", "stages.txt", "sampler-headline.txt"):
    assert (out / name).exists(), f"no {name}"
machine = (out / "machine.txt").read_text()
assert "torch:" in machine and "triton:" in machine, machine
assert log.index("preflight: ok in") < log.index("== sampler-headline"), "preflight after a stage"
ended = dict(line.split(None, 1) for line in (out / "stages.txt").read_text().splitlines())
stages = list(ended)
expected = ["sampler-headline", "micro", "gpu-tests", "kernels"]
if mode == "full":
    expected += ["sampler-steps", "sampler-compile", "sampler-ddpm-cifar10",
                 "sampler-dd2-cifar10", "sampler-adm-cifar10", "sampler-onnx", "sampler-torchrun",
                 "sampler-autotune"]
assert stages == expected, stages
# A loaded CPU can cut the headline before its first cell; a cell saved is in the right place.
headline = out / "sampler-headline.json"
report = json.loads(headline.read_text()) if headline.exists() else {"results": []}
cells = [(r["backend"], r["dtype"]) for r in report["results"]]
expected_cells = [("engine", "bf16"), ("engine", "fp32"), ("reference", "fp32")]
assert cells == expected_cells[: len(cells)], cells
assert len(cells) == 3 or not ended["sampler-headline"].startswith("ok"), (cells, ended)
micro = json.loads((out / "micro.json").read_text())
assert micro["launch_s"] > 0 and micro["copy_bytes_per_s"] > 0, micro
assert (out / "cost-check.md").exists(), "no cost-check.md"
kernels = out / "kernels.json"
n = len(json.loads(kernels.read_text())["benchmarks"]) if kernels.exists() else 0
cut = sum("cut at" in how for how in ended.values())
print(f"dry run: checked the {mode} run: stages in order ({cut} cut at their limits); headline "
      f"cells {cells}; {n} kernel cases in kernels.json")
PY
}

# --- 1. the preflight stops at once where torch is missing ---
bare="$work/bare"
"$host_python" -m venv --without-pip "$bare"
start=$SECONDS
set +e
(cd "$tree" && OUT="$results/no-torch" PYTHON="$bare/bin/python" DDPM_FAST_SUITE_DEVICE=cpu \
    benchmarks/gpu_suite.sh) >"$results/no-torch.log" 2>&1
rc=$?
set -e
[[ $rc == 3 ]] || fail "a Python without torch: exit $rc, expected 3 (see $results/no-torch.log)"
grep -q "preflight failed: cannot import torch" "$results/no-torch.log" \
    || fail "no clear line for the missing torch: $(tail -n 3 "$results/no-torch.log")"
[[ ! -e "$tree/ddpm_fast/kernels" ]] || fail "the preflight left ddpm_fast/kernels behind"
note "1. no torch: exit 3 in $((SECONDS - start)) s: $(grep 'preflight failed' "$results/no-torch.log")"

# --- 2. the full suite: no setuptools, only python3 on PATH ---
shims="$work/bin"
mkdir -p "$shims"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$venv/bin/python3" >"$shims/python3"  # a link loses the venv
chmod +x "$shims/python3"
start=$SECONDS
set +e
(cd "$tree" && env -u PYTHON -u VIRTUAL_ENV PATH="$shims:/usr/bin:/bin" OUT="$results/full" \
    DDPM_FAST_SUITE_DEVICE=cpu DDPM_FAST_SUITE_LIMIT_SCALE="$scale" benchmarks/gpu_suite.sh) \
    >"$results/full.log" 2>&1
rc=$?
set -e
note "2. full suite (limits at $scale%): exit $rc in $((SECONDS - start)) s"
grep -q "ddpm_fast: linked kernels/ and export/" "$results/full/machine.txt" \
    || fail "the no-setuptools fallback was not taken: $(grep ddpm_fast: "$results/full/machine.txt")"
[[ ! -e "$tree/ddpm_fast/kernels" ]] || fail "the fallback's links outlived the run"
check_run "$results/full" "$results/full.log" full
sed -n '/^== results in/,$p' "$results/full.log" | sed 's/^/    /'

# --- 3. --quick, installed offline by pip ---
"${vpip[@]}" install "setuptools>=70.1"
start=$SECONDS
set +e
(cd "$tree" && OUT="$results/quick" PYTHON="$venv/bin/python" DDPM_FAST_SUITE_DEVICE=cpu \
    DDPM_FAST_SUITE_LIMIT_SCALE="$scale" benchmarks/gpu_suite.sh --quick) \
    >"$results/quick.log" 2>&1
rc=$?
set -e
note "3. --quick: exit $rc in $((SECONDS - start)) s"
grep -q "ddpm_fast: pip install -e (offline)" "$results/quick/machine.txt" \
    || fail "the offline pip install was not taken: $(cat "$results/quick/preflight.txt")"
check_run "$results/quick" "$results/quick.log" quick
sed -n '/^== results in/,$p' "$results/quick.log" | sed 's/^/    /'
note "ok; logs and results in $results"
