#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one offline run on a bare machine: a preflight, then the
# stages below, each under a time limit. Results go to ${OUT:-benchmarks/results/gpu-<date>}.
#
#   benchmarks/gpu_suite.sh [--quick] [--preflight-only] [extra pytest args for the kernel
#                           benchmarks, e.g. -k group_norm]
#
# Preflight (< 30 s): where ddpm_fast.kernels/.export/.engine do not import, install this checkout
# offline (pip -e, no index, no dependencies, no build isolation; needs setuptools >= 64), or, where
# the environment is read-only or lacks setuptools, link kernels/ and export/ into ddpm_fast/ for
# this run; then check every import the suite needs, that torch sees a GPU and that Triton compiles
# and runs a kernel on it, and write machine.txt. A missing piece is one line and exit 3.
#
# Stages, in order (the limit in seconds; --quick runs the first four with smaller limits):
#   sampler-headline  1000-step DDPM at batch 1: the engine in bf16 and fp32, then the reference
#   micro             the cost model's parameters: a launch in a CUDA graph, a copy's bandwidth
#   gpu-tests         the tests marked gpu
#   kernels           the kernel benchmarks (160 cases; --quick: 12) and their summary
#   sampler-steps     100-step chains at batch 1 and 64: the reference, the engine with and
#                     without CUDA graphs, bf16 and fp32 (ms per step)
#   sampler-compile   torch.compile reduce-overhead beside the reference and the engine (fp32)
#   sampler-ddpm-cifar10, sampler-dd2-cifar10
#                     the other families' CIFAR-10 networks (bench's ddpm-cifar10: diffusers'
#                     UNet2DModel; dd2-cifar10: denoising-diffusion-pytorch 2.x), 100-step chains
#                     at batch 1: the engine in bf16 and fp32, the reference, and ONNX Runtime
#                     where onnxruntime-gpu is installed (no diffusers: nothing new to install)
#   sampler-onnx      ONNX Runtime's CUDA provider, where onnxruntime-gpu is installed
#   sampler-torchrun  `ddpm-fast sample` in 1 process and 2 under torchrun (same bytes), on 2+ GPUs
#   sampler-autotune  torch.compile max-autotune at batch 1 (last: its compile is the longest)
# A stage over its limit gets SIGINT, then SIGKILL after a grace period: pytest-benchmark writes
# its JSON on SIGINT and the sampler benchmark saves after every cell, so a stage cut short keeps
# what it finished. The limits plus the graces plus the preflight stay under 8.5 minutes on one
# GPU without onnxruntime-gpu, the lent machine (--quick: 3.5).
# stages.txt says how each stage ended; the last lines printed are the tables.
#
# Files in $OUT: preflight.txt, machine.txt, stages.txt, micro.json, gpu-tests.txt, kernels.json,
# kernels-pytest.txt, kernels.md (every case), summary.md (kernel speed-ups), per sampler stage
# <stage>.md/.json/.txt, and cost-check.md (benchmarks/gpu_cost.py --check: the cost model's
# prediction beside each measured engine step).
#
# DDPM_FAST_SUITE_DEVICE=cpu runs the same control flow on the CPU with tiny sizes (the embedded
# model, a few steps): scripts/gpu_suite_dry_run.sh. DDPM_FAST_SUITE_LIMIT_SCALE=<percent> scales
# every limit (the dry run uses it to stay short).
set -euo pipefail

cd "$(dirname "$0")/.."
QUICK=0 PREFLIGHT_ONLY=0
while [[ "${1:-}" == --quick || "${1:-}" == --preflight-only ]]; do
    if [[ $1 == --quick ]]; then QUICK=1; else PREFLIGHT_ONLY=1; fi
    shift
done
DEVICE=${DDPM_FAST_SUITE_DEVICE:-cuda}
if [[ "$DEVICE" != cuda && "$DEVICE" != cpu ]]; then
    echo "gpu_suite: DDPM_FAST_SUITE_DEVICE must be cuda or cpu, not '$DEVICE'" >&2
    exit 2
fi
export DDPM_FAST_SUITE_DEVICE=$DEVICE
SCALE=${DDPM_FAST_SUITE_LIMIT_SCALE:-100}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then
        PYTHON=.venv/bin/python
    elif command -v python >/dev/null 2>&1; then
        PYTHON=python
    else
        PYTHON=python3
    fi
