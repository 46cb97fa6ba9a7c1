"""The GPU cost model (``ddpm_fast.engine.step_cost``): for each bench model, batch and dtype, the
engine step's launches, bytes and FLOPs, counted on the meta device (no GPU), and the step and a
1000-step chain predicted on an H100 and an H200 from a roofline plus a cost per launch.

    python benchmarks/gpu_cost.py                                  # every bench model
    python benchmarks/gpu_cost.py --models cifar10 --batch 1 64 --dtype bf16 --launch-us 2.5
    python benchmarks/gpu_cost.py --out benchmarks/results/gpu-cost-2026-12-07.md

The launch cost and the bandwidths are estimates until the GPU suite measures them: give the
measured ones with --launch-us and --bandwidth, or let the suite's run set them:

    python benchmarks/gpu_cost.py --check benchmarks/results/gpu-<date>   # the suite's report

``--check DIR`` reads the suite's micro.json (benchmarks/gpu_micro.py: launch cost and copy
bandwidth on that GPU) and its sampler-*.json, and writes DIR/cost-check.md: for every engine
step the suite timed (CUDA graphs on), the model's prediction with the estimated parameters and
with the measured ones, beside the measured ms per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch

from ddpm_fast.bench import model_pipeline
from ddpm_fast.bench.models import MODELS as BENCH_MODELS
from ddpm_fast.engine import DTYPES
from ddpm_fast.engine.step_cost import GPUS, count_step, predict

MODELS = ("cifar10", "ddpm-cifar10", "dd2-cifar10", "adm-cifar10", "adm-imagenet64", "adm-256")
HEADER = [
    "| model | dtype | batch | launches | MB moved | GFLOP | H100 step ms (launches) | "
    "H100 1000-step s | H200 step ms (launches) | H200 1000-step s | memory-bound launches |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def rows(models, batches, dtypes, gpus) -> list[str]:
    lines = []
    for model in models:
        pipeline = model_pipeline(model)
        for dtype in dtypes:
            for batch in batches:
                step = count_step(pipeline, batch, DTYPES[dtype])
                cells = [model, dtype, str(batch), str(step.total), f"{step.bytes / 1e6:.1f}",
                         f"{step.flops / 1e9:.1f}"]  # fmt: skip
                for gpu in gpus:
                    p = predict(step, gpu, dtype)
                    cells += [
                        f"{p.step_s * 1e3:.3f} ({p.launch_s * 1e3:.3f})",
                        f"{p.step_s * 1e3:.2f}",
                    ]  # 1000 steps: ms per step = s per chain
                cells.append(str(p.memory_bound))
                lines.append("| " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    return lines


CHECK_HEADER = [
    "| stage | model | dtype | batch | launches | predicted ms/step (estimates) | predicted "
    "(measured launch, bandwidth) | measured ms/step | measured / predicted |",
    "|---|---|---|---|---|---|---|---|---|",
]


def measured_gpu(micro: dict):
    """The cost model's GPU for the suite's machine, with its measured launch cost and
    bandwidth, and the estimate it replaces."""
    name = micro.get("device", "")
    estimate = GPUS["H200"] if "H200" in name else GPUS["H100"]
    measured = dataclasses.replace(
        estimate, launch_s=micro["launch_s"], bandwidth=micro["copy_bytes_per_s"]
    )
    return estimate, measured


def check(out: Path) -> list[str]:
    """cost-check.md of a suite's results folder: prediction against measurement per step."""
    micro = json.loads((out / "micro.json").read_text())
    estimate, measured = measured_gpu(micro)
    lines, counted = [], {}
    for path in sorted(out.glob("sampler-*.json")):
        record = json.loads(path.read_text())
        model = str(record.get("model", "")).split(" ")[0]
        for row in record.get("results", []):
            if row.get("backend") != "engine" or row.get("ms_per_step") is None:
                continue
            if model not in BENCH_MODELS:  # the dry run's embedded model: nothing to count
                print(f"{path.name}: {model!r} is not a bench model", file=sys.stderr)
                continue
            key = (model, row["dtype"], row["batch"])
            if key not in counted:
                pipeline = model_pipeline(model)
                counted[key] = count_step(pipeline, row["batch"], DTYPES[row["dtype"]])
            step = counted[key]
            guess = predict(step, estimate, row["dtype"]).step_s * 1e3
            model_ms = predict(step, measured, row["dtype"]).step_s * 1e3
            got = row["ms_per_step"]
            lines.append(
                f"| {path.stem} | {model} | {row['dtype']} | {row['batch']} | {step.total} | "
                f"{guess:.3f} | {model_ms:.3f} | {got:.3f} | {got / model_ms:.2f} |"
            )
    per_launch = ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in micro["launch_s_by_op"].items())
    text = [
        f"# Cost model against the suite's measurements, {datetime.date.today()}",
        "",
        f"- GPU: {micro.get('device')}; launch in a CUDA graph: {per_launch} (model: "
        f"{measured.launch_s * 1e6:.2f} us, estimate {estimate.launch_s * 1e6:.2f}); copy "
        f"{measured.bandwidth / 1e12:.2f} TB/s (estimate {estimate.bandwidth / 1e12:.2f})",
        f"- torch {torch.__version__}; command: `python {' '.join(sys.argv)}`",
        "",
        *CHECK_HEADER,
        *lines,
        "",
    ]
    (out / "cost-check.md").write_text("\n".join(text))
    print("\n".join(text))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--launch-us", type=float, help="cost of one launch in a CUDA graph")
    parser.add_argument("--bandwidth", type=float, nargs=2, metavar=("H100", "H200"),
                        help="bytes/s a copy reaches on each (default: 3.0e12 4.3e12)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the table as markdown here")
    parser.add_argument("--check", type=Path, metavar="DIR",
                        help="a GPU suite's results: write DIR/cost-check.md")  # fmt: skip
    args = parser.parse_args()
    if args.check is not None:
        check(args.check)
        return
    gpus = list(GPUS.values())
    if args.launch_us is not None:
        gpus = [dataclasses.replace(g, launch_s=args.launch_us * 1e-6) for g in gpus]
    if args.bandwidth is not None:
        gpus = [
            dataclasses.replace(g, bandwidth=b) for g, b in zip(gpus, args.bandwidth, strict=True)
        ]
    print("\n".join(HEADER))
    lines = rows(args.models, args.batch, args.dtype, gpus)
    if args.out is not None:
        params = "; ".join(
            f"{g.name}: {g.bandwidth / 1e12:.1f} TB/s, {g.launch_s * 1e6:.1f} us per launch, dense "
            + ", ".join(f"{d} {p / 1e12:.0f} TFLOP/s" for d, p in g.peak.items())
            for g in gpus
        )
        text = [
            f"# GPU cost model, {datetime.date.today()}",
            "",
            "Predicted from launches counted on the meta device (no GPU ran): each launch at "
            "max(bytes / bandwidth, FLOPs / peak) plus a launch cost. Not a measurement.",
            "",
            f"- parameters: {params}",
            f"- torch {torch.__version__}; command: `python {' '.join(sys.argv)}`",
            "",
            *HEADER,
            *lines,
            "",
        ]
        args.out.write_text("\n".join(text))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
