"""Exported files against the reference: the network and the whole step for every objective,
variance and sampler; metadata; opsets; fp16; verification that fails when it should."""

import json

import numpy as np
import onnx
import pytest
import torch

from ddpm_fast.export import OnnxFileError, VerificationError, export_onnx, verify_onnx
from ddpm_fast.export.format import FORMAT_KEY
from ddpm_fast.export.onnx_sampler import open_session
from ddpm_fast.samplers import denoise_step, step_tables
from ddpm_fast.version import __version__

from .common import make_pipeline, perturbed

CASES = {
    # name: (pipeline options, export options)
    "pred_noise-ddpm": ({}, dict(sampler="ddpm", steps=6)),
    "pred_v-selfcond-ddim-eta": (
        dict(objective="pred_v", self_condition=True),
        dict(sampler="ddim", steps=5, eta=0.5),
    ),
    "pred_x0-learned_range": (
        dict(objective="pred_x0", learned_variance=True),
        dict(sampler="ddpm", steps=7),
    ),
    "pred_noise-fixed_large-cosine-rgb": (
        dict(variance="fixed_large", schedule="cosine", timesteps=50, channels=3),
        dict(sampler="ddpm", steps=50),
    ),
    "pred_v-learned_sinusoidal-ddim": (
        dict(objective="pred_v", learned_sinusoidal_cond=True),
        dict(sampler="ddim", steps=4),
    ),
    "pred_v-dpm++2m-sde-karras": (
        dict(objective="pred_v"),
        dict(sampler="dpm++2m-sde-karras", steps=6),
    ),
    "pred_noise-selfcond-dpm++2m-trailing": (
        dict(self_condition=True),
        dict(sampler="dpm++2m", steps=5, timestep_spacing="trailing"),
    ),
}


@pytest.mark.parametrize("what", ["unet", "step"])
@pytest.mark.parametrize("name", list(CASES))
def test_export_is_verified_against_the_reference(tmp_path, name, what):
    pipeline_options, options = CASES[name]
    pipeline = make_pipeline(**pipeline_options)
    path = tmp_path / "model.onnx"
    result = export_onnx(pipeline, path, what=what, **options)
    report = result.report
    assert result.path == path and path.is_file() and report.ok, str(report)
    assert report.summary().startswith("ok: ")
    outputs = ["model_output"] if what == "unet" else ["x_prev", "x0"]
    assert {c.output for c in report.checks} == set(outputs)
    assert {c.batch for c in report.checks} == {1, 3}
    assert len(report.checks) == 2 * 3 * len(outputs)  # batches x first/middle/last
    assert max(c.rel for c in report.checks) <= 1e-4
    assert not list(tmp_path.glob(".*.tmp"))


def test_step_file_matches_denoise_step_at_every_step(tmp_path):
    """Beyond the verifier's three steps: every step of a chain, with inputs where x0 is not
    clipped everywhere and with a batch size the export never saw."""
    pipeline = make_pipeline(objective="pred_v", self_condition=True, learned_variance=True)
    path = tmp_path / "step.onnx"
    export_onnx(pipeline, path, what="step", sampler="ddpm", steps=8, verify=False)
    session = open_session(path)
    spec = pipeline.sampler_spec("ddpm", 8)
    tables = step_tables(pipeline.schedule, spec)
    g = torch.Generator().manual_seed(1)
    shape = (5, 1, 8, 8)
    for k in range(len(tables)):
        x = torch.randn(shape, generator=g) * 0.7 + 0.2
        noise = torch.randn(shape, generator=g)
        x_self_cond = torch.rand(shape, generator=g) * 2 - 1
        t = torch.full((5,), int(tables.timesteps[k]))
        with torch.no_grad():
            out = pipeline.network(x, t, x_self_cond)
        step_noise = noise if tables.adds_noise(k, spec) else None
        x_prev, x0 = denoise_step(out, x, tables, k, spec, "pred_v", step_noise)
        got = session.run(
            None,
            {
                "x_t": x.numpy(),
                "step": np.array([k]),
                "noise": noise.numpy(),
                "x_self_cond": x_self_cond.numpy(),
            },
        )
        assert np.abs(got[0] - x_prev.numpy()).max() <= 1e-5 * x_prev.abs().max()
        assert np.abs(got[1] - x0.numpy()).max() <= 1e-5
        assert np.abs(got[1]).max() <= 1 and (np.abs(got[1]) < 0.99).mean() > 0.2  # not all clipped
    assert not tables.adds_noise(len(tables) - 1, spec)  # the last step returned x0
    np.testing.assert_array_equal(got[0], got[1])