fi
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
: >"$OUT/stages.txt"
status=0
started=$SECONDS

# ---------------------------------------------------------------------------------- preflight
say() { echo "preflight: $*" | tee -a "$OUT/preflight.txt"; }
die() {
    echo "gpu_suite: preflight failed: $*" | tee -a "$OUT/preflight.txt" >&2
    exit 3
}
: >"$OUT/preflight.txt"
command -v "$PYTHON" >/dev/null 2>&1 || die "no Python: '$PYTHON' not found (set PYTHON=...)"
timeout -s INT -k 1 5 true 2>/dev/null || die "no 'timeout' with -s/-k (GNU coreutils)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$("$PYTHON" -V 2>&1) is older than the 3.11 ddpm-fast needs"

importable() {
    "$PYTHON" -c 'import ddpm_fast.kernels, ddpm_fast.export, ddpm_fast.engine' >/dev/null 2>&1
}
can_build() {  # setuptools >= 70.1 builds editable wheels alone; 64 to 70.0 need the wheel package
    "$PYTHON" - <<'PY' >/dev/null 2>&1
import importlib.metadata as md, importlib.util, os, sys, sysconfig
v = tuple(int(p) for p in md.version("setuptools").split(".")[:2])
ok = v >= (70, 1) or (v >= (64, 0) and importlib.util.find_spec("wheel") is not None)
sys.exit(not (ok and os.access(sysconfig.get_paths()["purelib"], os.W_OK)))
PY
}
unlink_tree() {
    for name in kernels export; do
        if [[ -L "ddpm_fast/$name" ]]; then rm -f "ddpm_fast/$name"; fi
    done
}
install_mode=installed
if ! importable; then
    # A non-editable install (into the environment or a --target) would not do: the suite runs at
    # the repository root, where ./ddpm_fast comes first on sys.path and hides an installed copy.
    if can_build && timeout 30 "$PYTHON" -m pip install -q --no-deps --no-build-isolation \
        --no-index --disable-pip-version-check -e . >>"$OUT/preflight.txt" 2>&1 && importable; then
        install_mode="pip install -e (offline)"
    else
        [[ -e ddpm_fast/kernels || -e ddpm_fast/export ]] \
            || { ln -s ../kernels ddpm_fast/kernels && ln -s ../export ddpm_fast/export; } \
            || die "ddpm_fast is not importable, pip could not install it offline (no setuptools >= 64 or a read-only environment) and ddpm_fast/ is not writable"
        trap unlink_tree EXIT
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
        install_mode="linked kernels/ and export/ into ddpm_fast/ for this run (no setuptools or a read-only environment)"
    fi
fi
say "ddpm_fast: $install_mode"

# One process (benchmarks/gpu_preflight.py): every import and where it comes from, the versions,
# the GPU, and one Triton kernel compiled and run on it.
"$PYTHON" benchmarks/gpu_preflight.py "$DEVICE" >"$OUT/machine-python.txt" \
    2>>"$OUT/preflight.txt" || die "$(tail -n 1 "$OUT/preflight.txt")"

mode=full
[[ $QUICK == 1 ]] && mode=quick
{
    echo "date: $(date -Is)"
    echo "command: $0 $*"
    echo "mode: $mode, device: $DEVICE, limits scaled to ${SCALE}%"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no git)")"
    echo "source: $(find ddpm_fast kernels export benchmarks -name '*.py' -type f 2>/dev/null \
        | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16) (sha256 of the Python sources)"
    echo "ddpm_fast: $install_mode"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
            | sed 's/^/gpu: /' || true
    else
        echo "gpu: (no nvidia-smi)"
    fi
    cat "$OUT/machine-python.txt"
} >"$OUT/machine.txt"
rm -f "$OUT/machine-python.txt"
cat "$OUT/machine.txt"
say "ok in $((SECONDS - started)) s"
if [[ $PREFLIGHT_ONLY == 1 ]]; then exit 0; fi

# ------------------------------------------------------------------------------------- stages
limit() { echo $(($1 * SCALE / 100 > 1 ? $1 * SCALE / 100 : 1)); }

