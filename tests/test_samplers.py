"""The reference samplers against denoising-diffusion-pytorch 1.6.4's p_sample_loop and
ddim_sample (fixtures made with its own noise, which the tests replay)."""

import json

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast.errors import ConfigError
from ddpm_fast.samplers import OBJECTIVES, SAMPLERS, SPACINGS, SamplerSpec, sample_loop, step_tables
from ddpm_fast.samplers.spacing import spaced_timesteps
from ddpm_fast.schedule import Schedule, ScheduleConfig

from .helpers import chain_fixtures, network_fixtures, rel_error, unstored_options

CHAINS = list(chain_fixtures())


def library_diffusion_file(tmp_path, name: str):
    """The GaussianDiffusion state_dict of a chain fixture, as the library would save it."""
    case = chain_fixtures()[name]
    weights = network_fixtures()[case["network"]]["state_dict"]
    state = {f"model.{k}": v for k, v in weights.items()} | case["buffers"]
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    return path


def load_chain(tmp_path, name: str):
    case = chain_fixtures()[name]
    path = library_diffusion_file(tmp_path, name)
    return ddpm_fast.load(path, image_size=case["image_size"], **unstored_options(case["network"]))


def replay(noises):
    """A noise function that hands out the library's recorded draws in order."""
    draws = iter(noises)

    def noise_fn(step, shape):
        noise = next(draws)
        assert tuple(noise.shape) == shape
        return noise

    return noise_fn


@pytest.mark.parametrize("name", CHAINS)
def test_chain_equals_the_library(tmp_path, name):
    case = chain_fixtures()[name]
    kwargs = json.loads(case["diffusion_kwargs"])
    pipeline = load_chain(tmp_path, name)
    # Schedule and objective are read from the file's buffers, not passed.
    assert pipeline.diffusion.schedule.name == kwargs["beta_schedule"]
    assert pipeline.diffusion.schedule.timesteps == kwargs["timesteps"]
    assert pipeline.diffusion.objective == kwargs["objective"]

    steps = kwargs.get("sampling_timesteps", kwargs["timesteps"])
    sampler = "ddim" if steps < kwargs["timesteps"] else "ddpm"
    spec = pipeline.sampler_spec(sampler, steps, kwargs.get("ddim_sampling_eta", 0.0))
    noises = list(case["step_noises"])
    if sampler == "ddim":  # the library draws noise at every DDIM step, used or not
        noises = [n for k, n in enumerate(noises) if spec.eta > 0 and k < steps - 1]
    tables = step_tables(pipeline.schedule, spec)
    trajectory = [case["initial_noise"]]
    with torch.no_grad():
        sample_loop(
            pipeline.network,
            case["initial_noise"],
            tables,
            spec,
            pipeline.diffusion.objective,
            replay(noises),
            on_step=lambda k, x: trajectory.append(x),
        )
    trajectory = (torch.stack(trajectory, dim=1) + 1) * 0.5
    assert trajectory.shape == case["trajectory"].shape
    error = rel_error(trajectory, case["trajectory"])
    assert error <= 1e-5


def test_pipeline_sample_takes_the_callers_initial_noise(tmp_path):
    """eta = 0 DDIM is deterministic given x_T: the public API reproduces the library."""
    case = chain_fixtures()["ddim_eta0_pred_noise"]
    pipeline = load_chain(tmp_path, "ddim_eta0_pred_noise")
    images = pipeline.sample(
        2, sampler="ddim", steps=7, initial_noise=case["initial_noise"], seed=123
    )
    assert rel_error(images, case["trajectory"][:, -1]) <= 1e-5


