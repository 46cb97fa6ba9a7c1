"""The sampler benchmark behind ``ddpm-fast bench`` and ``benchmarks/sampler.py``: whole sampling
chains, every backend side by side in one process, with the machine's ceiling beside them.

Each measurement samples ``batch`` images with a ``steps``-step DDPM chain through the backend's
``sample`` (noise, the update and the copy back included). The first call of each backend is its
warm-up (engine preparation, graph capture, compilation, ONNX session) and is reported apart.
Then ``repeats`` rounds run every backend once each, interleaved, so that the noise of a shared
machine hits them alike. Per backend: median ms per step and its spread (min-max), the chain's
time and images/s, the warm-up (first call less one chain), peak CUDA memory, the ratio to the
reference's median from the same run, and the floor: FLOPs of one network forward
(``torch.utils.flop_counter``), the bytes its weights alone take to read, and the FLOP/s achieved
against a large matmul timed in the same run (the machine's practical ceiling).

Models: the seed's CIFAR-10 U-Net (dim 64, dim_mults 1, 2, 4, 8: 35.7M parameters) at 32 x 32,
the same network at 64 x 64 and 128 x 128, default-initialised (time does not depend on the
weights), or a checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import load
from .engine import DTYPES, Engine
from .errors import ConfigError
from .models.dd_pytorch_v1 import Unet, UnetConfig
from .pipeline import DiffusionConfig, Pipeline
from .version import __version__

MODELS = {"cifar10": 32, "cifar10-64": 64, "cifar10-128": 128}
BACKENDS = (
    "reference",
    "compile",
    "compile-reduce-overhead",
    "compile-max-autotune",
    "engine",
    "engine-eager",
    "onnxruntime",
)


def model_pipeline(model: str) -> Pipeline:
    """A named configuration (default-initialised, seed 0), "default" (the embedded model) or a
    checkpoint path."""
    if model == "default":
        return load()
    if model in MODELS:
        torch.manual_seed(0)
        network = Unet(UnetConfig(dim=64, dim_mults=(1, 2, 4, 8)))
        diffusion = DiffusionConfig(image_size=MODELS[model])
        return Pipeline(network, diffusion, source=f"{model} configuration")
    return load(model)


class OnnxBackend:
    """``sample`` through an exported ``step`` file and ``OnnxSampler`` (CPU provider on the
    CPU), exported once per chain length into ``workdir``."""

    def __init__(self, pipeline: Pipeline, device: str, workdir: Path):
        self.pipeline, self.device, self.workdir = pipeline, device, workdir
        self.samplers = {}

    def sample(self, num, *, batch_size, steps, seed, device):
        from .export import OnnxSampler, export_onnx

        if steps not in self.samplers:
            path = self.workdir / f"step-{steps}.onnx"
            export_onnx(self.pipeline, path, what="step", steps=steps, verify=False)
            providers = ["CPUExecutionProvider"] if device == "cpu" else None
            self.samplers[steps] = OnnxSampler(path, providers=providers)
        return self.samplers[steps].sample(num, batch_size=batch_size, seed=seed)


def make_backend(name: str, pipeline: Pipeline, dtype: str, device: str, workdir: Path):
    """An object with the Pipeline's ``sample`` for the backend ``name``."""
    if name == "reference":
        return pipeline
    if name.startswith("compile"):
        mode = name.removeprefix("compile").removeprefix("-") or None
        return Pipeline(torch.compile(pipeline.network, mode=mode), pipeline.diffusion)
    if name.startswith("engine"):
        return Engine(pipeline, dtype=dtype, cuda_graph=False if name == "engine-eager" else None)
    if name == "onnxruntime":
        return OnnxBackend(pipeline, device, workdir)
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_chain(sampler, batch: int, steps: int, device: str, seed: int) -> float:
    """Seconds to sample ``batch`` images with a ``steps``-step DDPM chain."""
    _synchronize(device)
    start = time.perf_counter()
    sampler.sample(batch, batch_size=batch, steps=steps, seed=seed, device=device)
    _synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def network_floor(pipeline: Pipeline, batch: int) -> dict:
    """FLOPs of one forward at this batch, and the bytes of its weights (a lower bound on the
    bytes a forward moves: every weight is read at least once)."""
    from torch.utils.flop_counter import FlopCounterMode

    network = pipeline.network.cpu()
    x = torch.zeros(batch, *pipeline.image_shape())
    t = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        network(x, t)
    weight_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
    return {"flops": counter.get_total_flops(), "weight_bytes": weight_bytes}


