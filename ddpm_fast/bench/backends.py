"""The bench's backends: each a way to sample a whole chain, with the Pipeline's ``sample``.

"Backend" here means a bench backend (a row of the report: reference, torch.compile, the engine,
ONNX Runtime, diffusers), not the kernels' dispatch (``backend="triton"``), ``Pipeline.backend``
or torch.distributed's process-group backend. diffusers' DDPMPipeline is in ``diffusers_backend``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..engine import Engine
from ..pipeline import Pipeline
from .diffusers_backend import DiffusersBackend, FromDiffusersBackend

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
    "from_diffusers",
)


class OnnxBackend:
    """``sample`` through an exported ``step`` file and ``OnnxSampler`` (CPU provider on the
    CPU), exported once per chain length into ``workdir``."""

    def __init__(self, pipeline: Pipeline, device: str, workdir: Path):
        self.pipeline, self.device, self.workdir = pipeline, device, workdir
        self.samplers = {}

    def sample(self, num, *, batch_size, steps, seed, device, sampler="ddpm"):
        from ..export import OnnxSampler, export_onnx

        if (sampler, steps) not in self.samplers:
            path = self.workdir / f"step-{sampler}-{steps}.onnx"
            export_onnx(
                self.pipeline, path, what="step", sampler=sampler, steps=steps, verify=False
            )
            providers = ["CPUExecutionProvider"] if device == "cpu" else None
            self.samplers[sampler, steps] = OnnxSampler(path, providers=providers)
        return self.samplers[sampler, steps].sample(num, batch_size=batch_size, seed=seed)


# The backends that run classifier guidance (``--classifier``: NAME+guided rows).
GUIDED = ("reference", "engine", "engine-eager", "engine-torch")
GUIDED_SUFFIX = "+guided"


class Guided:
    """A backend's ``sample`` with a classifier guiding every step (scale 1)."""

    def __init__(self, sampler, classifier):
        self.sampler, self.classifier = sampler, classifier

    def sample(self, num, **options):
        return self.sampler.sample(num, classifier=self.classifier, classifier_scale=1.0, **options)


def make_backend(
    name: str,
    pipeline: Pipeline,
    dtype: str,
    device: str,
    workdir: Path,
    threads: int | None = None,
    classifier=None,
):
    """An object with the Pipeline's ``sample`` for the backend ``name`` (``NAME+guided``:
    that backend guided by ``classifier``)."""
    if name.endswith(GUIDED_SUFFIX):
        base = make_backend(name.removesuffix(GUIDED_SUFFIX), pipeline, dtype, device, workdir,
                            threads)  # fmt: skip
        return Guided(base, classifier)
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
    if name == "from_diffusers":
        return FromDiffusersBackend(pipeline, device, dtype, threads)
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")


def thread_plan(sampler, batch: int, pipeline: Pipeline) -> str:
    """How a CPU backend used the cores."""
    if isinstance(sampler, Guided):
        sampler = sampler.sampler
    if isinstance(sampler, FromDiffusersBackend):
        sampler = sampler.fast.pipeline  # its engine
    if isinstance(sampler, Engine):
        plan = sampler.thread_plan((batch, *pipeline.image_shape())).describe()
        return f"{sampler.executor()[0]}: {plan}"
    if isinstance(sampler, OnnxBackend):
        return "ONNX Runtime's own thread pool (its defaults)"
    return f"{torch.get_num_threads()} PyTorch threads"