def test_ddpm_tables_at_full_length_are_the_posterior():
    pipeline = ddpm_fast.load(beta_schedule="cosine", timesteps=50)
    schedule = pipeline.schedule
    tables = step_tables(schedule, SamplerSpec("ddpm", 50))
    t = tables.timesteps
    assert t.tolist() == list(range(49, -1, -1))
    torch.testing.assert_close(tables.c_x0, schedule.posterior_mean_coef1[t], rtol=1e-10, atol=0)
    torch.testing.assert_close(tables.c_xt, schedule.posterior_mean_coef2[t], rtol=1e-10, atol=0)
    sigma = schedule.posterior_variance[t].sqrt()
    torch.testing.assert_close(tables.sigma[:-1], sigma[:-1], rtol=1e-10, atol=0)
    assert tables.sigma[-1] == 0
    large = step_tables(schedule, SamplerSpec("ddpm", 50, variance="fixed_large"))
    torch.testing.assert_close(large.sigma[:-1], schedule.betas[t[:-1]].sqrt(), rtol=1e-10, atol=0)


def test_ddim_with_eta_one_has_the_respaced_ddpm_variance():
    """DDIM's sigma at eta = 1 is the posterior standard deviation of the respaced chain."""
    schedule = ddpm_fast.load().schedule
    ddim = step_tables(schedule, SamplerSpec("ddim", 25, eta=1.0))
    ddpm = step_tables(schedule, SamplerSpec("ddpm", 25))
    torch.testing.assert_close(ddim.sigma, ddpm.sigma, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be at least 1"),
        ({"steps": 1001}, "steps must be between 1"),
        ({"sampler": "euler"}, "unknown sampler"),
        ({"eta": -0.5, "sampler": "ddim"}, "eta must be at least 0"),
        ({"seed": -1}, "seed must be"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"initial_noise": torch.randn(3, 1, 8, 8)}, "initial_noise must have shape"),
        ({"initial_noise": torch.randn(2, 3, 8, 8)}, "takes 1 channels"),
    ],
)
def test_bad_sampling_arguments_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ddpm_fast.load().sample(2, **kwargs)


def test_zero_images_is_a_config_error():
    with pytest.raises(ConfigError, match="number of images must be at least 1"):
        ddpm_fast.load().sample(0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_chain_of_a_short_schedule_is_finite_or_refused(sampler):
    # Every steps count of each spacing, for every objective: finite columns, distinct timesteps
    # (no zero-length step), or a one-line ConfigError when the chain is built.
    schedule = Schedule(ScheduleConfig("linear", 100))
    total = schedule.num_timesteps
    refused = {}
    for spacing in SPACINGS:
        for steps in range(1, total + 1):
            spec = SamplerSpec(sampler, steps, timestep_spacing=spacing)
            try:
                with np.errstate(all="ignore"):  # a NaN must show in the columns, not warn
                    tables = step_tables(schedule, spec)
                    rows = [tables.columns()] + [tables.rows(o) for o in OBJECTIVES]
            except ConfigError as error:
                assert "\n" not in str(error)
                refused.setdefault(spacing, []).append(steps)
                continue
            for objective, columns in zip(("table", *OBJECTIVES), rows, strict=True):
                for name, column in columns.items():
                    finite = torch.isfinite(torch.as_tensor(column)).all()
                    assert finite, (sampler, spacing, steps, objective, name)
            t = tables.timesteps.tolist()
            assert len(set(t)) == len(t) or sampler.endswith("-karras"), (spacing, steps)
    solver = sampler.startswith("dpm++") and not sampler.endswith("-karras")
    assert refused.get("linspace", []) == refused.get("leading", []) == ([total] if solver else [])
    assert "library" not in refused
    # Karras' sigmas do not depend on the spacing.
    overshoot = [n for n in range(1, total + 1) if len(np.arange(total, 0, -total / n)) != n]
    assert overshoot  # 29, 31, 58, 62 and 97 at T = 100
    assert refused.get("trailing", []) == ([] if sampler.endswith("-karras") else overshoot)


def test_a_trailing_count_whose_float_step_overshoots_says_what_runs():
    # diffusers' arange(1000, 0, -1000 / 61) has 62 points, the last timestep -1.
    message = (
        r"timestep_spacing 'trailing' with 61 steps gives 62 timesteps on the schedule's 1000 "
        r".* reaches timestep -1, .*; use 60 or 62 steps, or another spacing$"
    )
    with pytest.raises(ConfigError, match=message):
        ddpm_fast.load().sample(1, sampler="ddim", steps=61, timestep_spacing="trailing")
    assert len(spaced_timesteps(1000, 62, "trailing")) == 62