# stage NAME LIMIT GRACE LOG command...: run under `timeout -s INT -k GRACE LIMIT`, output to LOG
# and the terminal; record how it ended in stages.txt; a stage that did not end well sets status.
stage() {
    local name=$1 seconds grace=$3 log=$4 rc start=$SECONDS how
    seconds=$(limit "$2")
    shift 4
    echo "== $name (limit ${seconds} s)"
    set +e
    timeout -s INT -k "$grace" "$seconds" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    case $rc in
        0) how=ok ;;
        124) how="cut at its ${seconds} s limit (what it finished is kept)" ;;
        137) how="cut at its ${seconds} s limit, killed after ${grace} s more" ;;
        *) how="failed with exit code $rc" ;;
    esac
    printf '%-17s %-60s %4d s\n' "$name" "$how" $((SECONDS - start)) | tee -a "$OUT/stages.txt"
    if [[ $rc != 0 ]]; then status=1; fi
}

if [[ $DEVICE == cuda ]]; then
    MODEL=cifar10
    HEADLINE_STEPS=1000 STEPS=100 BIG_BATCH=64 REPEATS=2
else  # the dry run: the embedded 8 x 8 model, few steps, small batches
    MODEL=default
    HEADLINE_STEPS=4 STEPS=2 BIG_BATCH=2 REPEATS=1
fi
sampler=("$PYTHON" benchmarks/sampler.py "$MODEL" --device "$DEVICE" --out "$OUT")

# Limits and graces (s). Full: 30 (preflight) + (70+5) + (15+5) (micro) + (80+5) + (40+10)
# + (30+5) + (45+5) + 2 x (25+5) (the two models) + (35+5) + (20+5) (the two ADM models, the first
# also guided) + (25+5, onnxruntime-gpu only) + (20+5, two GPUs only) + (25+5) = 555 s at most;
# 500 s on one GPU without onnxruntime-gpu (the lent H200: those two stages skip); --quick: 30 +
# (70+5) + (15+5) + (35+5) + (20+10) = 195 s. The two
# models' stages take one batch (1) and 100 steps: their cells are the engine's new mappings (cold Triton compiles for their
# shapes and dtypes) and a reference of the same size as the headline's; a stage cut keeps the
# cells it saved (the engine's first).
# gpu-tests: 57 tests = 51 compiled-kernel cases + 6 engine tests. Counted from the tests, the
# kernel cases make at most 246 launches (group_norm 18 cases x 2 feature sets x 2 splits x <= 2
# kernels, channel_norm 15 x 2, linear_attention 18 x 2 x 2), each a possible cold compile; cases
# that share a dtype, constexprs and int specialisations share one, so the distinct count is lower
# (it depends on the GPU's launch plans). One sm_90 compile took ~0.74 s on a loaded 2-core CPU
# (12 kernels of tests/kernels/compile_kernels.py, triton 3.6): 100 s holds ~130 of them, and the
# engine's own kernels are already compiled by the headline; 80 s since the ADM stages (2026-12-07).
# --quick keeps what passes in 35 s.
if [[ $QUICK == 1 ]]; then
    GPU_TESTS=35 KERNELS=20
    export DDPM_FAST_BENCH_QUICK=1
else
    GPU_TESTS=80 KERNELS=40
fi

stage sampler-headline 70 5 "$OUT/sampler-headline.txt" "${sampler[@]}" \
    --name sampler-headline --batch 1 --steps "$HEADLINE_STEPS" --repeats "$REPEATS" \
    --dtype bf16 fp32 --backends reference engine

stage micro 15 5 "$OUT/micro.txt" \
    "$PYTHON" benchmarks/gpu_micro.py --device "$DEVICE" --out "$OUT/micro.json"

stage gpu-tests "$GPU_TESTS" 5 "$OUT/gpu-tests.txt" \
    "$PYTHON" -m pytest -m gpu tests -v --tb=short -p no:cacheprovider --durations=5

stage kernels "$KERNELS" 10 "$OUT/kernels-pytest.txt" \
    "$PYTHON" -m pytest benchmarks/test_kernels.py -q -p no:cacheprovider \
    --benchmark-json="$OUT/kernels.json" --benchmark-columns=median,rounds \
    --benchmark-sort=name "$@"

