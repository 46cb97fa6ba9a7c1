"""The output contract: images in [0, 1] from every path (the reference, the engine on its CPU
executors, OnnxSampler on an exported step, the CLI's warm start), for every sampler and both
``auto_normalize`` settings, on a network whose chain leaves [-1, 1]; and every path gives the
reference's images. ``images.chain_to_images`` decides it for all of them."""

from __future__ import annotations

import dataclasses
from functools import cache

import numpy as np
import pytest
import torch

from ddpm_fast.engine import Engine
from ddpm_fast.pipeline import Pipeline
from ddpm_fast.samplers import SAMPLERS, step_tables

from .export.common import make_pipeline

pytest.importorskip("onnxruntime")

NUM, STEPS, SEED = 3, 4, 7
PATHS = ("engine-torch", "engine-onnxruntime", "onnx-sampler", "warm-start")


@cache
def pipeline(auto_normalize: bool, clip_x0: bool = False) -> Pipeline:
    """A random v-prediction network: unclipped, its chains end well outside [-1, 1]."""
    base = make_pipeline(objective="pred_v", seed=3)
    diffusion = dataclasses.replace(base.diffusion, clip_x0=clip_x0, auto_normalize=auto_normalize)
    return Pipeline(base.network, diffusion, source=f"{base.source}, unclipped")


@cache
def reference(sampler: str, auto_normalize: bool) -> torch.Tensor:
    return pipeline(auto_normalize).sample(NUM, sampler=sampler, steps=STEPS, seed=SEED)


@cache
def engine(auto_normalize: bool, executor: str) -> Engine:
    return Engine(pipeline(auto_normalize), cpu_executor=executor)


def in_range(images) -> None:
    images = torch.as_tensor(images)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1, (float(images.min()), float(images.max()))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_unclamped_chain_leaves_the_range(sampler):
    p = pipeline(True)
    spec = p.sampler_spec(sampler, STEPS)
    indices = range(NUM)
    x = p._initial_noise(SEED, indices, p.image_shape(), torch.device("cpu"))
    tables = step_tables(p.schedule, spec)
    with torch.no_grad():
        x = p._run_chain(x, tables, spec, seed=SEED, indices=indices, on_step=lambda k: None)
    outside = (x.abs() > 1).float().mean()
    assert outside > 0.05  # the clamp has work on either mapping ...
    assert (x < -1).any() and (x > 1).any()
    assert outside < 0.5  # ... and most pixels are compared unclamped


@pytest.mark.parametrize("auto_normalize", [True, False])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_reference_gives_images_in_range(sampler, auto_normalize):
    images = reference(sampler, auto_normalize)
    in_range(images)
    inside = ((images > 0) & (images < 1)).float().mean()
    assert inside > 0.3  # not saturated (x itself, clamped: its negative half is 0): the
    # comparisons below see real values


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("auto_normalize", [True, False])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_path_gives_the_references_images(sampler, auto_normalize, path, tmp_path):
    expected = reference(sampler, auto_normalize)
    chain = dict(sampler=sampler, steps=STEPS, seed=SEED)
    if path.startswith("engine-"):
        run = engine(auto_normalize, path.removeprefix("engine-"))
        images = run.sample(NUM, **chain)
    elif path == "onnx-sampler":
        from ddpm_fast.export import OnnxSampler, export_onnx

        file = tmp_path / "step.onnx"
        export_onnx(
            pipeline(auto_normalize), file, what="step", sampler=sampler, steps=STEPS, verify=False
        )
        images = OnnxSampler(file).sample(NUM, seed=SEED)
    else:
        from ddpm_fast.warm_start import WarmStart, record

        run = engine(auto_normalize, "onnxruntime")
        run.sample(NUM, **chain)  # the chain ran on ONNX Runtime: there is a step file to record
        spec = run.sampler_spec(sampler, STEPS)
        key = f"output-range-{sampler}-{auto_normalize}"
        record(key, run, spec, run.run_identity(spec, torch.device("cpu")))
        warm = WarmStart.find(key)
        assert warm is not None
        images = np.concatenate([i for _, i in warm.batches(NUM, 0, SEED, NUM, None)])
    in_range(images)
    torch.testing.assert_close(torch.as_tensor(images), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_clipped_chains_give_images_in_range_too(sampler):
    p = pipeline(True, clip_x0=True)
    images = p.sample(NUM, sampler=sampler, steps=STEPS, seed=SEED)
    in_range(images)
    torch.testing.assert_close(Engine(p, cpu_executor="torch").sample(
        NUM, sampler=sampler, steps=STEPS, seed=SEED), images, rtol=0, atol=1e-4)  # fmt: skip
