"""DPM-Solver++(2M) against diffusers 0.42.1's DPMSolverMultistepScheduler: the same timesteps,
sigmas and chains (fixtures made by tests/fixtures/make_dpm_solver.py, around a model function
both sides run: tests/fixtures/gaussian_denoiser.py)."""

import json
import re
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast.cli import main
from ddpm_fast.engine import Engine
from ddpm_fast.errors import ConfigError
from ddpm_fast.samplers import SamplerSpec, chain_tables, sample_loop
from ddpm_fast.samplers.dpm_solver import timesteps_and_sigmas

from .fixtures.gaussian_denoiser import GaussianDenoiser
from .helpers import rel_error

FIXTURE = Path(__file__).parent / "fixtures" / "dpm_solver" / "chains.pt"
TOLERANCE = 1e-4
# The capped cosine schedule ends at abar = 2.4e-9 (sigma = 2e4): the first step's x0 cancels
# two terms of 2e4 in float32, and diffusers' own chain is 1.4e-4 off a float64 run of it (ours
# 0.6e-4); the error stays that of the first step.
ILL_CONDITIONED = {"eps-linspace-20-cosine": 3e-4}


@cache
def cases() -> dict:
    data = torch.load(FIXTURE, weights_only=True)
    return {name: case for name, case in data.items() if name != "versions"}


def spec_of(config: dict) -> SamplerSpec:
    kind = "dpm++2m" + ("-sde" if config["sde"] else "") + ("-karras" if config["karras"] else "")
    return SamplerSpec(
        kind,
        config["steps"],
        timestep_spacing=config["timestep_spacing"],
        steps_offset=config["steps_offset"],
        clip_x0=False,  # diffusers' DPM-Solver does not clip (thresholding=False)
    )


def test_the_fixture_covers_what_it_claims():
    configs = [json.loads(case["config"]) for case in cases().values()]
    assert {c["objective"] for c in configs} == {"pred_noise", "pred_x0", "pred_v"}
    assert {c["timestep_spacing"] for c in configs} == {"linspace", "leading", "trailing"}
    assert {c["steps"] for c in configs} == {10, 20}
    assert {c["karras"] for c in configs} == {True, False}
    assert {c["sde"] for c in configs} == {True, False}


@pytest.mark.parametrize("name", sorted(cases()))
def test_timesteps_and_sigmas_are_diffusers(name):
    case = cases()[name]
    spec = spec_of(json.loads(case["config"]))
    t, sigmas = timesteps_and_sigmas(case["alphas_cumprod"].double().numpy(), spec)
    np.testing.assert_array_equal(t, case["timesteps"].numpy())
    np.testing.assert_allclose(sigmas, case["sigmas"].double().numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", sorted(cases()))
def test_chain_equals_diffusers(name):
    case = cases()[name]
    config = json.loads(case["config"])
    spec = spec_of(config)
    x_t = case["initial_noise"]
    model = GaussianDenoiser(case["alphas_cumprod"], config["objective"], x_t.shape[1:])
    tables = chain_tables(case["alphas_cumprod"], spec)
    noises = iter(case["noises"])
    trajectory = []
    with torch.no_grad():
        sample_loop(
            model,
            x_t,
            tables,
            spec,
            config["objective"],
            lambda step, shape: next(noises),
            on_step=lambda k, x: trajectory.append(x),
        )
    expected = case["trajectory"]
    assert len(trajectory) == len(expected) == spec.steps
    for k, (ours, theirs) in enumerate(zip(trajectory, expected, strict=True)):
        assert rel_error(ours, theirs) <= ILL_CONDITIONED.get(name, TOLERANCE), (name, k)
    # Not a chain that stands still: x_T and x_0 differ.
    assert rel_error(x_t, expected[-1]) > 0.1


def test_the_final_step_returns_x0_and_the_first_has_no_history():
    spec = SamplerSpec("dpm++2m", 10)
    tables = chain_tables(torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64), spec)
    assert tables.c_x0_prev[0] == 0 and tables.c_x0_prev[-1] == 0
    assert (tables.c_x0_prev[1:-1] != 0).all()  # order 2 in between
    assert tables.c_x0[-1] == 1 and tables.c_xt[-1] == 0
    assert not any(tables.adds_noise(k) for k in range(10))
    sde = chain_tables(
        torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64), SamplerSpec("dpm++2m-sde", 10)
    )
    assert [sde.adds_noise(k) for k in range(10)] == [True] * 9 + [False]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(kind="dpm++3m"), "sampler"),
        (dict(kind="DPM++2M"), "sampler"),
        (dict(kind="dpm++2m", eta=0.5), "eta"),
        (dict(kind="dpm++2m", timestep_spacing="karras"), "timestep_spacing"),
        (dict(kind="dpm++2m", steps_offset=-1), "steps_offset"),
    ],
)
def test_bad_specs_are_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SamplerSpec(**kwargs)