def test_metadata_carries_what_a_deployment_needs(tmp_path):
    pipeline = make_pipeline(objective="pred_v", self_condition=True)
    path = tmp_path / "step.onnx"
    export_onnx(pipeline, path, what="step", sampler="ddim", steps=5, eta=0.5)
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[FORMAT_KEY] == "3" and meta["ddpm_fast_version"] == __version__
    assert meta["what"] == "step" and meta["dtype"] == "fp32" and meta["opset"] == "17"
    assert meta["family"] == "dd-pytorch-v1"
    assert json.loads(meta["config"]) == pipeline.config.to_dict()
    assert meta["image_size"] == "8" and meta["channels"] == "1"
    assert json.loads(meta["schedule"]) == {"name": "linear", "timesteps": 100, "kwargs": {}}
    assert meta["objective"] == "pred_v" and meta["self_condition"] == "true"
    assert (meta["sampler"], meta["steps"], float(meta["eta"])) == ("ddim", "5", 0.5)
    assert meta["noise_steps"] == "11110"
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == ["x_t", "step", "noise", "x_self_cond"]
    dims = inputs["x_t"].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert [o.name for o in model.graph.output] == ["x_prev", "x0"]


@pytest.mark.parametrize("opset", [14, 18, 20])
def test_other_opsets(tmp_path, opset):
    pipeline = make_pipeline()
    path = tmp_path / "unet.onnx"
    report = export_onnx(pipeline, path, what="unet", steps=4, opset=opset).report
    assert report.ok, str(report)
    model = onnx.load(str(path))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]


@pytest.mark.parametrize("what", ["unet", "step"])
def test_fp16_is_verified_or_skipped_by_provider(tmp_path, what):
    """fp16 against the fp32 reference within max(1e-2, twice PyTorch's own fp16 error) where a
    provider runs it; otherwise reported as skipped, with the file checked."""
    pipeline = make_pipeline(objective="pred_v")
    path = tmp_path / "half.onnx"
    report = export_onnx(pipeline, path, what=what, dtype="fp16", sampler="ddim", steps=4).report
    assert report.ok, str(report)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) > 10  # the weights are fp16
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    if report.skipped:
        assert "skipped" in report.summary()
    else:
        assert all(c.tolerance >= 1e-2 for c in report.checks)
        assert 1e-5 < max(c.rel for c in report.checks) <= 0.05  # fp16, not fp32 in disguise


def test_verification_fails_for_another_models_weights(tmp_path):
    pipeline = make_pipeline()
    path = tmp_path / "unet.onnx"
    export_onnx(pipeline, path, what="unet", steps=4)
    report = verify_onnx(path, perturbed(pipeline))
    assert not report.ok and report.summary().startswith("FAILED")
    assert "ok" not in report.summary().split()[0]


