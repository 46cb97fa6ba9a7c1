"""A diffusers folder's own chain (its timestep spacing with steps_offset, its clipping, DDIM's
eps from the unclipped x0) through ONNX: exported, verified again from the file, and sampled by
OnnxSampler like the reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast.export import OnnxSampler, export_onnx, verify_onnx

FIXTURES = Path(__file__).parents[1] / "fixtures" / "diffusers"


def leading_offset_folder(tmp_path: Path, **changes) -> Path:
    """ddpm_cifar10_small with leading spacing and steps_offset 1 (the google/ddpm-* configs')."""
    folder = Path(shutil.copytree(FIXTURES / "ddpm_cifar10_small", tmp_path / "folder"))
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(timestep_spacing="leading", steps_offset=1, **changes)
    config_file.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("what", "chain", "changes"),
    [
        ("step", dict(steps=10), dict(variance_type="fixed_small")),  # the folder's DDPM
        ("unet", dict(sampler="ddim", steps=10, eta=0.5), dict(clip_sample_range=0.8)),
    ],
)
def test_a_folders_chain_exports_verifies_and_samples(tmp_path, what, chain, changes):
    pipeline = ddpm_fast.load(leading_offset_folder(tmp_path, **changes))
    spec = pipeline.sampler_spec(chain.get("sampler"), chain["steps"], chain.get("eta", 0.0))
    assert (spec.timestep_spacing, spec.steps_offset, spec.eps_from_clipped_x0) == (
        "leading", 1, False,
    )  # fmt: skip
    path = tmp_path / "model.onnx"
    report = export_onnx(pipeline, path, what=what, **chain).report
    assert report.ok, str(report)
    again = verify_onnx(path, pipeline)  # the spec rebuilt from the file's metadata
    assert again.ok and max(c.rel for c in again.checks) <= 1e-4, str(again)
    reference = pipeline.sample(2, seed=3, batch_size=2, **chain).numpy()
    images = OnnxSampler(path).sample(2, seed=3, batch_size=2)
    assert reference.std() > 0.01
    assert np.abs(images - reference).max() <= 1e-4


@pytest.mark.parametrize(
    ("name", "what"), [("ddim-linspace-eta0.5-10", "step"), ("dpm++2m-10", "step"),
                       ("ddpm-leading-offset1-10", "unet"),
                       ("ddim-zero-snr-trailing-vpred-10", "unet")],
)  # fmt: skip
def test_a_spaced_chain_through_onnx_is_diffusers(tmp_path, name, what):
    """The exported file (a step file: the traced rule; a unet file: OnnxSampler's NumPy rule),
    step by step with the fixture's noise, within 1e-4 of diffusers' loop."""
    from ..test_diffusers_unet2d import assert_diffusers_final, spaced_chain

    pipeline, spec, _, noise_fn, fixture = spaced_chain(tmp_path, name, image_size=8)
    path = tmp_path / "model.onnx"
    chain = dict(sampler=spec.kind, steps=spec.steps, eta=spec.eta)
    export_onnx(pipeline, path, what=what, verify=False, **chain)
    sampler = OnnxSampler(path)
    x = fixture["x_T"].numpy().copy()
    x0 = None
    for k in range(spec.steps):
        noise = noise_fn(k + 1, x.shape).numpy() if sampler.info.adds_noise(k) else None
        history = x0 if sampler.info.carries_x0_prev else None
        x, x0 = sampler.step(x, k, noise, x0_prev=history)
    assert_diffusers_final(torch.from_numpy(x), fixture["final"])
