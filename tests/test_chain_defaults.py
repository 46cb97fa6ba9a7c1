"""A model's own chain defaults (``DiffusionConfig``: sampler, timestep spacing, steps_offset,
clipping, DDIM's eps) and the rule's ``eps_x0_max`` column: how they reach the SamplerSpec, how
they round-trip through files, and that the clipped path keeps its exact numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast.errors import ConfigError
from ddpm_fast.pipeline import DiffusionConfig
from ddpm_fast.samplers import SamplerSpec, denoise_step, rule, step_tables
from ddpm_fast.samplers.spacing import spaced_timesteps
from ddpm_fast.schedule import Schedule, ScheduleConfig

FIXTURES = Path(__file__).parent / "fixtures" / "diffusers"
CHAIN_FIELDS = dict(
    sampler="ddim",
    timestep_spacing="leading",
    steps_offset=1,
    clip_x0=False,
    clip_range=2.5,
    eps_from_clipped_x0=False,
)


def test_the_chain_defaults_round_trip_and_old_dicts_load_as_before():
    config = DiffusionConfig(image_size=8, objective="pred_noise", **CHAIN_FIELDS)
    again = DiffusionConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    plain = DiffusionConfig(image_size=8)
    # A model without chain defaults writes the same dict as before they existed...
    assert set(plain.to_dict()) == {"image_size", "schedule", "objective", "variance"}
    # ...and such a dict loads with denoising-diffusion-pytorch's behaviour.
    old = DiffusionConfig.from_dict(plain.to_dict())
    assert old == plain and old.sampler is None and old.eps_from_clipped_x0 is True


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sampler", "euler", "unknown sampler"),
        ("timestep_spacing", "even", "unknown timestep_spacing"),
        ("steps_offset", -1, "steps_offset must be at least 0"),
        ("clip_x0", 1, "clip_x0 must be true or false"),
        ("clip_range", 0.0, "clip_range must be positive"),
        ("eps_from_clipped_x0", "no", "eps_from_clipped_x0 must be true or false"),
    ],
)
def test_bad_chain_defaults_are_config_errors(field, value, message):
    with pytest.raises(ConfigError, match=message):
        DiffusionConfig(**{field: value})


def test_the_spec_takes_the_models_defaults_and_an_explicit_spacing_wins():
    pipeline = ddpm_fast.load(beta_schedule="linear", timesteps=100)
    pipeline.diffusion = DiffusionConfig(
        schedule=pipeline.diffusion.schedule, objective="pred_noise", **CHAIN_FIELDS
    )
    spec = pipeline.sampler_spec(steps=10)
    assert (spec.kind, spec.timestep_spacing, spec.steps_offset) == ("ddim", "leading", 1)
    assert (spec.clip_x0, spec.clip_range, spec.eps_from_clipped_x0) == (False, 2.5, False)
    assert step_tables(pipeline.schedule, spec).timesteps.tolist()[-1] == 1
    explicit = pipeline.sampler_spec("ddpm", 10, timestep_spacing="trailing")
    assert (explicit.kind, explicit.timestep_spacing) == ("ddpm", "trailing")
    plain = ddpm_fast.load().sampler_spec(steps=10)
    assert (plain.kind, plain.timestep_spacing) == ("ddpm", "library")
    assert plain.eps_from_clipped_x0 and plain.clip_x0


def test_a_folders_scheduler_fills_the_defaults(tmp_path):
    folder = Path(shutil.copytree(FIXTURES / "ddpm_cifar10_small", tmp_path / "f"))
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(timestep_spacing="trailing", steps_offset=1, clip_sample_range=1.5)
    config_file.write_text(json.dumps(config))
    d = ddpm_fast.load(folder).diffusion
    assert (d.sampler, d.timestep_spacing, d.steps_offset) == (None, "trailing", 1)
    assert (d.clip_x0, d.clip_range, d.eps_from_clipped_x0) == (True, 1.5, False)
    config.update(clip_sample=False)
    del config["timestep_spacing"]  # diffusers' default: leading
    config_file.write_text(json.dumps(config))
    d = ddpm_fast.load(folder).diffusion
    assert (d.timestep_spacing, d.clip_x0) == ("leading", False)
    ddim = ddpm_fast.load(FIXTURES / "fourier_scale_shift").diffusion
    assert (ddim.sampler, ddim.timestep_spacing) == ("ddim", "trailing")


def test_a_folders_defaults_survive_ddpm_fasts_own_file(tmp_path):
    pipeline = ddpm_fast.load(FIXTURES / "fourier_scale_shift")
    again = ddpm_fast.load(ddpm_fast.save_pipeline(pipeline, tmp_path / "m.safetensors"))
    assert again.diffusion == pipeline.diffusion
    assert again.sampler_spec(steps=10) == pipeline.sampler_spec(steps=10)


def test_info_prints_the_chain_defaults(capsys):
    from ddpm_fast.cli import main

    assert main(["info", str(FIXTURES / "fourier_scale_shift")]) == 0
    out = capsys.readouterr().out
    assert "chains:      sampler ddim, trailing, x0 clipped to [-1, 1], DDIM's eps from the " \
        "unclipped x0" in out  # fmt: skip
    assert "not yet honoured" not in out


# the rule's eps_x0_max column


def test_eps_from_the_clipped_x0_keeps_the_columns_exact_numbers():
    schedule = Schedule(ScheduleConfig("cosine", 40))
    for kind in ("ddpm", "ddim", "dpm++2m"):
        for clip in (True, False):
            tables = step_tables(schedule, SamplerSpec(kind, 9, clip_x0=clip))
            assert torch.equal(tables.eps_x0_max, tables.x0_max)
    unclipped = step_tables(schedule, SamplerSpec("ddim", 9, eps_from_clipped_x0=False))
    assert (unclipped.eps_x0_max == rule.FLOAT32_MAX).all()
    assert (unclipped.x0_max == 1).all()


def test_ddim_eps_from_the_unclipped_x0_is_the_networks_own():
    """With eps_from_clipped_x0=False a pred_noise DDIM step uses the network's output as eps:
    x_next = sqrt(abar_next) clip(x0) + sqrt(1 - abar_next - sigma^2) out (+ sigma z)."""
    schedule = Schedule(ScheduleConfig("linear", 100))
    spec = SamplerSpec("ddim", 10, eta=0.5, eps_from_clipped_x0=False)
    tables = step_tables(schedule, spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 1.2 + 0.1
    out = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 0.9
    z = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    k = 1
    got, _ = denoise_step(out, x, tables, k, spec, "pred_noise", z)
    abar = schedule.alphas_cumprod
    t, prev = int(tables.timesteps[k]), int(tables.timesteps[k]) - 10
    raw = (x - (1 - abar[t]).sqrt() * out) / abar[t].sqrt()
    assert (raw.abs() > 1).any(), "the clip must bite for this test to mean anything"
    sigma = 0.5 * ((1 - abar[prev]) / (1 - abar[t]) * (1 - abar[t] / abar[prev])).sqrt()
    want = abar[prev].sqrt() * raw.clamp(-1, 1) + (1 - abar[prev] - sigma**2).sqrt() * out
    want = want + sigma * z
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    dd_pytorch = SamplerSpec("ddim", 10, eta=0.5)
    dd_tables = step_tables(schedule, dd_pytorch)
    clipped, _ = denoise_step(out, x, dd_tables, k, dd_pytorch, "pred_noise", z)
    assert (clipped - got).abs().max() > 1e-3


def test_ddim_with_diffusers_spacing_lands_where_diffusers_does():
    """DDIMScheduler.step's previous timestep is t - T // steps, not the next visited one (they
    differ for linspace)."""
    schedule = Schedule(ScheduleConfig("linear", 100))
    spec = SamplerSpec("ddim", 7, timestep_spacing="linspace")
    tables = step_tables(schedule, spec)
    t = spaced_timesteps(100, 7, "linspace")
    assert tables.timesteps.tolist() == t.tolist() == [99, 82, 66, 50, 33, 16, 0]
    abar = schedule.alphas_cumprod.numpy()
    landing = t - 100 // 7
    want = np.where(landing >= 0, np.sqrt(abar[np.maximum(landing, 0)]), 1.0)
    np.testing.assert_allclose(tables.c_x0.numpy(), want, rtol=1e-12)


def test_ddpm_refuses_a_last_step_where_diffusers_adds_noise():
    schedule = Schedule(ScheduleConfig("linear", 100))
    spec = SamplerSpec("ddpm", 10, variance="fixed_large", timestep_spacing="trailing")
    with pytest.raises(ConfigError, match="ends the 10-step chain at timestep 9"):
        step_tables(schedule, spec)
    small = SamplerSpec("ddpm", 10, timestep_spacing="leading", steps_offset=1)
    assert step_tables(schedule, small).timesteps.tolist()[-1] == 1  # sigma 1e-10 there: left out


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_which_steps_add_noise_is_the_samplers_word_with_diffusers_spacings(spacing):
    """format.expected_noise_steps (what an ONNX file's metadata is checked against) agrees with
    the tables where DDIM lands on t - T // steps."""
    from ddpm_fast.export.format import expected_noise_steps

    schedule = Schedule(ScheduleConfig("diffusers_linear", 100))
    for kind, eta in (("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.3), ("dpm++2m-sde", 0.0)):
        for steps in (1, 7, 10, 33):
            for offset in (0, 1):
                spec = SamplerSpec(kind, steps, eta, timestep_spacing=spacing, steps_offset=offset)
                tables = step_tables(schedule, spec)
                noise = "".join("1" if tables.adds_noise(k) else "0" for k in range(steps))
                assert noise == expected_noise_steps(kind, steps, eta), (spec, noise)


def test_a_chain_it_refuses_fails_before_anything_is_written(tmp_path, capsys):
    from ddpm_fast.cli import main

    folder = Path(shutil.copytree(FIXTURES / "ddpm_cifar10_small", tmp_path / "f"))
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(
        json.dumps({**json.loads(config_file.read_text()), "timestep_spacing": "trailing"})
    )  # fixed_large variance: diffusers adds noise at the last timestep, 99
    out = tmp_path / "out" / "x.png"
    out.parent.mkdir()
    assert main(["sample", str(folder), "--steps", "10", "--num", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "ends the 10-step chain at timestep 99" in err and "\n" not in err
    assert list(out.parent.iterdir()) == []


def test_a_zero_terminal_snr_schedule_keeps_every_column_finite():
    """diffusers' rescale_betas_zero_snr: abar_T = 0; the columns of DDPM, DDIM and DPM-Solver
    stay finite (1 / sqrt(abar) has a stand-in; DPM-Solver's abar_T is 2**-24), and a pred_noise
    network is refused where the chain visits t = T - 1."""
    config = ScheduleConfig("diffusers_linear", 100, {"rescale_zero_snr": 1})
    schedule = Schedule(config)
    assert schedule.alphas_cumprod[-1] == 0 and schedule.betas[-1] == 1
    assert (schedule.alphas_cumprod[:-1] > 0).all()
    for spec in (
        SamplerSpec("ddpm", 10, timestep_spacing="trailing"),
        SamplerSpec("ddim", 10, 0.5, timestep_spacing="trailing", eps_from_clipped_x0=False),
        SamplerSpec("dpm++2m-sde", 10, timestep_spacing="linspace", clip_x0=False),
    ):
        tables = step_tables(schedule, spec)
        assert tables.timesteps[0] == 99
        for objective in ("pred_v", "pred_x0"):
            for name, column in tables.rows(objective).items():
                assert torch.isfinite(column).all(), (spec.kind, objective, name)
        if spec.kind != "dpm++2m-sde":  # DPM-Solver's abar_T is 2**-24: pred_noise is finite
            with pytest.raises(ConfigError, match="cannot step from alphas_cumprod = 0"):
                tables.rows("pred_noise")
    leading = step_tables(schedule, SamplerSpec("ddpm", 10, timestep_spacing="leading"))
    assert torch.isfinite(torch.stack(list(leading.rows("pred_noise").values()))).all()
    with pytest.raises(ConfigError, match="betas outside"):
        Schedule(ScheduleConfig("diffusers_linear", 100, {"beta_end": 1.0}))
