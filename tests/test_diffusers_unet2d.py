"""The diffusers UNet2DModel family against diffusers 0.42.1 itself (fixtures made by
tests/fixtures/make_diffusers.py): one forward of each fixture network, the folder reader
(pipeline folders, a bare .bin folder with the old attention key names), the scheduler mapping,
and one-line errors for the folders and configs it does not read."""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast.diffusers_folder import schedule_from_scheduler
from ddpm_fast.errors import CheckpointError, ConfigError
from ddpm_fast.models import detect, diffusers_unet2d
from ddpm_fast.samplers import sample_loop, step_tables
from ddpm_fast.schedule import Schedule

from .helpers import rel_error

FIXTURES = Path(__file__).parent / "fixtures" / "diffusers"
NETWORK_TOLERANCE = 1e-5  # one forward, fp32, against diffusers'
FOLDERS = {
    "ddpm_cifar10_small": "ddpm_cifar10_small",
    "fourier_scale_shift": "fourier_scale_shift",
    "learned_variance_scale_shift": "learned_variance_scale_shift",
    "ddpm_cifar10_small_bin_legacy": "ddpm_cifar10_small",  # same network, old keys, .bin
}


@cache
def forward_fixtures() -> dict:
    return torch.load(FIXTURES / "forward.pt", weights_only=True)


@cache
def scheduler_fixtures() -> dict:
    return torch.load(FIXTURES / "schedulers.pt", weights_only=True)


@pytest.mark.parametrize("folder", FOLDERS)
def test_one_forward_is_diffusers(folder):
    pipeline = ddpm_fast.load(FIXTURES / folder)
    assert pipeline.config.family == diffusers_unet2d.FAMILY
    fixture = forward_fixtures()[FOLDERS[folder]]
    for case in fixture["cases"]:
        with torch.no_grad():
            got = pipeline.network(fixture["x"], case["t"])
        assert got.shape == case["out"].shape
        assert case["out"].abs().max() > 0
        assert rel_error(got, case["out"]) <= NETWORK_TOLERANCE, case["t"]


def test_the_old_attention_key_names_are_renamed():
    weights = torch.load(
        FIXTURES / "ddpm_cifar10_small_bin_legacy" / "diffusion_pytorch_model.bin",
        weights_only=True,
    )
    old = [k for k in weights if k.endswith(("query.weight", "proj_attn.weight"))]
    assert old, "the fixture must hold the old names"
    renamed = diffusers_unet2d.remap_keys(weights)
    assert not [k for k in renamed if ".query." in k or ".proj_attn." in k]
    assert all(k.replace("query", "to_q") in renamed for k in old if "query" in k)


def test_detected_as_diffusers_and_not_as_another_family():
    from safetensors.torch import load_file

    weights = load_file(
        FIXTURES / "ddpm_cifar10_small" / "unet" / "diffusion_pytorch_model.safetensors"
    )
    assert detect(weights, "x") is diffusers_unet2d


@pytest.mark.parametrize("name", ["linear", "linear_custom", "scaled_linear", "squaredcos_cap_v2",
                                  "sigmoid"])  # fmt: skip
def test_scheduler_betas_are_diffusers(name):
    fixture = scheduler_fixtures()[name]
    diffusion, _ = schedule_from_scheduler("scheduler_config.json", json.loads(fixture["config"]))
    schedule = Schedule(diffusion.schedule)
    assert torch.equal(schedule.betas.float(), fixture["betas"])
    # float64 products of the same float32 betas (diffusers multiplies in float32)
    assert rel_error(schedule.alphas_cumprod, fixture["alphas_cumprod"]) <= 1e-5


def test_trained_betas_are_the_files():
    config = json.loads(scheduler_fixtures()["linear"]["config"])
    betas = [0.001 * (i + 1) for i in range(10)]
    diffusion, _ = schedule_from_scheduler(
        "s", {**config, "num_train_timesteps": 10, "trained_betas": betas}
    )
    assert torch.equal(Schedule(diffusion.schedule).betas.float(), torch.tensor(betas))


