"""pytest-benchmark of one denoising step (network + update) of the seed's CIFAR-10 U-Net at
32 x 32: the reference path against the engine, at batch 1 and 16, on the CPU and (where there
is one) the GPU. Save a baseline and compare later runs against it:

    python -m pytest benchmarks/test_step.py --benchmark-save=baseline
    python -m pytest benchmarks/test_step.py --benchmark-compare --benchmark-compare-fail=median:10%
"""

from __future__ import annotations

import pytest
import torch

from ddpm_fast.bench import model_pipeline
from ddpm_fast.engine import Engine
from ddpm_fast.engine.engine import ChainState
from ddpm_fast.noise import keyed_noise
from ddpm_fast.samplers import denoise_step, step_tables

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
STEPS = 1000


@pytest.fixture(scope="module")
def pipeline():
    return model_pipeline("cifar10")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 16])
def test_reference_step(benchmark, pipeline, batch, device):
    spec = pipeline.sampler_spec("ddpm", STEPS)
    tables = step_tables(pipeline.schedule, spec)
    network = pipeline.network.to(device)
    x = keyed_noise(0, range(batch), 0, pipeline.image_shape(), device=device)
    z = keyed_noise(0, range(batch), 1, pipeline.image_shape(), device=device)
    t = torch.full((batch,), int(tables.timesteps[0]), device=device)
    benchmark.extra_info.update(backend="reference", batch=batch, device=device)

    @torch.no_grad()
    def step():
        out = network(x, t)
        denoise_step(out, x, tables, 0, spec, pipeline.diffusion.objective, z)
        _sync(device)

    benchmark(step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 16])
def test_engine_step(benchmark, pipeline, batch, device):
    """The engine's eager step (on CUDA, the graph replays this same step)."""
    engine = Engine(pipeline, cuda_graph=False)
    spec = engine.sampler_spec("ddpm", STEPS)
    chain = engine.prepare(step_tables(engine.schedule, spec), spec, device)
    shape = (batch, *engine.image_shape())
    state = ChainState.empty(shape, torch.device(device))
    x = keyed_noise(0, range(batch), 0, shape[1:], device=device)
    state.reset(x, torch.zeros(batch, dtype=torch.int64, device=device))
    z = None if device == "cuda" else keyed_noise(0, range(batch), 1, shape[1:])
    benchmark.extra_info.update(backend="engine", batch=batch, device=device)

    @torch.no_grad()
    def step():
        state.step.zero_()
        chain.step(state, z)
        _sync(device)

    benchmark(step)