def test_a_wrong_step_graph_fails_verification_and_leaves_no_file(tmp_path, monkeypatch):
    """A sign error in one coefficient table of the step graph: the export stops, no file."""
    from ddpm_fast.export import exporter

    pipeline = make_pipeline(objective="pred_v")
    real = exporter.step_tables

    def wrong(schedule, spec):
        tables = real(schedule, spec)
        tables.x0_from_v = -tables.x0_from_v
        return tables

    monkeypatch.setattr(exporter, "step_tables", wrong)
    path = tmp_path / "step.onnx"
    with pytest.raises(VerificationError) as info:
        export_onnx(pipeline, path, what="step", sampler="ddim", steps=4)
    assert not info.value.report.ok and "FAILED" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_verify_refuses_a_file_of_another_model(tmp_path):
    path = tmp_path / "unet.onnx"
    export_onnx(make_pipeline(), path, what="unet", steps=4, verify=False)
    with pytest.raises(
        OnnxFileError, match=r"not exported from .*config\.channels: file 1, model 3"
    ):
        verify_onnx(path, make_pipeline(channels=3))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(what="graph"), "unknown export 'graph'"),
        (dict(dtype="bf16"), "unknown dtype 'bf16'"),
        (dict(opset=11), "opset must be an integer in"),
        (dict(sampler="ddpm", eta=0.5), "eta applies to the ddim sampler only"),
        (dict(steps=1000), "steps must be between 1 and the schedule's 100"),
    ],
)
def test_bad_export_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        export_onnx(make_pipeline(), tmp_path / "m.onnx", **options)
    assert list(tmp_path.iterdir()) == []


def test_fp16_without_a_provider_for_it_is_reported_as_skipped(tmp_path, monkeypatch):
    """Where the providers have no fp16 kernels (onnxruntime's NotImplemented at load), the
    numbers are skipped and said to be, the structure still checked; an fp32 file so refused is
    an error."""
    from ddpm_fast.export import verify

    NotImplemented_ = type("NotImplemented", (Exception,), {})

    def no_kernels(path, providers=None):
        raise NotImplemented_("Could not find an implementation for Conv(11)")

    pipeline = make_pipeline()
    path = tmp_path / "half.onnx"
    export_onnx(pipeline, path, what="unet", dtype="fp16", steps=4, verify=False)
    monkeypatch.setattr(verify, "open_session", no_kernels)
    report = verify.verify_onnx(path, pipeline)
    assert report.ok and report.skipped and not report.checks
    assert report.summary().startswith("ok: onnx.checker passed; fp16: skipped (no provider")
    export_onnx(pipeline, tmp_path / "full.onnx", what="unet", steps=4, verify=False)
    with pytest.raises(OnnxFileError, match="onnxruntime cannot run it"):
        verify.verify_onnx(tmp_path / "full.onnx", pipeline)


def test_a_solver_step_file_takes_and_returns_its_history(tmp_path):
    """DPM-Solver++'s step file declares x0_prev as an input (x0 is the next step's) and its
    output depends on it where the step is second order."""
    pipeline = make_pipeline(objective="pred_v")
    path = tmp_path / "step.onnx"
    export_onnx(pipeline, path, what="step", sampler="dpm++2m", steps=6, verify=False)
    session = open_session(path)
    assert [i.name for i in session.get_inputs()] == ["x_t", "step", "noise", "x0_prev"]
    assert [o.name for o in session.get_outputs()] == ["x_prev", "x0"]
    spec = pipeline.sampler_spec("dpm++2m", 6)
    tables = step_tables(pipeline.schedule, spec)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 8, 8, generator=g)
    x0_prev = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    for k in range(len(tables)):
        t = torch.full((2,), int(tables.timesteps[k]))
        with torch.no_grad():
            out = pipeline.network(x, t)
        want, _ = denoise_step(out, x, tables, k, spec, "pred_v", None, x0_prev)
        feed = {
            "x_t": x.numpy(),
            "step": np.array([k]),
            "noise": np.zeros((2, 1, 8, 8), np.float32),
        }
        got = session.run(None, feed | {"x0_prev": x0_prev.numpy()})[0]
        assert np.abs(got - want.numpy()).max() <= 1e-5 * want.abs().max()
        without = session.run(None, feed | {"x0_prev": np.zeros((2, 1, 8, 8), np.float32)})[0]
        assert (np.abs(without - got).max() > 1e-3) == bool(tables.c_x0_prev[k] != 0)
