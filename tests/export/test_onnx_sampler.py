"""OnnxSampler: the same images as Pipeline.sample for the same seed, without torch; providers;
clear errors for bad files and bad inputs."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ddpm_fast.errors import ConfigError
from ddpm_fast.export import OnnxFileError, OnnxSampler, export_onnx, philox
from ddpm_fast.export import onnx_sampler as module

from .common import make_pipeline

CHAINS = {
    # name: (pipeline options, what, chain)
    "unet-ddpm-pred_noise": ({}, "unet", dict(sampler="ddpm", steps=6)),
    "step-ddpm-pred_noise": ({}, "step", dict(sampler="ddpm", steps=6)),
    "step-ddim-eta-selfcond": (
        dict(objective="pred_v", self_condition=True),
        "step",
        dict(sampler="ddim", steps=5, eta=0.5),
    ),
    "unet-ddim-selfcond": (
        dict(objective="pred_v", self_condition=True),
        "unet",
        dict(sampler="ddim", steps=5),
    ),
    "step-learned_range": (
        dict(objective="pred_x0", learned_variance=True),
        "step",
        dict(sampler="ddpm", steps=7),
    ),
    "unet-learned_range": (
        dict(objective="pred_x0", learned_variance=True),
        "unet",
        dict(sampler="ddpm", steps=7),
    ),
    "unet-fixed_large-rgb": (
        dict(variance="fixed_large", channels=3),
        "unet",
        dict(sampler="ddpm", steps=5),
    ),
    "step-dpm++2m-selfcond": (
        dict(objective="pred_v", self_condition=True),
        "step",
        dict(sampler="dpm++2m", steps=6),
    ),
    "unet-dpm++2m-sde": ({}, "unet", dict(sampler="dpm++2m-sde", steps=6)),
    "step-dpm++2m-karras-leading": (
        {},
        "step",
        dict(sampler="dpm++2m-karras", steps=5, timestep_spacing="leading"),
    ),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (pipeline, path), exported once for the module."""
    folder = tmp_path_factory.mktemp("onnx")
    files = {}
    for name, (options, what, chain) in CHAINS.items():
        pipeline = make_pipeline(**options)
        path = folder / f"{name}.onnx"
        export_onnx(pipeline, path, what=what, verify=False, **chain)
        files[name] = (pipeline, path)
    return files


@pytest.mark.parametrize("name", list(CHAINS))
def test_same_images_as_the_reference_sampler(exported, name):
    pipeline, path = exported[name]
    chain = CHAINS[name][2]
    sampler = OnnxSampler(path)
    reference = pipeline.sample(3, seed=11, batch_size=3, **chain).numpy()
    for batch_size in (1, 3):
        images = sampler.sample(3, seed=11, batch_size=batch_size)
        assert images.shape == reference.shape and images.dtype == np.float32
        assert np.abs(images - reference).max() <= 1e-4
    assert reference.std() > 0.05 and not np.allclose(reference[0], reference[1])
    other_seed = sampler.sample(3, seed=12)
    assert np.abs(other_seed - images).max() > 0.05


def test_sample_i_is_the_same_image_in_any_batch(exported):
    _, path = exported["step-ddim-eta-selfcond"]
    sampler = OnnxSampler(path)
    five = sampler.sample(5, seed=3, batch_size=2)
    alone = sampler.sample(1, seed=3, start_index=4)
    np.testing.assert_allclose(alone[0], five[4], rtol=0, atol=1e-6)
    batches = list(sampler.sample_batches(5, seed=3, batch_size=2))
    assert [list(indices) for indices, _ in batches] == [[0, 1], [2, 3], [4]]


