#!/usr/bin/env bash
# The command a new user runs first, `ddpm-fast sample` (16 digits, 1000 DDPM steps), timed wall
# to wall (start-up included) on a quiet machine and beside N busy processes (a Python loop
# spinning a core each), for the engine with its plan (on ONNX Runtime where installed: a warm
# start, which imports no torch), the same without the warm start (DDPM_FAST_WARM_START=0: torch
# loads the model, the executor file comes from the cache), the engine pinned to every core, the
# engine on its PyTorch executor, and ONNX Runtime running an exported step file by itself
# (`sample --onnx`). Each case runs REPEATS times, interleaved; the median is reported, and each
# case's image files are compared with its first (same bytes whatever the load), and the engine's
# with and without the warm start with each other. The engine's executor file is exported into a
# fresh cache folder by a first, separately timed run (the cold start, which records the warm
# start); the timed runs find both there.
#
#   benchmarks/sample_under_load.sh [BUSY=1] [REPEATS=3] [OUT=benchmarks/results/...md]
# STEPS=10 in the environment makes a quick check of the script itself.
set -euo pipefail
steps=${STEPS:-1000}
busy=${1:-1}
repeats=${2:-3}
out=${3:-benchmarks/results/sample-under-load-$(date +%F).md}
work=$(mktemp -d)
trap 'kill ${pids[@]+"${pids[@]}"} 2>/dev/null; rm -rf "$work"' EXIT
cores=$(python -c "import os; print(len(os.sched_getaffinity(0)))")

python -m ddpm_fast export --what step --steps "$steps" --out "$work/step.onnx" >/dev/null
export DDPM_FAST_CACHE_DIR="$work/cache"
start=$(date +%s.%N)
python -m ddpm_fast sample --steps "$steps" --out "$work/cold.png" >/dev/null 2>&1
cold=$(awk "BEGIN {print $(date +%s.%N) - $start}")
declare -A cmds=(
    [engine]="python -m ddpm_fast sample --steps $steps --out $work/IMG.png"
    [engine-no-warm-start]="env DDPM_FAST_WARM_START=0 python -m ddpm_fast sample --steps $steps --out $work/IMG.png"
    [engine-all-cores]="python -m ddpm_fast sample --steps $steps --threads $cores --out $work/IMG.png"
    [engine-torch]="python -m ddpm_fast sample --steps $steps --cpu-executor torch --out $work/IMG.png"
    [onnxruntime]="python -m ddpm_fast sample --steps $steps --onnx $work/step.onnx --out $work/IMG.png"
)
cases=(engine engine-no-warm-start engine-all-cores engine-torch onnxruntime)
declare -A times
pids=()
for load in 0 "$busy"; do
    pids=()
    for _ in $(seq 1 "$load"); do python -c "while True: pass" & pids+=($!); done
    sleep 0.5
    for r in $(seq 1 "$repeats"); do
        for c in "${cases[@]}"; do
            img="$c-$load-$r"
            start=$(date +%s.%N)
            ${cmds[$c]//IMG/$img} >/dev/null 2>&1
            end=$(date +%s.%N)
            times[$c,$load]+="$(awk "BEGIN {print $end - $start}") "
        done
    done
    kill ${pids[@]+"${pids[@]}"} 2>/dev/null || true
    wait ${pids[@]+"${pids[@]}"} 2>/dev/null || true
done

median() { printf '%s\n' $1 | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
same=yes
for c in "${cases[@]}"; do
    for f in "$work/$c"-[0-9]*.png; do cmp -s "$f" "$work/$c-0-1.png" || same="no ($c)"; done
done
warm_same=yes
cmp -s "$work/engine-0-1.png" "$work/engine-no-warm-start-0-1.png" || warm_same=no
cmp -s "$work/engine-0-1.png" "$work/cold.png" || warm_same=no
{
    echo "# \`ddpm-fast sample\` quiet and under load, $(date +%F)"
    echo
    echo "- machine: $(python -c 'from ddpm_fast.machine import cpu_model; print(cpu_model())'), $cores cores available"
    echo "- command: \`benchmarks/sample_under_load.sh $busy $repeats\` (wall time with start-up, median of $repeats, interleaved)"
    echo "- each case's image files byte-identical to its first, quiet and loaded: $same"
    echo "- the engine's images the same bytes with and without the warm start, and as the cold run's: $warm_same"
    echo "- the engine's first run, exporting its executor file into an empty cache (cold start): $(printf '%.1f' "$cold") s"
    echo
    echo "| | quiet s | with $busy busy process(es) s | loaded/quiet |"
    echo "|---|---|---|---|"
    for c in "${cases[@]}"; do
        q=$(median "${times[$c,0]}"); l=$(median "${times[$c,$busy]}")
        printf '| %s | %.1f | %.1f | %.2fx |\n' "$c" "$q" "$l" "$(awk "BEGIN {print $l / $q}")"
    done
} | tee "$out"
