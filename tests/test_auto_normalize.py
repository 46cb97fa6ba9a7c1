"""auto_normalize: how a chain's x becomes images, the same on every path (reference, engine,
ONNX's OnnxSampler), set from the API, the CLI and files, and noted by ``info`` where assumed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_fast import load
from ddpm_fast.checkpoints import save_pipeline
from ddpm_fast.cli import main
from ddpm_fast.engine import Engine
from ddpm_fast.errors import ConfigError
from ddpm_fast.images import chain_to_images
from ddpm_fast.pipeline import DiffusionConfig, Pipeline

from .export.common import make_pipeline

V2_FILE = Path(__file__).parent / "fixtures" / "dd_pytorch_v2" / "diffusion_state_dict.pt"
CHAIN = dict(sampler="ddim", steps=4, seed=5)


def with_auto_normalize(pipeline: Pipeline, value: bool) -> Pipeline:
    diffusion = dataclasses.replace(pipeline.diffusion, auto_normalize=value)
    return Pipeline(pipeline.network, diffusion, source=pipeline.source)


@pytest.fixture(scope="module")
def pipelines() -> tuple[Pipeline, Pipeline]:
    on = make_pipeline(objective="pred_noise", seed=3)
    return on, with_auto_normalize(on, False)


def test_the_mapping_on_tensors_and_arrays():
    x = torch.tensor([-1.5, -1.0, -0.25, 0.0, 0.375, 1.0, 1.25])
    assert torch.equal(chain_to_images(x), ((x + 1) / 2).clamp(0, 1))  # -1.5 and 1.25 clamped
    assert torch.equal(chain_to_images(x, auto_normalize=False), x.clamp(0, 1))
    a = x.numpy()
    on, off = chain_to_images(a), chain_to_images(a, auto_normalize=False)
    assert on.dtype == off.dtype == np.float32
    np.testing.assert_array_equal(on, np.clip((a + 1) / 2, 0, 1))
    np.testing.assert_array_equal(off, np.clip(a, 0, 1))


@pytest.mark.parametrize("backend", ["reference", "engine"])
def test_reference_and_engine_images_follow_auto_normalize(pipelines, backend):
    on, off = (Engine(p) if backend == "engine" else p for p in pipelines)
    x = on.sample(3, **CHAIN) * 2 - 1  # the chain's x, from the default mapping
    images = off.sample(3, **CHAIN)
    assert (x < 0).any() and (x > 0).any()  # the clamp has something to do
    torch.testing.assert_close(images, x.clamp(0, 1), rtol=0, atol=1e-6)


def test_the_engine_matches_the_reference_without_auto_normalize(pipelines):
    _, off = pipelines
    torch.testing.assert_close(Engine(off).sample(3, **CHAIN), off.sample(3, **CHAIN))


def test_onnx_files_carry_it_and_onnx_sampler_follows_it(pipelines, tmp_path):
    pytest.importorskip("onnxruntime")
    from ddpm_fast.export import OnnxSampler, export_onnx

    _, off = pipelines
    path = tmp_path / "off.onnx"
    export_onnx(off, path, what="step", sampler="ddim", steps=4, verify=False)
    sampler = OnnxSampler(path)
    assert sampler.info.diffusion["auto_normalize"] is False
    images = sampler.sample(3, seed=5)
    np.testing.assert_allclose(images, off.sample(3, **CHAIN).numpy(), rtol=0, atol=1e-4)
    assert images.min() >= 0 and images.max() <= 1


def test_the_config_checks_and_reads_older_dicts():
    with pytest.raises(ConfigError, match="auto_normalize must be true or false"):
        DiffusionConfig(auto_normalize="no")
    old = DiffusionConfig().to_dict()
    assert "auto_normalize" not in old  # left out at its default: as saved before the option
    assert DiffusionConfig.from_dict(old).auto_normalize is True
    off = DiffusionConfig(auto_normalize=False)
    assert DiffusionConfig.from_dict(off.to_dict()) == off


def test_a_library_file_notes_it_assumed_and_an_option_sets_it(tmp_path):
    assumed = load(V2_FILE, image_size=8)
    assert assumed.diffusion.auto_normalize is True
    assert any("auto_normalize=True assumed" in note for note in assumed.notes)
    given = load(V2_FILE, image_size=8, auto_normalize=False)
    assert given.diffusion.auto_normalize is False
    assert not any("auto_normalize" in note for note in given.notes)
    saved = load(save_pipeline(given, tmp_path / "off.safetensors"))
    assert saved.diffusion.auto_normalize is False  # ddpm-fast's own files store it
    assert load(saved.source, auto_normalize=True).diffusion.auto_normalize is True


def test_the_cli_sets_and_shows_it(capsys, tmp_path):
    assert main(["info", str(V2_FILE), "--image-size", "8"]) == 0
    out = capsys.readouterr().out
    images = "images:      (x + 1) / 2 of the chain's x, clamped to [0, 1] (auto_normalize true)"
    assert images in out
    assert "auto_normalize=True assumed" in out
    assert main(["info", str(V2_FILE), "--image-size", "8", "--no-auto-normalize"]) == 0
    out = capsys.readouterr().out
    assert "images:      x of the chain's x, clamped to [0, 1] (auto_normalize false)" in out
    assert "assumed (images" not in out
    onnx = tmp_path / "x.onnx"
    onnx.write_bytes(b"not read")
    code = main(["sample", "--onnx", str(onnx), "--no-auto-normalize", "--out", str(tmp_path)])
    assert code == 2
    assert "--auto-normalize does not apply to --onnx" in capsys.readouterr().err
