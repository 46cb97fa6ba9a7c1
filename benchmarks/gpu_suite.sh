#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run and offline: the tests marked gpu, the kernel
# benchmarks (pytest-benchmark JSON) and their table, then the sampler benchmark (1000-step DDPM
# of the CIFAR-10 U-Net at batch 1 and 64: reference eager, the engine fp32/bf16 with and without
# graphs, and in a second run torch.compile's reduce-overhead and max-autotune modes beside the
# reference and the engine, then ONNX Runtime's CUDA provider where onnxruntime-gpu is
# installed). Results go to ${OUT:-benchmarks/results/gpu-<date>}: machine.txt
# (date, GPU, versions, command), gpu-tests.txt, kernels.json, kernels.md (every benchmark),
# summary.md (kernels), sampler-{engine,compile,onnx}.md/.json; the last lines
# printed are the sampler tables and the kernel summary. Each stage has a time limit, so the
# whole suite stays under 8 minutes; a stage cut short keeps what it wrote and fails the exit code.
# Usage: benchmarks/gpu_suite.sh [extra pytest args for the kernel benchmarks, e.g. -k group_norm]
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
status=0

{
    echo "date: $(date -Is)"
    echo "command: $0 $*"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
        | sed 's/^/gpu: /' || echo "gpu: (nvidia-smi unavailable)"
    "$PYTHON" -c 'import platform, torch, triton
print("python:", platform.python_version(), "| torch:", torch.__version__,
      "| cuda:", torch.version.cuda, "| triton:", triton.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")'
} | tee "$OUT/machine.txt"

echo "== tests marked gpu"
timeout 100 "$PYTHON" -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/gpu-tests.txt" || status=$?

echo "== kernel benchmarks"
timeout 90 "$PYTHON" -m pytest benchmarks/test_kernels.py -q -p no:cacheprovider \
    --benchmark-json="$OUT/kernels.json" --benchmark-columns=median,rounds \
    --benchmark-sort=name "$@" >"$OUT/kernels-pytest.txt" 2>&1 || status=$?
tail -n 3 "$OUT/kernels-pytest.txt"

"$PYTHON" - "$OUT" <<'PY' || status=$?
"""Tables from kernels.json: every benchmark (kernels.md), and per kernel, dtype and batch the
median speed-up of the Triton kernel over eager PyTorch and torch.compile (summary.md)."""
import json, statistics, sys
from collections import defaultdict
from pathlib import Path

out = Path(sys.argv[1])
path = out / "kernels.json"
if not path.exists():
    sys.exit(f"no {path}: the benchmarks did not run")
rows = defaultdict(dict)
for b in json.loads(path.read_text())["benchmarks"]:
    e = b["extra_info"]
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
print(f"== {len(rows)} shapes; every one in {out / 'kernels.md'}")
print("\n".join(summary))
PY

sampler=("$PYTHON" benchmarks/sampler.py --device cuda --batch 1 64 --steps 1000 --repeats 2
         --out "$OUT")
echo "== sampler: reference eager and the engine, 1000-step DDPM"
timeout 90 "${sampler[@]}" --name sampler-engine --dtype fp32 bf16 \
    --backends reference engine engine-eager || status=$?
echo "== sampler: torch.compile of the reference beside the engine"
timeout 120 "${sampler[@]}" --name sampler-compile \
    --backends reference compile-reduce-overhead compile-max-autotune engine || status=$?

echo "== sampler: ONNX Runtime's CUDA provider beside the reference and the engine"
if "$PYTHON" -c 'import onnxruntime, sys; sys.exit("CUDAExecutionProvider" not in onnxruntime.get_available_providers())' 2>/dev/null; then
    timeout 50 "${sampler[@]}" --name sampler-onnx --backends reference engine onnxruntime \
        || status=$?
else
    echo "skipped: no onnxruntime-gpu with its CUDA provider (scripts/install.sh onnx)"
fi

echo "== results in $OUT"
for table in sampler-engine sampler-compile sampler-onnx; do
    [[ -f "$OUT/$table.md" ]] && grep '^|' "$OUT/$table.md"
done
[[ -f "$OUT/summary.md" ]] && cat "$OUT/summary.md"
exit "$status"