def forbid_the_network(pipeline):
    """A hook that fails the test if anything evaluates the network."""

    def called(*args):
        raise AssertionError("the network ran before the chain was refused")

    return pipeline.network.register_forward_pre_hook(called)


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
@pytest.mark.parametrize("name", ["dpm++2m", "dpm++2m-sde"])
def test_a_chain_that_repeats_a_timestep_is_refused_up_front(name, spacing, tmp_path):
    # steps + 1 points over the schedule's T timesteps: at steps = T one repeats (leading: all),
    # h = 0 and DPM-Solver divides by it; diffusers 0.42.1 gives NaN there too.
    pipeline = ddpm_fast.load()
    total = pipeline.schedule.num_timesteps
    message = (
        rf"sampler {re.escape(name)} with {total} steps and timestep_spacing '{spacing}' visits "
        rf"timestep \d+ twice .* use at most {total - 1} steps, timestep_spacing 'trailing', "
        rf"or sampler {re.escape(name)}-karras$"
    )
    chain = dict(sampler=name, steps=total, timestep_spacing=spacing)
    engine = Engine(pipeline, cpu_executor="torch")
    hook = forbid_the_network(pipeline)
    try:
        for run in (
            lambda: pipeline.sample(1, **chain),
            lambda: engine.sample(1, **chain),
            lambda: pipeline.sample_to(tmp_path / "x.png", 1, **chain),
            lambda: engine.sample_to(tmp_path / "x.npz", 1, **chain),
        ):
            with pytest.raises(ConfigError, match=message):
                run()
    finally:
        hook.remove()
    assert not engine._chains  # nothing prepared, nothing folded
    assert not list(tmp_path.iterdir())  # nothing written
    # What the message offers instead runs: finite columns, every step a falling sigma.
    abar = pipeline.schedule.alphas_cumprod
    for spec in (
        SamplerSpec(name, total - 1, timestep_spacing=spacing),
        SamplerSpec(name, total, timestep_spacing="trailing"),
        SamplerSpec(f"{name}-karras", total, timestep_spacing=spacing),
    ):
        assert (np.diff(timesteps_and_sigmas(abar.double().numpy(), spec)[1]) < 0).all()
        rows = chain_tables(abar, spec).rows("pred_noise")
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in rows.values()), spec


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_the_cli_refuses_it_in_one_line_before_sampling(spacing, tmp_path, capsys):
    out = tmp_path / "x.png"
    argv = ["sample", "--sampler", "dpm++2m", "--steps", "1000", "--timestep-spacing", spacing]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ddpm-fast: error: sampler dpm++2m with 1000 steps and "
                          f"timestep_spacing '{spacing}' visits timestep")  # fmt: skip
    assert err.count("\n") == 1 and "Warning" not in err
    assert not list(tmp_path.iterdir())


def test_every_solver_chain_on_the_default_schedule_falls_or_is_refused():
    # Every steps count of each spacing: the sigmas fall at every step, or the chain is a
    # ConfigError; on the default schedule only steps = T of linspace and leading are refused
    # (and trailing's counts whose float step overshoots, for every sampler: test_samplers).
    abar = ddpm_fast.load().schedule.alphas_cumprod.double().numpy()
    total = len(abar)
    for name in ("dpm++2m", "dpm++2m-sde"):
        for spacing in ("library", "linspace", "leading", "trailing"):
            refused = []
            for steps in range(1, total + 1):
                spec = SamplerSpec(name, steps, timestep_spacing=spacing)
                try:
                    with np.errstate(all="raise"):
                        _, sigmas = timesteps_and_sigmas(abar, spec)
                except ConfigError as error:
                    assert "\n" not in str(error)
                    refused.append(steps)
                    continue
                assert (np.diff(sigmas) < 0).all(), (name, spacing, steps)
            if spacing in ("linspace", "leading"):
                assert refused == [total], (name, spacing)
            elif spacing == "library":
                assert refused == [], (name, spacing)