def matmul_ceiling(device: str, dtype: torch.dtype, size: int | None = None) -> float:
    """FLOP/s of a large square matmul, the best of a few after a warm-up: what this machine
    sustains on dense math. (A convolution can beat it where its library does fewer FLOPs than
    the direct method the counter counts, e.g. Winograd.)"""
    size = size or (8192 if device.startswith("cuda") else 4096)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: threads, kernels, caches
    best = float("inf")
    for _ in range(3):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def machine(device: str) -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ddpm_fast": __version__,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    for package in ("triton", "onnxruntime"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
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


def run(args: argparse.Namespace, save=None) -> dict:
    """Measure every (dtype, batch, backend); ``save(report)`` after each (dtype, batch), so that
    a run cut short (a time limit) keeps what it measured."""
    pipeline = model_pipeline(args.model)
    with tempfile.TemporaryDirectory(prefix="ddpm-fast-bench-") as workdir:
        return _run(args, pipeline, Path(workdir), save)


def _run(args: argparse.Namespace, pipeline: Pipeline, workdir: Path, save) -> dict:
    report = {
        "machine": machine(args.device),
        "model": pipeline.source,
        "image_shape": list(pipeline.image_shape()),
        "parameters": pipeline.num_parameters(),
        "ceiling_flops": {},
        "results": [],
    }
    for dtype in args.dtype:
        ceiling = matmul_ceiling(args.device, DTYPES[dtype])
        report["ceiling_flops"][dtype] = ceiling
        for batch in args.batch:
            floor = network_floor(pipeline, batch)
            # The reference and what compiles it run in fp32 (its dtype); the engine in each.
            names = [n for n in args.backends if dtype == "fp32" or n.startswith("engine")]
            backends = {n: make_backend(n, pipeline, dtype, args.device, workdir) for n in names}
            first, memory = {}, {}
            for name, sampler in backends.items():
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                first[name] = timed_chain(sampler, batch, args.steps, args.device, seed=0)
                if args.device.startswith("cuda"):
                    memory[name] = torch.cuda.max_memory_allocated() / 2**20
            times = {name: [] for name in backends}
            for r in range(args.repeats):
                for name, sampler in backends.items():
                    seconds = timed_chain(sampler, batch, args.steps, args.device, seed=r + 1)
                    times[name].append(seconds * 1e3 / args.steps)
            base = statistics.median(times["reference"]) if "reference" in times else None
            for name, ms in times.items():
                median = statistics.median(ms)
                chain_s = median * args.steps / 1e3
                achieved = floor["flops"] / (median / 1e3)
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
                        "warmup_s": max(0.0, first[name] - chain_s),
                        "peak_memory_mb": memory.get(name),
                        "vs_reference": base / median if base else None,
                        "forward_gflop": floor["flops"] / 1e9,
                        "weight_mb": floor["weight_bytes"] / 2**20,
                        "achieved_gflops": achieved / 1e9,
                        "of_ceiling": achieved / ceiling,
                        "runs_ms": ms,
                    }
                )
                print(row(report["results"][-1]), flush=True)
            if save is not None:
                save(report)
    return report


HEADER = (
    "| backend | dtype | batch | ms/step (median) | min-max | chain s | images/s | warm-up s "
    "| peak MiB | vs reference | GFLOP/s (of ceiling) |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
)