def test_what_the_scheduler_says_is_the_pipelines_and_info_names_it():
    pipeline = ddpm_fast.load(FIXTURES / "fourier_scale_shift")
    assert pipeline.diffusion.objective == "pred_v"
    assert pipeline.diffusion.schedule.name == "diffusers_squaredcos_cap_v2"
    assert pipeline.diffusion.image_size == 16
    info = ddpm_fast.checkpoints.describe(pipeline)
    assert info["family"] == "diffusers-unet2d"
    assert any("DDIMPipeline" in n for n in info["notes"])
    assert any("timestep_spacing trailing" in n for n in info["notes"])
    cifar = ddpm_fast.load(FIXTURES / "ddpm_cifar10_small")
    assert (cifar.diffusion.objective, cifar.diffusion.variance) == ("pred_noise", "fixed_large")


def test_a_bare_unet_folder_takes_scheduler_options():
    folder = FIXTURES / "ddpm_cifar10_small_bin_legacy"
    pipeline = ddpm_fast.load(folder, objective="pred_v", variance="fixed_large")
    assert (pipeline.diffusion.objective, pipeline.diffusion.variance) == ("pred_v", "fixed_large")
    assert any("defaults assumed" in n for n in ddpm_fast.load(folder).notes)


def test_a_diffusers_pipeline_round_trips_through_ddpm_fasts_own_file(tmp_path):
    pipeline = ddpm_fast.load(FIXTURES / "fourier_scale_shift")
    path = ddpm_fast.save_pipeline(pipeline, tmp_path / "m.safetensors")
    again = ddpm_fast.load(path)
    assert again.config == pipeline.config and again.diffusion == pipeline.diffusion
    x, t = torch.randn(2, 2, 16, 16), torch.tensor([7, 300])
    with torch.no_grad():
        assert torch.equal(again.network(x, t), pipeline.network(x, t))


# folders and configs it does not read: one line naming the field


def copied(tmp_path: Path, name: str = "ddpm_cifar10_small") -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _missing_weights(folder: Path) -> None:
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()


def _sharded(folder: Path) -> None:
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")


