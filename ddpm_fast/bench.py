"""The sampler benchmark behind ``ddpm-fast bench`` and ``benchmarks/sampler.py``: whole sampling
chains, every backend side by side in one process, with the machine's ceiling beside them.

Each measurement samples ``batch`` images with a ``steps``-step DDPM chain through the backend's
``sample`` (noise, the update and the copy back included). A cell is one (batch, dtype, backend):
its first call is the warm-up (engine preparation, graph capture, compilation, ONNX session) and is
reported apart, then ``repeats`` calls are timed. Cells run one after another, batch by batch, the
engine first, then the reference, then the other backends (``cells``), and the report is saved after
every cell, so a run cut short keeps all it finished. Per cell: median ms per step and its spread
(min-max), the chain's time and images/s, the warm-up (first call less one chain), peak memory
(CUDA's allocations on a GPU, the process's resident set on the CPU), the ratio to the reference's
median at that batch, and the floor: FLOPs of one network forward (``torch.utils.flop_counter``,
counted on the meta device), the bytes its weights alone take to read, and the FLOP/s achieved
against a large matmul timed in the same run (the machine's practical ceiling). Every fp32 cell runs
with cuDNN's TF32 off, as the engine runs (``precision_flags``), so that all fp32 rows compute the
same thing; ``cudnn_tf32`` records it. ``--under-load N`` times every cell again with N busy
processes beside it (``BusyProcesses``), and the report adds the loaded/quiet ratios; on the CPU it
also says how each backend used the cores. A report never overwrites an earlier one of the same day
(``unused_name``).

Models (``MODELS``; random weights, seeded: time does not depend on them): the seed's CIFAR-10
U-Net (denoising-diffusion-pytorch 1.x, dim 64, dim_mults 1, 2, 4, 8: 35.7M parameters) at 32 x 32,
64 x 64 and 128 x 128; ``ddpm-cifar10``, the DDPM paper's CIFAR-10 network as diffusers' UNet2DModel
(google/ddpm-cifar10-32's config and scheduler, 35.7M parameters); ``dd2-cifar10``, a
denoising-diffusion-pytorch 2.x Unet of the same widths; or a checkpoint. ``--backends diffusers``
runs diffusers' own DDPMPipeline on a diffusers-unet2d model (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from . import load
from .engine import DTYPES, Engine
from .errors import ConfigError
from .flops import forward_flops
from .machine import cpu_model
from .models import dd_pytorch_v1, dd_pytorch_v2, diffusers_unet2d
from .options import SAMPLERS
from .pipeline import DiffusionConfig, Pipeline
from .version import __version__

# google/ddpm-cifar10-32 (the DDPM paper's CIFAR-10 model as diffusers converted it): its unet's
# config.json and its scheduler_config.json, less bookkeeping fields.
DDPM_CIFAR10_UNET = {
    "_class_name": "UNet2DModel",
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "time_embedding_type": "positional",
}
DDPM_CIFAR10_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}


def _dd1_cifar10(size: int) -> Pipeline:
    network = dd_pytorch_v1.Unet(dd_pytorch_v1.UnetConfig(dim=64, dim_mults=(1, 2, 4, 8)))
    return Pipeline(network, DiffusionConfig(image_size=size), source=f"cifar10 ({size} px)")


def _ddpm_cifar10() -> Pipeline:
    from .diffusers_folder import schedule_from_scheduler

    config = diffusers_unet2d.UnetConfig.from_diffusers(DDPM_CIFAR10_UNET)
    diffusion, _ = schedule_from_scheduler("ddpm-cifar10", DDPM_CIFAR10_SCHEDULER)
    diffusion = dataclasses.replace(diffusion, image_size=DDPM_CIFAR10_UNET["sample_size"])
    source = "ddpm-cifar10 (google/ddpm-cifar10-32's architecture, random weights)"
    return Pipeline(diffusers_unet2d.Unet(config), diffusion, source=source)


def _dd2_cifar10() -> Pipeline:
    # Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=False): full attention at the last stage
    # (2.x's default); GaussianDiffusion's defaults (sigmoid schedule, pred_v) at 32 px.
    network = dd_pytorch_v2.Unet(dd_pytorch_v2.UnetConfig(dim=64, dim_mults=(1, 2, 4, 8)))
    return Pipeline(network, DiffusionConfig(image_size=32), source="dd2-cifar10 (32 px)")


# name -> (what it is, its pipeline). Weights are random (seed 0): time does not depend on them.
MODELS = {
    "cifar10": ("the seed's 1.x CIFAR-10 U-Net, 32 px", lambda: _dd1_cifar10(32)),
    "cifar10-64": ("the same at 64 px", lambda: _dd1_cifar10(64)),
    "cifar10-128": ("the same at 128 px", lambda: _dd1_cifar10(128)),
    "ddpm-cifar10": ("google/ddpm-cifar10-32's UNet2DModel and scheduler", _ddpm_cifar10),
    "dd2-cifar10": ("a denoising-diffusion-pytorch 2.x Unet, dim 64, 32 px", _dd2_cifar10),
}
BACKENDS = (
    "reference",
    "compile",
    "compile-reduce-overhead",
    "compile-max-autotune",
    "engine",
    "engine-eager",
    "engine-torch",
    "onnxruntime",
    "diffusers",
)


def model_pipeline(model: str) -> Pipeline:
    """A named configuration of ``MODELS`` (random weights, seed 0, the same every call),
    "default" (the embedded model) or a checkpoint path."""
    if model == "default":
        return load()
    if model in MODELS:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return MODELS[model][1]()
    return load(model)


class OnnxBackend:
    """``sample`` through an exported ``step`` file and ``OnnxSampler`` (CPU provider on the
    CPU), exported once per chain length into ``workdir``."""

    def __init__(self, pipeline: Pipeline, device: str, workdir: Path):
        self.pipeline, self.device, self.workdir = pipeline, device, workdir
        self.samplers = {}

    def sample(self, num, *, batch_size, steps, seed, device, sampler="ddpm"):
        from .export import OnnxSampler, export_onnx

        if (sampler, steps) not in self.samplers:
            path = self.workdir / f"step-{sampler}-{steps}.onnx"
            export_onnx(
                self.pipeline, path, what="step", sampler=sampler, steps=steps, verify=False
            )
            providers = ["CPUExecutionProvider"] if device == "cpu" else None
            self.samplers[sampler, steps] = OnnxSampler(path, providers=providers)
        return self.samplers[sampler, steps].sample(num, batch_size=batch_size, seed=seed)


class DiffusersBackend:
    """``sample`` through diffusers' own DDPMPipeline (its ``unet`` + ``scheduler.step`` loop):
    its UNet2DModel built from the network's config holding the same weights, its DDPMScheduler
    from the same schedule, objective and variance, fp32. Only diffusers-unet2d models."""

    def __init__(self, pipeline: Pipeline, device: str):
        diffusers = import_diffusers()
        check_diffusers_model(pipeline)
        unet = diffusers.UNet2DModel(**diffusers_unet_config(pipeline))
        unet.load_state_dict(pipeline.network.state_dict(), strict=True)
        scheduler = diffusers.DDPMScheduler(**ddpm_scheduler_config(pipeline.diffusion))
        self.pipeline = diffusers.DDPMPipeline(unet=unet.eval(), scheduler=scheduler)
        self.pipeline.to(device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.device = device

    def sample(self, num, *, batch_size, steps, seed, device, sampler="ddpm"):
        if sampler != "ddpm":
            raise ConfigError(
                f"the diffusers backend runs DDPMPipeline: --sampler ddpm, not {sampler}"
            )
        if batch_size != num:
            raise ConfigError("the diffusers backend samples one batch (batch_size = num)")
        generator = torch.Generator(device).manual_seed(seed)
        return self.pipeline(
            batch_size=num, generator=generator, num_inference_steps=steps, output_type="pt"
        ).images


def import_diffusers():
    """The diffusers module, or one ConfigError naming the extra that installs it."""
    try:
        import diffusers
    except ImportError:
        raise ConfigError(
            "the diffusers backend needs diffusers: pip install 'ddpm-fast[bench]'"
        ) from None
    return diffusers


def check_diffusers_model(pipeline: Pipeline) -> None:
    if pipeline.config.family != diffusers_unet2d.FAMILY:
        raise ConfigError(
            f"the diffusers backend runs {diffusers_unet2d.FAMILY} models (ddpm-cifar10, a "
            f"diffusers folder), not {pipeline.config.family}"
        )


def diffusers_unet_config(pipeline: Pipeline) -> dict:
    """UNet2DModel's constructor arguments for the network (its config fields are diffusers')."""
    config = pipeline.config.to_dict()
    for derived in ("family", "channels", "self_condition"):
        config.pop(derived)
    return {**config, "sample_size": pipeline.image_shape()[-1]}


def ddpm_scheduler_config(diffusion: DiffusionConfig) -> dict:
    """DDPMScheduler's arguments for ``diffusion``: the inverse of the folder reader's mapping
    (``ddpm_fast.diffusers_folder``); a ConfigError for a schedule diffusers does not have."""
    from .diffusers_folder import BETA_SCHEDULES, PREDICTIONS

    schedule = diffusion.schedule
    config = {
        "num_train_timesteps": schedule.timesteps,
        "prediction_type": {v: k for k, v in PREDICTIONS.items()}[diffusion.objective],
        "variance_type": diffusion.variance,  # fixed_small, fixed_large, learned_range alike
        "clip_sample": True,
    }
    names = {v: k for k, v in BETA_SCHEDULES.items()}
    if schedule.name == "trained":
        return {**config, "trained_betas": list(schedule.kwargs["betas"])}
    if schedule.name not in names:
        raise ConfigError(
            f"the diffusers backend needs a diffusers beta schedule ({', '.join(names)}), "
            f"not {schedule.name}"
        )
    return {**config, "beta_schedule": names[schedule.name], **schedule.kwargs}


def make_backend(
    name: str,
    pipeline: Pipeline,
    dtype: str,
    device: str,
    workdir: Path,
    threads: int | None = None,
):
    """An object with the Pipeline's ``sample`` for the backend ``name``."""
    if name == "reference":
        return pipeline
    if name.startswith("compile"):
        mode = name.removeprefix("compile").removeprefix("-") or None
        return Pipeline(torch.compile(pipeline.network, mode=mode), pipeline.diffusion)
    if name.startswith("engine"):
        graphs = False if name == "engine-eager" else None
        executor = "torch" if name == "engine-torch" else None
        return Engine(
            pipeline, dtype=dtype, cuda_graph=graphs, threads=threads, cpu_executor=executor
        )
    if name == "onnxruntime":
        return OnnxBackend(pipeline, device, workdir)
    if name == "diffusers":
        return DiffusersBackend(pipeline, device)
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")


