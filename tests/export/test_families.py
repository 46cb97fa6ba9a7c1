"""ONNX for every registered family, written once: the unet and step files verified against
the reference, and OnnxSampler's chain against the reference sampler."""

import numpy as np
import pytest

from ddpm_fast.export import OnnxSampler, export_onnx

from ..families import CASES, POSITIVE_TIMES, random_pipeline

CHAIN = dict(sampler="ddim", steps=4)  # timesteps 99, 74, 49, 24 of 100


def whats(name: str) -> list[str]:
    # A unet file is verified at t = 0 too, where Fourier features (log t) are NaN, in diffusers
    # as here; its step files only visit the chain's timesteps.
    return ["step"] if name in POSITIVE_TIMES else ["unet", "step"]


@pytest.mark.parametrize(("name", "what"), [(name, what) for name in CASES for what in whats(name)])
def test_exports_are_verified_and_sample_like_the_reference(tmp_path, name, what):
    pipeline = random_pipeline(name, objective="pred_v")
    path = tmp_path / "model.onnx"
    report = export_onnx(pipeline, path, what=what, **CHAIN).report
    assert report.ok and max(c.rel for c in report.checks) <= 1e-4, str(report)
    reference = pipeline.sample(2, seed=5, batch_size=2, **CHAIN).numpy()
    images = OnnxSampler(path).sample(2, seed=5, batch_size=1)
    assert reference.std() > 0.01
    assert np.abs(images - reference).max() <= 1e-4