BAD = {
    "missing weights": (_missing_weights, CheckpointError, "no diffusion_pytorch_model"),
    "sharded weights": (_sharded, CheckpointError, "sharded weights are not supported"),
    "config/weights mismatch": (
        lambda f: edit_json(f / "unet" / "config.json", block_out_channels=[16, 32, 32, 64]),
        CheckpointError,
        "mis-shaped",
    ),
    "labels as vectors": (
        lambda f: edit_json(f / "unet" / "config.json", class_embed_type="identity"),
        CheckpointError,
        "class_embed_type='identity'",
    ),
    "timestep class embedding without a label range": (
        lambda f: edit_json(f / "unet" / "config.json", class_embed_type="timestep"),
        CheckpointError,
        "without num_class_embeds",
    ),
    "conditional block": (
        lambda f: edit_json(
            f / "unet" / "config.json",
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        ),
        CheckpointError,
        "down_block_types 'CrossAttnDownBlock2D' is not supported",
    ),
    "conditional unet": (
        lambda f: edit_json(f / "unet" / "config.json", _class_name="UNet2DConditionModel"),
        CheckpointError,
        "_class_name is 'UNet2DConditionModel'",
    ),
    "unknown scheduler": (
        lambda f: edit_json(f / "scheduler" / "scheduler_config.json", _class_name="PNDMScheduler"),
        ConfigError,
        "_class_name='PNDMScheduler' is not supported",
    ),
    "unknown pipeline": (
        lambda f: edit_json(f / "model_index.json", _class_name="StableDiffusionPipeline"),
        CheckpointError,
        "_class_name 'StableDiffusionPipeline' is not supported",
    ),
    "bad clip range": (
        lambda f: edit_json(f / "scheduler" / "scheduler_config.json", clip_sample_range=0),
        ConfigError,
        "clip_sample_range=0 is not a positive number",
    ),
    "unknown spacing": (
        lambda f: edit_json(f / "scheduler" / "scheduler_config.json", timestep_spacing="library"),
        ConfigError,
        "timestep_spacing='library' is not supported",
    ),
    "negative offset": (
        lambda f: edit_json(f / "scheduler" / "scheduler_config.json", steps_offset=-1),
        ConfigError,
        "steps_offset=-1",
    ),
    "thresholding": (
        lambda f: edit_json(f / "scheduler" / "scheduler_config.json", thresholding=True),
        ConfigError,
        "thresholding=True is not supported .dynamic thresholding clips x0 at a per-sample",
    ),
    "zero terminal snr flag": (
        lambda f: edit_json(f / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=1),
        ConfigError,
        "rescale_betas_zero_snr=1 is not true or false",
    ),
    "unknown beta schedule": (
        lambda f: edit_json(f / "scheduler" / "scheduler_config.json", beta_schedule="laplace"),
        ConfigError,
        "beta_schedule='laplace'",
    ),
    "learned variance": (
        lambda f: edit_json(f / "scheduler" / "scheduler_config.json", variance_type="learned"),
        ConfigError,
        "variance_type='learned'",
    ),
    "bad json": (
        lambda f: (f / "unet" / "config.json").write_text("{not json"),
        CheckpointError,
        "not valid JSON",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_folders_are_one_line_errors(tmp_path, case):
    damage, error, message = BAD[case]
    folder = copied(tmp_path)
    damage(folder)
    with pytest.raises(error, match=message) as err:
        ddpm_fast.load(folder)
    assert "\n" not in str(err.value)
    assert str(tmp_path) in str(err.value)


# whole chains against diffusers' own loop


@cache
def chain_fixtures() -> dict:
    return torch.load(FIXTURES / "chains.pt", weights_only=True)


def chain_noise(t: int, shape: tuple[int, ...]) -> torch.Tensor:
    """make_diffusers.chain_noise: the noise of the step at timestep t."""
    rng = np.random.default_rng(10_000 + int(t))
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "ddpm_cifar10_small-ddpm",
        "learned_variance_scale_shift-ddpm",
        "ddpm_cifar10_small-ddim-eta0.5",  # the network's own eps, from the unclipped x0
    ],
)
def test_a_whole_chain_is_diffusers(name):
    """DDPM (fixed_large; learned_range) and DDIM eta 0.5 over every timestep of the folder's
    scheduler made 100 steps long, from the same x_T with the same noise at each timestep, within
    1e-4 of diffusers' pipeline loop. (Fewer steps need diffusers' timestep spacing: issue 13.)"""
    fixture = chain_fixtures()[name]
    pipeline = ddpm_fast.load(FIXTURES / fixture["folder"], timesteps=fixture["steps"])
    spec = pipeline.sampler_spec(fixture["sampler"], fixture["steps"], fixture["eta"])
    tables = step_tables(pipeline.schedule, spec)

    def noise_fn(k: int, shape: tuple[int, ...]) -> torch.Tensor:
        return chain_noise(int(tables.timesteps[k - 1]), shape)

    with torch.no_grad():
        got = sample_loop(
            pipeline.network, fixture["x_T"].clone(), tables, spec, pipeline.diffusion.objective,
            noise_fn,
        )  # fmt: skip
    want = fixture["final"].clamp(-1, 1)
    assert want.std() > 0.05
    torch.testing.assert_close(got.clamp(-1, 1), want, rtol=0, atol=1e-4)


# the command line