class BusyProcesses:
    """``count`` processes that spin a core each (Python busy loops), for as long as the block
    runs: the load of other work sharing the machine."""

    def __init__(self, count: int):
        self.count = count
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> BusyProcesses:
        for _ in range(self.count):
            self.processes.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        time.sleep(0.5)  # running before the first timed call
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()


class PeakResident:
    """The peak resident memory of this process while the block runs, in MiB, sampled every
    ``interval`` seconds from /proc/self/statm (the process's lifetime peak, ru_maxrss, cannot
    tell one cell from the next). None where /proc is missing."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak: float | None = None
        self._stop = threading.Event()

    @staticmethod
    def _resident() -> float | None:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return pages * resource.getpagesize() / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = self._resident()
            if now is not None:
                self.peak = max(self.peak or 0.0, now)

    def __enter__(self) -> PeakResident:
        self.peak = self._resident()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        now = self._resident()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_chain(
    sampler, batch: int, steps: int, device: str, seed: int, kind: str = "ddpm"
) -> float:
    """Seconds to sample ``batch`` images with a ``steps``-step chain of sampler ``kind``."""
    _synchronize(device)
    start = time.perf_counter()
    sampler.sample(batch, batch_size=batch, steps=steps, seed=seed, device=device, sampler=kind)
    _synchronize(device)
    return time.perf_counter() - start


def network_floor(pipeline: Pipeline, batch: int) -> dict:
    """FLOPs of one forward at this batch, and the bytes of its weights (a lower bound on the
    bytes a forward moves: every weight is read at least once)."""
    network = pipeline.network
    weight_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
    flops = forward_flops(network, pipeline.image_shape(), batch)
    return {"flops": flops, "weight_bytes": weight_bytes}


def precision_flags(dtype: str):
    """The numerics every backend runs under in ``dtype``: in fp32, cuDNN's TF32 is off (the
    engine switches it off for itself; the reference and torch.compile must compute the same
    thing, or the engine is compared with a cheaper computation). Other dtypes keep PyTorch's."""
    if dtype != "fp32":
        return contextlib.nullcontext()
    return torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled,
        benchmark=torch.backends.cudnn.benchmark,
        deterministic=torch.backends.cudnn.deterministic,
        allow_tf32=False,
    )


