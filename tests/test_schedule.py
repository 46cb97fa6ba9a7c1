"""Schedules and DDIM timesteps against denoising-diffusion-pytorch 1.6.4 (fixture buffers)."""

import json

import pytest
import torch

from ddpm_fast.errors import ConfigError
from ddpm_fast.schedule import Schedule, ScheduleConfig, sampling_timesteps

from .helpers import chain_fixtures

CASES = {name: json.loads(case["diffusion_kwargs"]) for name, case in chain_fixtures().items()}


@pytest.mark.parametrize("name", CASES)
def test_tables_equal_the_library_buffers(name):
    kwargs = CASES[name]
    schedule = Schedule(ScheduleConfig(kwargs["beta_schedule"], kwargs["timesteps"]))
    stored = chain_fixtures()[name]["buffers"]
    ours = schedule.library_buffers()
    assert set(ours) <= set(stored)
    for key, table in ours.items():
        assert table.dtype == torch.float32
        torch.testing.assert_close(table, stored[key], rtol=2.4e-7, atol=0, msg=key)


def test_tables_are_float64():
    schedule = Schedule(ScheduleConfig("cosine", 1000))
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert schedule.posterior_mean_coef1.dtype == torch.float64


@pytest.mark.parametrize(
    ("timesteps", "steps", "expected"),
    [
        (10, 10, [(9, 8), (8, 7), (7, 6), (6, 5), (5, 4), (4, 3), (3, 2), (2, 1), (1, 0), (0, -1)]),
        (1000, 4, [(999, 749), (749, 499), (499, 249), (249, -1)]),
        (1000, 1, [(999, -1)]),
        (20, 7, [(19, 16), (16, 13), (13, 10), (10, 7), (7, 4), (4, 1), (1, -1)]),
    ],
)
def test_sampling_timesteps_are_the_librarys_pairs(timesteps, steps, expected):
    assert sampling_timesteps(timesteps, steps) == expected


def test_unknown_schedule_and_bad_lengths_are_config_errors():
    with pytest.raises(ConfigError, match="unknown beta schedule 'quadratic'"):
        ScheduleConfig("quadratic")
    with pytest.raises(ConfigError, match="timesteps must be at least 1"):
        ScheduleConfig("linear", 0)
    with pytest.raises(ConfigError, match="steps must be between 1 and the schedule's 10"):
        sampling_timesteps(10, 11)


def test_a_schedule_that_reaches_beta_one_is_refused():
    """The library's linear schedule at 20 steps has beta_end = 1: every table divides by zero."""
    with pytest.raises(ConfigError, match="betas outside"):
        Schedule(ScheduleConfig("linear", 20))


def test_schedule_kwargs_reach_the_schedule():
    plain = Schedule(ScheduleConfig("sigmoid", 100))
    steep = Schedule(ScheduleConfig("sigmoid", 100, {"start": -2, "end": 4, "tau": 0.5}))
    assert not torch.allclose(plain.betas, steep.betas)
    with pytest.raises(ConfigError, match="bad arguments for the cosine schedule"):
        Schedule(ScheduleConfig("cosine", 100, {"tau": 2}))