def test_step_noise_is_drawn_in_blocks_and_only_where_a_step_adds_some(exported, monkeypatch):
    """One draw per batch for a 5-step chain that adds noise; none for DDIM with eta 0."""
    draws = []
    real = philox.keyed_noise_steps
    monkeypatch.setattr(philox, "keyed_noise_steps", lambda *a: draws.append(a[2:4]) or real(*a))
    OnnxSampler(exported["step-ddim-eta-selfcond"][1]).sample(3, seed=1, batch_size=2)
    # (first step, count) for each of the two batches: x_T, then the 5 steps' noise in one draw
    assert draws == [(0, 1), (1, 5), (0, 1), (1, 5)]
    draws.clear()
    OnnxSampler(exported["unet-ddim-selfcond"][1]).sample(2, seed=1)
    assert draws == [(0, 1)]  # x_T only


def test_initial_noise_replaces_x_t(exported):
    pipeline, path = exported["unet-ddim-selfcond"]
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal((2, 1, 8, 8)) * 0.9 + 0.1).astype(np.float32)
    import torch

    reference = pipeline.sample(
        2, sampler="ddim", steps=5, initial_noise=torch.from_numpy(noise)
    ).numpy()
    images = OnnxSampler(path).sample(2, initial_noise=noise, seed=99)
    assert np.abs(images - reference).max() <= 1e-4


