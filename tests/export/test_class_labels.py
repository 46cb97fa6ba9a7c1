"""ONNX files of class-conditional networks: a ``class_labels`` input, verified against the
reference, OnnxSampler's chains with given and drawn labels, and the libraries' own chains."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast.errors import ConfigError
from ddpm_fast.export import OnnxSampler, export_onnx
from ddpm_fast.pipeline import DiffusionConfig, Pipeline
from ddpm_fast.schedule import ScheduleConfig

from ..families import random_network

ADM = Path(__file__).parents[1] / "fixtures" / "adm"
CHAIN = dict(sampler="ddpm", steps=4)


def class_pipeline() -> Pipeline:
    diffusion = DiffusionConfig(
        image_size=8, schedule=ScheduleConfig("cosine", 100), objective="pred_noise",
        variance="learned_range", timestep_spacing="sections",
    )  # fmt: skip
    return Pipeline(random_network("adm-class-conditional"), diffusion, source="test network")


@pytest.mark.parametrize("what, dtype", [("unet", "fp32"), ("step", "fp32"), ("step", "fp16")])
def test_files_take_labels_and_sample_like_the_reference(tmp_path, what, dtype):
    pipeline = class_pipeline()
    path = tmp_path / "model.onnx"
    report = export_onnx(pipeline, path, what=what, dtype=dtype, **CHAIN).report
    assert report.ok, str(report)
    if dtype != "fp32":
        return
    sampler = OnnxSampler(path)
    assert "class_labels" in sampler.info.input_names and sampler.info.num_classes == 5
    labels = [4, 0, 2]
    reference = pipeline.sample(3, seed=5, class_labels=labels, **CHAIN).numpy()
    images = sampler.sample(3, seed=5, batch_size=2, class_labels=labels)
    assert np.abs(images - reference).max() <= 1e-4
    drawn = sampler.sample(3, seed=5)
    assert np.abs(drawn - pipeline.sample(3, seed=5, **CHAIN).numpy()).max() <= 1e-4
    other = sampler.sample(3, seed=5, class_labels=[3, 1, 1])
    assert np.abs(other - images).max() > 1e-4  # the labels reach the network


def test_bad_labels_are_one_line(tmp_path):
    path = tmp_path / "model.onnx"
    export_onnx(class_pipeline(), path, what="step", verify=False, **CHAIN)
    sampler = OnnxSampler(path)
    with pytest.raises(ConfigError, match=r"outside \[0, 5\)"):
        sampler.sample(2, class_labels=5)
    with pytest.raises(ConfigError, match="3 class labels for 2 images"):
        sampler.sample(2, class_labels=[1, 2, 3])
    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(ConfigError, match="pass class_labels"):
        sampler.step(x, 0, noise=x)


def test_an_unconditional_file_refuses_labels(tmp_path):
    from ..families import random_pipeline

    path = tmp_path / "model.onnx"
    export_onnx(random_pipeline("adm-legacy-time-bias"), path, what="step", verify=False, **CHAIN)
    with pytest.raises(ConfigError, match="not class-conditional"):
        OnnxSampler(path).sample(1, class_labels=1)


@pytest.mark.parametrize("key", ["guided_cond-ddpm-25-eta0.0", "guided_cond-ddim-ddim10-eta0.5"])
def test_step_files_sample_the_librarys_chains(tmp_path, key):
    chains = torch.load(ADM / "chains.pt", weights_only=True)
    case = chains[key]
    flags = json.loads((ADM / f"{case['model']}.json").read_text())
    pipeline = ddpm_fast.load(ADM / f"{case['model']}.pt", **flags)
    steps = int(case["timestep_respacing"].removeprefix("ddim"))
    path = tmp_path / "model.onnx"
    export_onnx(pipeline, path, what="step", sampler=case["sampler"], steps=steps, eta=case["eta"])
    images = OnnxSampler(path).sample(
        2, seed=case["seed"], class_labels=case["labels"].numpy()
    )  # fmt: skip
    assert np.abs(images - case["final"].numpy()).max() <= 1e-4
