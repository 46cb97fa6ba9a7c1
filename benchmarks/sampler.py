"""Per-step time of whole sampling chains, every backend side by side in one process.

    python benchmarks/sampler.py                      # CPU: reference vs engine, batch 1 and 16
    python benchmarks/sampler.py --device cuda --batch 1 64 --steps 1000 --dtype fp32 bf16 \
        --backends reference compile compile-reduce-overhead compile-max-autotune engine

The model is the seed's CIFAR-10 U-Net (dim 64, dim_mults 1, 2, 4, 8: 35.7M parameters) at 32 x
32 with its default initialisation (time does not depend on the weights), or ``--checkpoint``.
Each measurement samples ``--batch`` images with a ``--steps``-step DDPM chain
(``Pipeline.sample``, so noise, the update and the copy back are in it); the first call of each
backend is its warm-up (engine preparation, graph capture, compilation) and is reported apart.
Then ``--repeats`` rounds run every backend once each, interleaved, so that the noise of a shared
machine hits them alike; the table gives the median ms per step, the spread (min-max), the whole
chain's time and images/s, the warm-up (first call less one chain), the peak CUDA memory, and the
ratio to the reference's median from the same run. Writes ``<out>/<name>.md`` and ``.json``
after each (dtype, batch), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import ddpm_fast
from ddpm_fast.engine import Engine
from ddpm_fast.models.dd_pytorch_v1 import Unet, UnetConfig
from ddpm_fast.pipeline import DiffusionConfig, Pipeline

BACKENDS = (
    "reference",
    "compile",
    "compile-reduce-overhead",
    "compile-max-autotune",
    "engine",
    "engine-eager",
)


def cifar10_pipeline(image_size: int) -> Pipeline:
    """The seed's CIFAR-10 configuration, default-initialised (seed 0)."""
    torch.manual_seed(0)
    network = Unet(UnetConfig(dim=64, dim_mults=(1, 2, 4, 8)))
    return Pipeline(network, DiffusionConfig(image_size=image_size), source="cifar10 config")


def make_backend(name: str, pipeline: Pipeline, dtype: str) -> Pipeline:
    """A Pipeline-like object with ``sample`` for the backend ``name``."""
    if name == "reference":
        return pipeline
    if name.startswith("compile"):
        mode = name.removeprefix("compile").removeprefix("-") or None
        compiled = Pipeline(
            torch.compile(pipeline.network, mode=mode), pipeline.diffusion, source=name
        )
        return compiled
    if name == "engine":
        return Engine(pipeline, dtype=dtype)
    if name == "engine-eager":
        return Engine(pipeline, dtype=dtype, cuda_graph=False)
    raise SystemExit(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")


def timed_chain(sampler: Pipeline, batch: int, steps: int, device: str, seed: int) -> float:
    """Seconds to sample ``batch`` images with a ``steps``-step DDPM chain."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    sampler.sample(batch, batch_size=batch, steps=steps, seed=seed, device=device)
    return time.perf_counter() - start  # sample() returns CPU tensors: the device is done


def machine() -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ddpm_fast": ddpm_fast.__version__,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": "python " + " ".join(sys.argv),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_memory_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def run(args: argparse.Namespace, save) -> dict:
    """Measure every (dtype, batch, backend); ``save(report)`` after each group, so that a run
    cut short (a time limit) keeps what it measured."""
    pipeline = (
        ddpm_fast.load(args.checkpoint, image_size=args.image_size)
        if args.checkpoint
        else cifar10_pipeline(args.image_size)
    )
    report = {"machine": machine(), "model": pipeline.source, "results": []}
    for dtype in args.dtype:
        for batch in args.batch:
            # The reference and torch.compile of it run in fp32 only; the engine in each dtype.
            names = [n for n in args.backends if dtype == "fp32" or n.startswith("engine")]
            backends = {n: make_backend(n, pipeline, dtype) for n in names}
            first, memory = {}, {}
            for name, sampler in backends.items():
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                first[name] = timed_chain(sampler, batch, args.steps, args.device, seed=0)
                memory[name] = peak_memory_mb(args.device)
            times = {name: [] for name in backends}
            for r in range(args.repeats):
                for name, sampler in backends.items():
                    seconds = timed_chain(sampler, batch, args.steps, args.device, seed=r + 1)
                    times[name].append(seconds * 1e3 / args.steps)
            base = statistics.median(times["reference"]) if "reference" in times else None
            for name, ms in times.items():
                median = statistics.median(ms)
                chain_s = median * args.steps / 1e3
                report["results"].append(
                    {
                        "backend": name,
                        "dtype": dtype,
                        "batch": batch,
                        "steps": args.steps,
                        "ms_per_step": median,
                        "ms_min": min(ms),
                        "ms_max": max(ms),
                        "chain_s": chain_s,
                        "images_per_s": batch / chain_s,
                        "first_call_s": first[name],
                        # preparation, capture or compilation: the first call less a chain
                        "warmup_s": max(0.0, first[name] - chain_s),
                        "peak_memory_mb": memory[name],
                        "vs_reference": base / median if base else None,
                        "runs": ms,
                    }
                )
                print(_row(report["results"][-1]), flush=True)
            save(report)
    return report


HEADER = (
    "| backend | dtype | batch | ms/step (median) | min-max | chain s | images/s "
    "| warm-up s | peak MiB | vs reference |",
    "|---|---|---|---|---|---|---|---|---|---|",
)


def _row(r: dict) -> str:
    ratio = f"{r['vs_reference']:.2f}x" if r["vs_reference"] else "-"
    memory = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
    return (
        f"| {r['backend']} | {r['dtype']} | {r['batch']} | {r['ms_per_step']:.2f} "
        f"| {r['ms_min']:.2f}-{r['ms_max']:.2f} | {r['chain_s']:.2f} | {r['images_per_s']:.2f} "
        f"| {r['warmup_s']:.2f} | {memory} | {ratio} |"
    )


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Sampler benchmark, {m['date']}",
        "",
        f"- machine: {m.get('gpu') or m['cpu']}, {m['cores']} cores "
        f"({m['torch_threads']} torch threads)",
        f"- torch {m['torch']}, triton {m['triton']}, ddpm-fast {m['ddpm_fast']}, "
        f"python {m['python']}",
        f"- model: {report['model']}",
        f"- command: `{m['command']}`",
        "",
        *HEADER,
        *(_row(r) for r in report["results"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a checkpoint instead of the CIFAR-10 configuration")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--backends", nargs="+", default=["reference", "engine"])
    parser.add_argument("--steps", type=int, default=10, help="chain steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", help="file name (default: sampler-<device>-<date>)")
    args = parser.parse_args(argv)
    for name in args.backends:
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"sampler-{args.device.split(':')[0]}-{datetime.date.today()}"

    def save(report: dict) -> None:
        (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"{name}.md").write_text(markdown(report))

    print("\n".join(HEADER), flush=True)
    run(args, save)
    print(f"wrote {out / name}.md and .json")


if __name__ == "__main__":
    main()