def row(r: dict) -> str:
    ratio = f"{r['vs_reference']:.2f}x" if r["vs_reference"] else "-"
    memory = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
    return (
        f"| {r['backend']} | {r['dtype']} | {r['batch']} | {r['ms_per_step']:.2f} "
        f"| {r['ms_min']:.2f}-{r['ms_max']:.2f} | {r['chain_s']:.2f} | {r['images_per_s']:.2f} "
        f"| {r['warmup_s']:.2f} | {memory} | {ratio} "
        f"| {r['achieved_gflops']:.0f} ({100 * r['of_ceiling']:.0f}%) |"
    )


def markdown(report: dict) -> str:
    m = report["machine"]
    ceilings = ", ".join(f"{d} {f / 1e9:.0f} GFLOP/s" for d, f in report["ceiling_flops"].items())
    results = report["results"]
    flops = sorted({(r["batch"], r["forward_gflop"]) for r in results})
    lines = [
        f"# Sampler benchmark, {m['date']}",
        "",
        f"- machine: {m.get('gpu') or m['cpu']}, {m['cores']} cores "
        f"({m['torch_threads']} torch threads), device {m['device']}",
        f"- versions: torch {m['torch']}, triton {m['triton']}, onnxruntime {m['onnxruntime']}, "
        f"ddpm-fast {m['ddpm_fast']}, python {m['python']}",
        f"- model: {report['model']}, images {report['image_shape']}, "
        f"{report['parameters'] / 1e6:.1f}M parameters "
        f"({results[0]['weight_mb']:.0f} MiB of fp32 weights)"
        if results
        else f"- model: {report['model']}",
        "- one forward: " + ", ".join(f"batch {b}: {g:.2f} GFLOP" for b, g in flops),
        f"- ceiling (large matmul, same run): {ceilings}; GFLOP/s counts a direct "
        "convolution's FLOPs, so a library that needs fewer (Winograd, FFT) can pass 100%",
        f"- command: `{m['command']}`",
        "",
        *HEADER,
        *(row(r) for r in results),
    ]
    return "\n".join(lines) + "\n"


def plot(report_paths: list[Path], out: Path) -> None:
    """ms per step against batch size, one line per (backend, dtype), from JSON reports."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install 'ddpm-fast[plot]'") from None
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    titles = []
    for path in report_paths:
        report = json.loads(Path(path).read_text())
        m = report["machine"]
        titles.append(f"{m.get('gpu') or m['cpu']} ({m['date'][:10]})")
        for r in report["results"]:
            lines.setdefault((r["backend"], r["dtype"]), []).append((r["batch"], r["ms_per_step"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (backend, dtype), points in sorted(lines.items()):
        points.sort()
        ax.plot(*zip(*points, strict=True), marker="o", label=f"{backend} {dtype}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # 16, not 2^4
        axis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per step (median)")
    ax.set_title("; ".join(titles), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default="cifar10",
        help=f"{', '.join(MODELS)} (default-initialised), 'default' (the embedded model) or a "
        "checkpoint file (default: cifar10)",
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["reference", "engine"],
        choices=BACKENDS,
        metavar="BACKEND",
        help=f"any of {', '.join(BACKENDS)} (default: reference engine)",
    )
    parser.add_argument("--steps", type=int, default=10, help="chain steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the .md/.json")
    parser.add_argument("--name", help="file name (default: sampler-<device>-<date>)")


def main(args: argparse.Namespace) -> Path:
    """Run the benchmark of parsed ``args``; returns the markdown file's path."""
    checks = [("steps", args.steps), ("repeats", args.repeats), *(("batch", b) for b in args.batch)]
    for what, value in checks:
        if value < 1:
            raise ConfigError(f"{what} must be at least 1, got {value}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"sampler-{args.device.split(':')[0]}-{datetime.date.today()}"

    def save(report: dict) -> None:
        (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"{name}.md").write_text(markdown(report))

    print("\n".join(HEADER), flush=True)
    run(args, save)
    print(f"wrote {out / name}.md and .json")
    return out / f"{name}.md"