def test_cli_info_and_sample_from_a_folder(tmp_path, capsys):
    from ddpm_fast.cli import main

    folder = FIXTURES / "ddpm_cifar10_small"
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "family:      diffusers-unet2d" in out
    assert "note:        timestep_spacing leading" in out
    png = tmp_path / "x.png"
    args = ["sample", str(folder), "--steps", "3", "--sampler", "ddim", "--num", "2", "--out"]
    assert main([*args, str(png)]) == 0
    assert png.is_file()
    capsys.readouterr()
    assert main(["info", str(folder), "--attn-heads", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "attn_heads" in err and "\n" not in err


# chains of fewer steps, with the folder's own scheduler semantics (spaced_chains.pt)


@cache
def spaced_fixtures() -> dict:
    return torch.load(FIXTURES / "spaced_chains.pt", weights_only=True)


def spaced_folder(tmp_path: Path, fixture: dict) -> Path:
    """A copy of the fixture's folder with its scheduler_config.json changed as make_diffusers
    changed diffusers' scheduler."""
    folder = copied(tmp_path, fixture["folder"])
    edit_json(folder / "scheduler" / "scheduler_config.json", **json.loads(fixture["changes"]))
    return folder


def spaced_chain(tmp_path: Path, name: str, **options):
    """(pipeline, spec, tables, noise by step k, fixture) of a spaced chain: the folder's own
    sampler where diffusers ran its DPM-Solver scheduler."""
    fixture = spaced_fixtures()[name]
    pipeline = ddpm_fast.load(spaced_folder(tmp_path, fixture), **options)
    sampler = None if fixture["sampler"] == "dpm" else fixture["sampler"]
    spec = pipeline.sampler_spec(sampler, fixture["steps"], fixture["eta"])
    tables = step_tables(pipeline.schedule, spec)

    def noise_fn(k: int, shape: tuple[int, ...]) -> torch.Tensor:
        return chain_noise(int(tables.timesteps[k - 1]), shape)

    return pipeline, spec, tables, noise_fn, fixture


def assert_diffusers_final(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within 1e-4 of diffusers' final x (relative to its scale where x0 is not clipped)."""
    assert want.std() > 0.05
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * scale)


def test_the_spaced_fixture_covers_what_it_claims():
    cases = spaced_fixtures()
    changes = [json.loads(c["changes"]) for c in cases.values()]
    assert {c.get("timestep_spacing") for c in changes} >= {"leading", "linspace"}
    assert any(c.get("steps_offset") == 1 for c in changes)
    assert any(c.get("clip_sample") is False for c in changes)
    assert {c["sampler"] for c in cases.values()} == {"ddpm", "ddim", "dpm"}
    assert all(c["steps"] < 100 for c in cases.values())  # over 1000-step schedules
    assert sum(c.get("rescale_betas_zero_snr", False) for c in changes) == 3


@pytest.mark.parametrize("name", sorted(spaced_fixtures()))
def test_a_spaced_chain_is_diffusers(tmp_path, name):
    """DDPM and DDIM with diffusers' timestep spacings, steps_offset, clip ranges and no
    clipping, and a DPM-Solver++ folder run with its own scheduler, from the same x_T with the
    same noise at each timestep: within 1e-4 of diffusers' loop."""
    pipeline, spec, tables, noise_fn, fixture = spaced_chain(tmp_path, name)
    if fixture["sampler"] == "dpm":
        assert spec.kind.startswith("dpm++2m") and not spec.clip_x0  # the folder's default
    with torch.no_grad():
        got = sample_loop(
            pipeline.network, fixture["x_T"].clone(), tables, spec, pipeline.diffusion.objective,
            noise_fn,
        )  # fmt: skip
    assert_diffusers_final(got, fixture["final"])


@pytest.mark.parametrize("executor", ["torch", "onnxruntime"])
@pytest.mark.parametrize(
    "name",
    [
        "ddpm-leading-offset1-10",
        "ddim-linspace-eta0.5-10",
        "dpm++2m-sde-karras-12",
        "ddim-zero-snr-trailing-vpred-10",
    ],
)
def test_a_spaced_chain_through_the_engine_is_diffusers(tmp_path, name, executor):
    """The engine's prepared chain on either CPU executor (the fast network, coefficient table
    and fused step; the row-fed executor file) fed the fixture's noise, step by step."""
    from ddpm_fast.engine import Engine
    from ddpm_fast.engine.engine import ChainState

    pipeline, spec, tables, noise_fn, fixture = spaced_chain(tmp_path, name)
    engine = Engine(pipeline, cpu_executor=executor) if executor == "torch" else None
    if engine is None:
        pytest.importorskip("onnxruntime")
        engine = Engine(pipeline, cpu_executor=executor)
    chain = engine.prepare(tables, spec, torch.device("cpu"))
    x_t = fixture["x_T"].clone()
    if executor == "torch":
        state = ChainState.empty(tuple(x_t.shape), torch.device("cpu"))
        state.reset(x_t, torch.zeros(x_t.shape[0], dtype=torch.int64))
        with torch.no_grad():
            for k in range(len(tables)):
                chain.step(state, z=noise_fn(k + 1, tuple(x_t.shape)))
        got = state.x
    else:
        x, x0 = x_t.numpy(), np.zeros(tuple(x_t.shape), np.float32)
        session = chain.session(tuple(x_t.shape), 1)
        for k in range(len(tables)):
            z = noise_fn(k + 1, tuple(x_t.shape)).numpy()
            x, x0 = session.run(None, chain.chain.feeds(x, x0, z, k))
        got = torch.from_numpy(x)
    assert_diffusers_final(got, fixture["final"])


DPM_BAD = {
    "solver_order": (3, "solver_order=3 is not supported"),
    "algorithm_type": ("dpmsolver", "algorithm_type='dpmsolver' is not supported"),
    "use_lu_lambdas": (True, "use_lu_lambdas=True is not supported"),
    "variance_type": ("learned", "variance_type='learned' is not supported"),
    "final_sigmas_type": ("sigma_min", "final_sigmas_type='sigma_min' is not supported"),
    "solver_type": ("heun", "solver_type='heun' is not supported"),
    "euler_at_final": (True, "euler_at_final=True is not supported"),
    "thresholding": (True, "per-sample quantile"),
    "prediction_type": ("flow_prediction", "prediction_type='flow_prediction'"),
}


@pytest.mark.parametrize("field", DPM_BAD)
def test_dpm_solver_options_it_cannot_match_are_one_line_errors(tmp_path, field):
    value, message = DPM_BAD[field]
    folder = copied(tmp_path, "dpm_solver_small")
    edit_json(folder / "scheduler" / "scheduler_config.json", **{field: value})
    with pytest.raises(ConfigError, match=message) as err:
        ddpm_fast.load(folder)
    assert "\n" not in str(err.value) and "scheduler_config.json" in str(err.value)


def test_a_dpm_solver_folder_samples_with_its_solver_by_default(tmp_path, capsys):
    from ddpm_fast.cli import main

    folder = copied(tmp_path, "dpm_solver_small")
    edit_json(folder / "scheduler" / "scheduler_config.json", use_karras_sigmas=True)
    pipeline = ddpm_fast.load(folder)
    spec = pipeline.sampler_spec(steps=20)
    assert (spec.kind, spec.timestep_spacing, spec.clip_x0) == ("dpm++2m-karras", "linspace", False)
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "chains:      sampler dpm++2m-karras, linspace, x0 not clipped" in out
    out = tmp_path / "x.npz"
    assert main(["sample", str(folder), "--steps", "4", "--num", "2", "--out", str(out)]) == 0
    images = np.load(out)["arr_0"].astype(np.int16)  # NHWC uint8

    def drawn(sampler: str) -> np.ndarray:
        x = pipeline.sample(2, steps=4, sampler=sampler, seed=0).permute(0, 2, 3, 1).numpy()
        return np.rint(np.clip(x, 0, 1) * 255).astype(np.int16)

    assert np.abs(images - drawn("dpm++2m-karras")).max() <= 1
    assert np.abs(images - drawn("ddpm")).max() > 10


CLASS_FORWARD = FIXTURES / "class_forward.pt"


@pytest.mark.parametrize("name", ["class_embedding", "class_timestep_scale_shift"])
def test_class_embeddings_are_diffusers(name):
    """UNet2DModel with num_class_embeds (an embedding; the "timestep" type): diffusers' own
    forward with class labels, and the engine's chain against the reference."""
    from ddpm_fast.engine import Engine

    case = torch.load(CLASS_FORWARD, weights_only=True)[name]
    pipeline = ddpm_fast.load(FIXTURES / "class_conditional" / name)
    assert pipeline.num_classes == pipeline.config.num_class_embeds
    for c in case["cases"]:
        with torch.no_grad():
            out = pipeline.network(case["x"], c["t"], class_labels=c["y"])
        assert rel_error(out, c["out"]) <= 1e-5
    options = dict(steps=5, seed=1, class_labels=[1, 2, 3])
    want = pipeline.sample(3, **options)
    assert (Engine(pipeline).sample(3, batch_size=2, **options) - want).abs().max() <= 1e-4


def test_class_embeddings_with_fourier_features_are_refused():
    with pytest.raises(ConfigError, match="fourier"):
        diffusers_unet2d.UnetConfig(time_embedding_type="fourier", num_class_embeds=3)