def matmul_ceiling(device: str, dtype: torch.dtype, size: int | None = None) -> float:
    """FLOP/s of a large square matmul, the best of a few after a warm-up: what this machine
    sustains on dense math. (A convolution can beat it where its library does fewer FLOPs than
    the direct method the counter counts, e.g. Winograd.)"""
    if size is None:  # a few seconds at most on a CPU (one without bf16 matrix units included)
        size = 8192 if device.startswith("cuda") else 2048 if dtype == torch.float32 else 1024
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
        "cpu": cpu_model(),
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
    try:  # read from its metadata: importing diffusers takes seconds
        info["diffusers"] = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        info["diffusers"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


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
    if "diffusers" in args.backends:  # before any cell: a long run does not end in this error
        import_diffusers()
        check_diffusers_model(pipeline)
        ddpm_scheduler_config(pipeline.diffusion)
        if args.sampler != "ddpm":
            raise ConfigError("the diffusers backend runs DDPMPipeline: --sampler ddpm only")
    with tempfile.TemporaryDirectory(prefix="ddpm-fast-bench-") as workdir:
        return _run(args, pipeline, Path(workdir), save)


def _run(args: argparse.Namespace, pipeline: Pipeline, workdir: Path, save) -> dict:
    report = {
        "machine": machine(args.device),
        "model": pipeline.source,
        "image_shape": list(pipeline.image_shape()),
        "sampler": args.sampler,
        "parameters": pipeline.num_parameters(),
        "ceiling_flops": {},
        "results": [],
    }
    floors, base = {}, {}
    for batch, dtype, name in cells(args):
        if dtype not in report["ceiling_flops"]:
            report["ceiling_flops"][dtype] = matmul_ceiling(args.device, DTYPES[dtype])
        ceiling = report["ceiling_flops"][dtype]
        if batch not in floors:
            floors[batch] = network_floor(pipeline, batch)
        floor = floors[batch]
        with precision_flags(dtype):
            sampler = make_backend(name, pipeline, dtype, args.device, workdir, args.threads)
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
        if name == "reference":  # the ratio of the cells measured before it, at this batch
            base[batch] = median
            for r in report["results"]:
                if r["batch"] == batch:
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
                "vs_reference": base[batch] / median if batch in base else None,
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


HEADER = (
    "| backend | dtype | batch | ms/step (median) | min-max | chain s | images/s | warm-up s "
    "| peak MiB | vs reference | GFLOP/s (of ceiling) |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
)


def timed_chains(sampler, batch: int, args: argparse.Namespace) -> list[float]:
    """ms per step of ``args.repeats`` chains (seeds 1, 2, ...)."""
    return [
        timed_chain(sampler, batch, args.steps, args.device, r + 1, args.sampler) * 1e3 / args.steps
        for r in range(args.repeats)
    ]


def thread_plan(sampler, batch: int, pipeline: Pipeline) -> str:
    """How a CPU backend used the cores."""
    if isinstance(sampler, Engine):
        plan = sampler.thread_plan((batch, *pipeline.image_shape())).describe()
        return f"{sampler.executor()[0]}: {plan}"
    if isinstance(sampler, OnnxBackend):
        return "ONNX Runtime's own thread pool (its defaults)"
    return f"{torch.get_num_threads()} PyTorch threads"


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
        f"ddpm-fast {m['ddpm_fast']}, python {m['python']}"
        + (f", diffusers {m['diffusers']}" if m.get("diffusers") else ""),
        f"- model: {report['model']}, images {report['image_shape']}, "
        f"{report['parameters'] / 1e6:.1f}M parameters "
        f"({results[0]['weight_mb']:.0f} MiB of fp32 weights)"
        if results
        else f"- model: {report['model']}",
        "- one forward: " + ", ".join(f"batch {b}: {g:.2f} GFLOP" for b, g in flops),
        f"- ceiling (large matmul, same run): {ceilings}; GFLOP/s counts a direct "
        "convolution's FLOPs, so a library that needs fewer (Winograd, FFT) can pass 100%",
        "- fp32 rows: cuDNN TF32 off for every backend (the engine's fp32); sampler "
        f"{report.get('sampler', 'ddpm')}, steps per chain: "
        + ", ".join(sorted({str(r["steps"]) for r in results})),
        f"- command: `{m['command']}`",
        "",
        *HEADER,
        *(row(r) for r in results),
    ]
    threads = sorted(
        {(r["backend"], r["batch"], r["threads"]) for r in results if r.get("threads")}
    )
    if threads:
        lines += ["", "CPU threads:", ""]
        lines += [f"- {backend}, batch {batch}: {plan}" for backend, batch, plan in threads]
    loaded = [r for r in results if r.get("loaded_ms_per_step")]
    if loaded:
        busy = loaded[0]["busy_processes"]
        lines += [
            "",
            f"Under load: the same cells with {busy} busy process{'es' if busy > 1 else ''} "
            "(a Python loop spinning a core each) started beside them:",
            "",
            f"| backend | dtype | batch | quiet ms/step | with {busy} busy, ms/step "
            "| loaded/quiet |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['backend']} | {r['dtype']} | {r['batch']} | {r['ms_per_step']:.2f} "
            f"| {r['loaded_ms_per_step']:.2f} | {r['loaded_ms_per_step'] / r['ms_per_step']:.2f}x |"
            for r in loaded
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
        "diffusers' own DDPMPipeline on a diffusers-unet2d model (pip install "
        "'ddpm-fast[bench]')",
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


def unused_name(folder: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ...: the first with no .md or .json in ``folder``,
    so that a second run of the day keeps the first's results."""
    candidate, n = name, 1
    while any((folder / f"{candidate}{suffix}").exists() for suffix in (".md", ".json")):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


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
    name = unused_name(
        out, args.name or f"sampler-{args.device.split(':')[0]}-{datetime.date.today()}"
    )

    def save(report: dict) -> None:  # written aside, then renamed: a Ctrl-C leaves no half file
        for suffix, text in (
            (".json", json.dumps(report, indent=1) + "\n"),
            (".md", markdown(report)),
        ):
            part = out / f"{name}{suffix}.part"
            part.write_text(text)
            part.replace(out / f"{name}{suffix}")

    print("\n".join(HEADER), flush=True)
    run(args, save)
    print(f"wrote {out / name}.md and .json")
    return out / f"{name}.md"
