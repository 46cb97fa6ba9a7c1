"""The bench's options and its run loop: every (batch, dtype, backend) cell in order, measured,
printed as a row and saved after each, so that a run cut short keeps every cell it finished.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from ..engine import DTYPES
from ..errors import ConfigError
from ..pipeline import Pipeline
from ..samplers import SAMPLERS
from .backends import BACKENDS, GUIDED, GUIDED_SUFFIX, make_backend, thread_plan
from .diffusers_backend import check_diffusers_model, ddpm_scheduler_config, import_diffusers
from .measure import (
    BusyProcesses,
    PeakResident,
    network_floor,
    precision_flags,
    timed_chain,
    torch_matmul_ceiling,
)
from .models import MODELS, model_classifier, model_pipeline
from .report import HEADER, machine, results_name, row, write_report


def cells(args: argparse.Namespace) -> list[tuple[int, str, str]]:
    """(batch, dtype, backend) in the order they are measured: batch by batch in the order
    given; in each, the engine's backends in each dtype in the order given, then the reference,
    then the other backends. The reference and what compiles it run in fp32 (the network's
    dtype). So ``--batch 1 64 --dtype bf16 fp32`` measures the headline (the engine in bf16 at
    batch 1) first, and a run cut short loses the slow baselines before the engine."""
    order = []
    for batch in args.batch:
        for dtype in args.dtype:
            order += [(batch, dtype, n) for n in args.backends if n.startswith("engine")]
        if "reference" in args.backends:
            order.append((batch, "fp32", "reference"))
        others = [n for n in args.backends if n != "reference" and not n.startswith("engine")]
        if "fp32" in args.dtype:
            order += [(batch, "fp32", n) for n in others]
    return order


def run(args: argparse.Namespace, save=None) -> dict:
    """Measure every (batch, dtype, backend) cell; ``save(report)`` after each cell, so that a
    run cut short (a time limit, Ctrl-C) keeps every cell it finished."""
    pipeline = model_pipeline(args.model)
    classifier = None
    if getattr(args, "classifier", False):  # each guided backend twice: unguided, then guided
        classifier = model_classifier(args.model)
        if not set(args.backends) & set(GUIDED):
            raise ConfigError(f"--classifier guides the {', '.join(GUIDED)} backends only")
        if args.sampler not in ("ddpm", "ddim"):
            raise ConfigError("--classifier: classifier guidance runs with ddpm and ddim")
        args.backends = [b for n in args.backends
                         for b in ((n, n + GUIDED_SUFFIX) if n in GUIDED else (n,))]  # fmt: skip
    # before any cell: a long run does not end in this error
    if {"diffusers", "from_diffusers"} & set(args.backends):
        import_diffusers()
        check_diffusers_model(pipeline)
        ddpm_scheduler_config(pipeline.diffusion)
        if args.sampler != "ddpm":
            raise ConfigError("the diffusers backends run DDPMPipeline: --sampler ddpm only")
    with tempfile.TemporaryDirectory(prefix="ddpm-fast-bench-") as workdir:
        return _run(args, pipeline, Path(workdir), save, classifier)


def _run(args: argparse.Namespace, pipeline: Pipeline, workdir: Path, save, classifier=None):
    report = {
        "machine": machine(args.device),
        "model": pipeline.source,
        "image_shape": list(pipeline.image_shape()),
        "sampler": args.sampler,
        "parameters": pipeline.num_parameters(),
        "ceiling_flops": {},
        "results": [],
    }
    if classifier is not None:
        size = sum(p.numel() for p in classifier.network.parameters()) / 1e6
        report["classifier"] = (
            f"{classifier.source}, {size:.1f}M parameters, scale 1: the +guided rows run its "
            "forward and backward every step"
        )
    floors, base = {}, {}
    for batch, dtype, name in cells(args):
        if dtype not in report["ceiling_flops"]:
            report["ceiling_flops"][dtype] = torch_matmul_ceiling(args.device, DTYPES[dtype])
        ceiling = report["ceiling_flops"][dtype]
        if batch not in floors:
            floors[batch] = network_floor(pipeline, batch)
        floor = floors[batch]
        with precision_flags(dtype):
            sampler = make_backend(
                name, pipeline, dtype, args.device, workdir, args.threads, classifier=classifier
            )
            cpu = not args.device.startswith("cuda")
            if not cpu:
                torch.cuda.reset_peak_memory_stats()
            with PeakResident() as resident:
                first = timed_chain(sampler, batch, args.steps, args.device, 0, args.sampler)

                ms = timed_chains(sampler, batch, args)
            memory = resident.peak if cpu else torch.cuda.max_memory_allocated() / 2**20
            loaded = None
            if args.under_load:
                with BusyProcesses(args.under_load):
                    loaded = timed_chains(sampler, batch, args)
            tf32 = torch.backends.cudnn.allow_tf32
            threads = thread_plan(sampler, batch, pipeline) if cpu else None
        del sampler  # a compiled network's graphs and an engine's buffers go before the next
        median = statistics.median(ms)
        # Guided rows are set against the guided reference, unguided ones against the reference.
        group = (batch, name.endswith(GUIDED_SUFFIX))
        if name.removesuffix(GUIDED_SUFFIX) == "reference":  # the cells measured before it
            base[group] = median
            for r in report["results"]:
                if (r["batch"], r["backend"].endswith(GUIDED_SUFFIX)) == group:
                    r["vs_reference"] = median / r["ms_per_step"]
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
                "first_call_s": first,
                "warmup_s": max(0.0, first - chain_s),
                "peak_memory_mb": memory,
                "vs_reference": base[group] / median if group in base else None,
                "cudnn_tf32": tf32,
                "forward_gflop": floor["flops"] / 1e9,
                "weight_mb": floor["weight_bytes"] / 2**20,
                "achieved_gflops": achieved / 1e9,
                "of_ceiling": achieved / ceiling,
                "runs_ms": ms,
                "threads": threads,
                "busy_processes": args.under_load,
                "loaded_ms_per_step": statistics.median(loaded) if loaded else None,
                "loaded_runs_ms": loaded,
            }
        )
        print(row(report["results"][-1]), flush=True)
        if save is not None:
            save(report)
    return report


def timed_chains(sampler, batch: int, args: argparse.Namespace) -> list[float]:
    """ms per step of ``args.repeats`` chains (seeds 1, 2, ...)."""
    return [
        timed_chain(sampler, batch, args.steps, args.device, r + 1, args.sampler) * 1e3 / args.steps
        for r in range(args.repeats)
    ]


class _WholeNames(argparse.HelpFormatter):
    """Help lines wrapped between words only: a model name such as adm-cifar10 stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options on ``parser`` (``ddpm-fast bench`` and benchmarks/sampler.py)."""
    parser.formatter_class = _WholeNames
    parser.add_argument(
        "model",
        nargs="?",
        default="cifar10",
        help="; ".join(f"{name}: {what}" for name, (what, _) in MODELS.items())
        + " (random weights, seed 0); 'default' (the embedded model) or a checkpoint file or "
        "folder (default: cifar10)",
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["reference", "engine"],
        choices=BACKENDS,
        metavar="BACKEND",
        help=f"any of {', '.join(BACKENDS)} (default: reference engine); diffusers: "
        "diffusers' own DDPMPipeline on a diffusers-unet2d model, from_diffusers: ddpm-fast's "
        "drop-in around that pipeline object (pip install 'ddpm-fast[bench]')",
    )
    parser.add_argument("--steps", type=int, default=10, help="chain steps per measurement")
    parser.add_argument(
        "--sampler", choices=SAMPLERS, default="ddpm", help="the chain's sampler (default: ddpm)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the .md/.json")
    parser.add_argument(
        "--name",
        help="file name (default: sampler-<device>-<date>, then -2, -3, ...: never overwritten)",
    )
    parser.add_argument(
        "--under-load",
        type=int,
        default=0,
        metavar="N",
        help="also time every cell with N busy processes beside it (one spinning core each)",
    )
    parser.add_argument("--threads", type=int, help="the engine's CPU threads (default: its plan)")
    parser.add_argument(
        "--classifier",
        action="store_true",
        help="classifier guidance: the reference and engine backends also guided by the model's "
        "random-weight guided-diffusion classifier (adm-imagenet64, adm-256), scale 1 (rows "
        "NAME+guided, set against the guided reference)",
    )


def main(args: argparse.Namespace) -> Path:
    """Run the benchmark of parsed ``args``; returns the markdown file's path."""
    checks = [("steps", args.steps), ("repeats", args.repeats), *(("batch", b) for b in args.batch)]
    checks += [("threads", args.threads)] if args.threads is not None else []
    for what, value in checks:
        if value < 1:
            raise ConfigError(f"{what} must be at least 1, got {value}")
    if args.under_load < 0:
        raise ConfigError(f"--under-load must be at least 0, got {args.under_load}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = results_name(out, args.name, args.device)
    print("\n".join(HEADER), flush=True)
    run(args, lambda report: write_report(out, name, report))
    print(f"wrote {out / name}.md and .json")
    return out / f"{name}.md"