"$PYTHON" - "$OUT" <<'PY' || status=$?
"""Tables from kernels.json: every benchmark (kernels.md), and per kernel, dtype and batch the
median speed-up of the Triton kernel over eager PyTorch and torch.compile (summary.md)."""
import json, statistics, sys
from collections import defaultdict
from pathlib import Path

out = Path(sys.argv[1])
path = out / "kernels.json"
if not path.exists():
    sys.exit(f"no {path}: the kernel benchmarks saved nothing")
rows = defaultdict(dict)
for b in json.loads(path.read_text())["benchmarks"]:
    e = b["extra_info"]
    if "us_per_call" not in e:  # cut short inside the case
        continue
    key = (e["kernel"], e["image"], e["channels"], e["res"], e["batch"], e["dtype"])
    rows[key][e["provider"]] = (e["us_per_call"], e["gb_per_s"])
lines = ["| kernel | image | C@res | batch | dtype | triton us (GB/s) | torch us | compile us "
         "| vs torch | vs compile |", "|" + "---|" * 10]
speedups = defaultdict(lambda: ([], []))
for key in sorted(rows):
    p = rows[key]
    kernel, image, c, res, batch, dtype = key
    if "triton" not in p:
        continue
    t = p["triton"][0]
    speedups[(kernel, dtype, batch)]  # a row even where no comparison finished
    cell = lambda name: f"{p[name][0]:.1f}" if name in p else "-"  # noqa: E731
    vs = {name: p[name][0] / t for name in ("torch", "compile") if name in p}
    for i, name in enumerate(("torch", "compile")):
        if name in vs:
            speedups[(kernel, dtype, batch)][i].append(vs[name])
    ratio = lambda name: f"{vs[name]:.2f}x" if name in vs else "-"  # noqa: E731
    lines.append(f"| {kernel} | {image} | {c}@{res} | {batch} | {dtype} | {t:.1f} "
                 f"({p['triton'][1]:.0f}) | {cell('torch')} | {cell('compile')} "
                 f"| {ratio('torch')} | {ratio('compile')} |")
(out / "kernels.md").write_text("\n".join(lines) + "\n")
summary = ["| kernel | dtype | batch | median speed-up vs torch | vs torch.compile |",
           "|---|---|---|---|---|"]
median = lambda v: f"{statistics.median(v):.2f}x" if v else "-"  # noqa: E731
for (kernel, dtype, batch), (vt, vc) in sorted(speedups.items()):
    summary.append(f"| {kernel} | {dtype} | {batch} | {median(vt)} | {median(vc)} |")
(out / "summary.md").write_text("\n".join(summary) + "\n")
cases = sum(len(p) for p in rows.values())
print(f"== {cases} kernel cases over {len(rows)} shapes; every one in {out / 'kernels.md'}")
PY