TORCH_FREE = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
import numpy as np
from ddpm_fast.export import OnnxSampler
sampler = OnnxSampler(sys.argv[1])
images = sampler.sample(3, seed=11, batch_size=2)
np.save(sys.argv[2], images)
import ddpm_fast
assert "torch" not in {name.split(".")[0] for name in sys.modules if sys.modules[name]}
print("torch-free", sampler.providers)
"""


@pytest.mark.parametrize("name", ["step-ddim-eta-selfcond", "unet-learned_range"])
def test_sampling_never_imports_torch(exported, tmp_path, name):
    pipeline, path = exported[name]
    out = tmp_path / "images.npy"
    result = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, str(path), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "torch-free ['CPUExecutionProvider']" in result.stdout
    assert result.stderr == ""  # no onnxruntime log lines
    reference = pipeline.sample(3, seed=11, **CHAINS[name][2]).numpy()
    assert np.abs(np.load(out) - reference).max() <= 1e-4


def test_no_cuda_requested_without_a_gpu(monkeypatch):
    class FakeOrt:
        @staticmethod
        def get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(module, "_onnxruntime", lambda: FakeOrt)
    monkeypatch.setattr(module, "cuda_device_visible", lambda: False)
    assert module.default_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        module.providers_for_device("cuda")
    monkeypatch.setattr(module, "cuda_device_visible", lambda: True)
    cuda = ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0})  # fp32 stays fp32
    assert module.default_providers() == [cuda, "CPUExecutionProvider"]
    assert module.providers_for_device("cuda:1")[0] == (cuda[0], {"device_id": 1, "use_tf32": 0})
    assert module.providers_for_device("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="unknown device"):
        module.providers_for_device("tpu")


def test_a_chain_other_than_the_exported_one_is_an_error(exported):
    _, path = exported["step-ddim-eta-selfcond"]
    sampler = OnnxSampler(path)
    with pytest.raises(ConfigError, match="exported for 5 steps, not 50"):
        sampler.sample(1, steps=50)
    with pytest.raises(ConfigError, match="not sampler 'ddpm'"):
        sampler.sample(1, sampler="ddpm")
    with pytest.raises(ConfigError, match="exported with eta 0.5, not 0"):
        sampler.sample(1, eta=0.0)
    sampler.check_chain("ddim", 5, 0.5)


def test_wrong_shapes_and_dtypes_are_config_errors(exported):
    sampler = OnnxSampler(exported["step-ddim-eta-selfcond"][1])
    x = np.zeros((2, 1, 8, 8), np.float32)
    with pytest.raises(
        ConfigError, match=r"x_t must have shape \[B, 1, 8, 8\], got \[2, 1, 8, 9\]"
    ):
        sampler.step(np.zeros((2, 1, 8, 9), np.float32), 0, x)
    with pytest.raises(ConfigError, match="x_t must be float32, got float64"):
        sampler.step(x.astype(np.float64), 0, x)
    with pytest.raises(
        ConfigError, match=r"noise must have shape \[2, 1, 8, 8\], got \[3, 1, 8, 8\]"
    ):
        sampler.step(x, 0, np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="step 0 adds noise"):
        sampler.step(x, 0)
    with pytest.raises(ConfigError, match=r"step index must be an integer in \[0, 5\)"):
        sampler.step(x, 5, x)
    with pytest.raises(ConfigError, match="x_self_cond must have shape"):
        sampler.step(x, 0, x, np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="initial_noise must have shape"):
        sampler.sample(2, initial_noise=x[:1])
    with pytest.raises(ConfigError, match="seed must be"):
        sampler.sample(1, seed=-1)
    with pytest.raises(ConfigError, match="needs a unet file"):
        sampler.network(x, np.zeros(2, np.int64))
    x_prev, x0 = sampler.step(x + 0.3, 4)  # the last step adds no noise: none needed
    np.testing.assert_array_equal(x_prev, x0)

    unet = OnnxSampler(exported["unet-ddpm-pred_noise"][1])
    with pytest.raises(ConfigError, match=r"timesteps must lie in \[0, 100\)"):
        unet.network(x, np.array([0, 100]))
    with pytest.raises(ConfigError, match="t must be an integer NumPy array"):
        unet.network(x, np.zeros(2, np.float32))
    with pytest.raises(ConfigError, match="not self-conditioning"):
        unet.network(x, np.zeros(2, np.int64), x)
    assert unet.network(x + 0.5, np.array([3, 90])).shape == (2, 1, 8, 8)


def test_a_truncated_file_is_a_one_line_error(exported, tmp_path):
    data = exported["unet-ddpm-pred_noise"][1].read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxFileError, match="truncated.onnx: onnxruntime cannot load it") as info:
        OnnxSampler(truncated)
    assert "\n" not in str(info.value)
    with pytest.raises(OnnxFileError, match="no such file"):
        OnnxSampler(tmp_path / "missing.onnx")


def foreign_onnx(path, metadata=None):
    """A valid ONNX file that ddpm-fast did not write: y = x + 1."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        [one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def test_a_foreign_file_is_a_clear_error(tmp_path):
    path = foreign_onnx(tmp_path / "foreign.onnx")
    with pytest.raises(
        OnnxFileError, match="foreign.onnx: an ONNX file without ddpm-fast metadata"
    ):
        OnnxSampler(path)
    newer = foreign_onnx(tmp_path / "newer.onnx", {"ddpm_fast_onnx_format": "9"})
    with pytest.raises(OnnxFileError, match="ddpm-fast ONNX format '9'"):
        OnnxSampler(newer)
    # Format 2 files (before the rule's eps_x0_max column) are refused, with what to do.
    older = foreign_onnx(tmp_path / "older.onnx", {"ddpm_fast_onnx_format": "2"})
    with pytest.raises(OnnxFileError, match="ONNX format '2' .*reads format 3: export it again"):
        OnnxSampler(older)


def test_metadata_that_does_not_match_the_graph_is_an_error(exported, tmp_path):
    """A step file's metadata on a unet graph: inputs that are not what the metadata says."""
    step = onnx.load(str(exported["step-ddpm-pred_noise"][1]))
    unet = onnx.load(str(exported["unet-ddpm-pred_noise"][1]))
    meta = {p.key: p.value for p in step.metadata_props}
    del unet.metadata_props[:]
    for key, value in meta.items():
        unet.metadata_props.add(key=key, value=value)
    path = tmp_path / "mixed.onnx"
    onnx.save(unet, str(path))
    with pytest.raises(
        OnnxFileError, match=r"inputs \['x', 't'\] .* not those of a ddpm-fast step"
    ):
        OnnxSampler(path)
    meta["config"] = "{not json"
    bad = foreign_onnx(tmp_path / "bad.onnx", meta)
    with pytest.raises(OnnxFileError, match="bad ddpm-fast metadata"):
        OnnxSampler(bad)