if [[ $QUICK == 0 ]]; then
    stage sampler-steps 30 5 "$OUT/sampler-steps.txt" "${sampler[@]}" \
        --name sampler-steps --batch 1 "$BIG_BATCH" --steps "$STEPS" --repeats 3 \
        --dtype bf16 fp32 --backends reference engine engine-eager

    stage sampler-compile 45 5 "$OUT/sampler-compile.txt" "${sampler[@]}" \
        --name sampler-compile --batch 1 "$BIG_BATCH" --steps "$STEPS" --repeats 2 \
        --dtype fp32 --backends reference engine compile-reduce-overhead

    ort_cuda=0
    if "$PYTHON" -c 'import onnxruntime, sys; sys.exit("CUDAExecutionProvider" not in onnxruntime.get_available_providers())' 2>/dev/null; then
        ort_cuda=1
    fi

    # The other families: diffusers' UNet2DModel (google/ddpm-cifar10-32's) and 2.x, one batch.
    if [[ $DEVICE == cuda ]]; then
        model_dtypes=(bf16 fp32)
    else  # the dry run: fp32 only (bf16 convolutions of a 35.7M network are slow on a CPU)
        model_dtypes=(fp32)
    fi
    model_backends=(reference engine)
    if [[ $ort_cuda == 1 ]]; then model_backends+=(onnxruntime); fi
    for model in ddpm-cifar10 dd2-cifar10; do
        stage "sampler-$model" 25 5 "$OUT/sampler-$model.txt" "$PYTHON" benchmarks/sampler.py \
            "$model" --device "$DEVICE" --out "$OUT" --name "sampler-$model" --batch 1 \
            --steps "$STEPS" --repeats 2 --dtype "${model_dtypes[@]}" \
            --backends "${model_backends[@]}"
    done

    # OpenAI's ADM U-Nets: guided-diffusion's class-conditional ImageNet 64x64 and unconditional
    # 256x256 models (random weights), 20 steps at batch 1 and 16; the engine and the reference
    # (torch.compile of these networks does not fit the stage). The dry run: adm-cifar10, 1 step.
    if [[ $DEVICE == cuda ]]; then
        adm_models=(adm-imagenet64 adm-256) adm_batches=(1 16) adm_steps=20
    else
        adm_models=(adm-cifar10) adm_batches=(1) adm_steps=1
    fi
    # adm-imagenet64 also guided by its classifier (--classifier: engine+guided and
    # reference+guided rows, the classifier's forward and backward in the engine's step graph).
    for model in "${adm_models[@]}"; do
        guided=() limit=20
        if [[ $model == adm-imagenet64 ]]; then guided=(--classifier) limit=35; fi
        stage "sampler-$model" "$limit" 5 "$OUT/sampler-$model.txt" "$PYTHON" benchmarks/sampler.py \
            "$model" --device "$DEVICE" --out "$OUT" --name "sampler-$model" \
            --batch "${adm_batches[@]}" --steps "$adm_steps" --repeats 1 \
            --dtype "${model_dtypes[@]}" --backends engine reference "${guided[@]}"
    done

    if [[ $ort_cuda == 1 ]]; then
        stage sampler-onnx 25 5 "$OUT/sampler-onnx.txt" "${sampler[@]}" \
            --name sampler-onnx --batch 1 "$BIG_BATCH" --steps "$STEPS" --repeats 2 \
            --backends reference engine onnxruntime
    else
        printf '%-17s %-60s %4d s\n' sampler-onnx \
            "skipped: no onnxruntime-gpu with its CUDA provider" 0 | tee -a "$OUT/stages.txt"
    fi

    # Sampling at scale: `ddpm-fast sample` in 1 process and in 2 under torchrun (the same bytes
    # checked), where there are two GPUs (the dry run: two CPU processes).
    gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    if [[ $DEVICE == cpu || $gpus -gt 1 ]]; then
        stage sampler-torchrun 20 5 "$OUT/sampler-torchrun.txt" "$PYTHON" benchmarks/scale.py \
            "$MODEL" --device "$DEVICE" --procs 1 2 --num "$((4 * BIG_BATCH))" \
            --batch-size "$BIG_BATCH" --steps "$STEPS" --repeats 1 --name sampler-torchrun \
            --out "$OUT"
    else
        printf '%-17s %-60s %4d s\n' sampler-torchrun "skipped: one GPU (needs two)" 0 \
            | tee -a "$OUT/stages.txt"
    fi

    stage sampler-autotune 25 5 "$OUT/sampler-autotune.txt" "${sampler[@]}" \
        --name sampler-autotune --batch 1 --steps "$STEPS" --repeats 2 \
        --backends reference compile-max-autotune
fi

# The cost model against what the stages measured (launch cost and bandwidth from micro.json).
if [[ -f "$OUT/micro.json" ]]; then
    "$PYTHON" benchmarks/gpu_cost.py --check "$OUT" >"$OUT/cost-check.txt" 2>&1 || status=$?
fi

echo
echo "== results in $OUT ($mode, $((SECONDS - started)) s)"
cat "$OUT/stages.txt"
for table in sampler-headline sampler-steps sampler-compile sampler-ddpm-cifar10 \
    sampler-dd2-cifar10 sampler-adm-imagenet64 sampler-adm-256 sampler-adm-cifar10 sampler-onnx \
    sampler-torchrun sampler-autotune; do
    if [[ -f "$OUT/$table.md" ]]; then
        echo "-- $table"
        grep '^|' "$OUT/$table.md"
    fi
done
if [[ -f "$OUT/summary.md" ]]; then
    echo "-- kernels (median speed-up of the Triton kernel)"
    cat "$OUT/summary.md"
fi
if [[ -f "$OUT/cost-check.md" ]]; then
    echo "-- cost model: predicted and measured ms per step"
    grep -v '^#' "$OUT/cost-check.md"
fi
exit "$status"
