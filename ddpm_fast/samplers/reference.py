"""The reference samplers in PyTorch: ``step_tables`` (a sampler module's columns as float64
tensors) and ``denoise_step``/``sample_loop``, which run ``rule``'s update with them.

DDPM and DDIM are denoising-diffusion-pytorch's p_sample_loop and ddim_sample (tests check them
against the library's chains); DPM-Solver++ is diffusers' DPMSolverMultistepScheduler (tests
check it against diffusers' chains).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..options import OBJECTIVES
from ..schedule import Schedule
from . import rule
from .registry import sampler_module
from .spec import SamplerSpec

# (step k counted from 1, shape of the batch) -> standard normal noise for that step.
NoiseFn = Callable[[int, tuple[int, ...]], torch.Tensor]

__all__ = ["OBJECTIVES", "NoiseFn", "SamplerSpec", "StepTables", "chain_tables", "step_tables"]


class StepTables:
    """Coefficients for each step k = 0 .. n-1 of a chain (float64 on the CPU): ``timesteps``,
    ``next_timesteps`` (int64, -1 at the end), one attribute per column of ``rule.TABLE``, and
    ``guidance``: the sampler's ``rule.GUIDANCE`` columns (None where it cannot be guided)."""

    def __init__(self, chain: rule.Chain):
        self.timesteps = torch.as_tensor(np.asarray(chain.timesteps, dtype=np.int64))
        self.next_timesteps = torch.as_tensor(np.asarray(chain.next_timesteps, dtype=np.int64))
        self.learned = chain.learned
        for name in rule.TABLE:
            setattr(self, name, torch.as_tensor(np.asarray(chain.columns[name], np.float64)))
        self.guidance = None
        if chain.guidance is not None:
            self.guidance = {name: torch.as_tensor(np.asarray(chain.guidance[name], np.float64))
                             for name in rule.GUIDANCE}  # fmt: skip

    def __len__(self) -> int:
        return len(self.timesteps)

    def columns(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in rule.TABLE}

    def rows(self, objective: str) -> dict[str, torch.Tensor]:
        """The ``rule.ROW`` columns for a network trained on ``objective``."""
        return rule.row_columns(self.columns(), objective)

    def adds_noise(self, k: int, spec: SamplerSpec | None = None) -> bool:
        return bool(self.noise_on[k] > 0)


def chain_tables(alphas_cumprod, spec: SamplerSpec) -> StepTables:
    """The per-step coefficients of ``spec``'s chain over a schedule's abar (float64)."""
    abar = np.asarray(torch.as_tensor(alphas_cumprod).double().numpy())
    return StepTables(sampler_module(spec.kind).chain(abar, spec))


def step_tables(schedule: Schedule, spec: SamplerSpec) -> StepTables:
    """The per-step coefficients of ``spec``'s chain over ``schedule``, computed in float64."""
    return chain_tables(schedule.alphas_cumprod, spec)


def predict_x0(
    model_output: torch.Tensor, x: torch.Tensor, tables: StepTables, k: int, objective: str
) -> torch.Tensor:
    """The network's estimate of x_0 at step k, before clipping."""
    rows = rule.row_columns({n: getattr(tables, n)[k : k + 1] for n in rule.TABLE}, objective)
    return rule.estimate_x0(float(rows["a"][0]), float(rows["b"][0]), x, model_output)


def denoise_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    tables: StepTables,
    k: int,
    spec: SamplerSpec,
    objective: str,
    noise: torch.Tensor | None,
    x0_prev: torch.Tensor | None = None,
    gradient: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step from the network's output: returns (x_next, clipped x0).

    ``noise`` may be None only where the step adds none (``tables.adds_noise``); ``x0_prev`` is
    the previous step's x0 (None: zeros, the first step); ``gradient``: a classifier's scaled
    gradient at x, which moves the step (``rule.GUIDANCE``; ``ddpm_fast.guidance``).
    """
    c = {name: float(value[k]) for name, value in tables.rows(objective).items()}
    channels = x.shape[1]
    variance_output = None
    if model_output.shape[1] == 2 * channels:  # learned variance: [prediction, frac]
        model_output, variance_output = model_output.chunk(2, dim=1)
    raw = rule.estimate_x0(c["a"], c["b"], x, model_output)
    x0 = raw.clamp(-c["x0_max"], c["x0_max"])
    eps_x0 = raw.clamp(-c["eps_x0_max"], c["eps_x0_max"])
    eps = rule.estimate_eps(c["x0_from_xt"], c["x0_from_eps"], x, eps_x0)
    previous = 0.0 if x0_prev is None else x0_prev
    x_next = rule.combine(c["c_x0"], c["c_xt"], c["c_x0_prev"], c["c_eps"], x0, x, previous, eps)
    if tables.learned and variance_output is None:
        raise ConfigError("variance 'learned_range' needs a network with learned_variance")
    if gradient is not None:
        if tables.guidance is None:
            raise ConfigError(f"classifier guidance runs with ddpm and ddim, not {spec.kind}")
        g = {name: float(value[k]) for name, value in tables.guidance.items()}
        guide = g["guide"]
        if tables.learned:
            low, high = g["guide_log_var_min"], g["guide_log_var_max"]
            guide = rule.learned_log_var(variance_output, low, high).exp()
        x_next = rule.add_guidance(x_next, guide, gradient)
    if not tables.adds_noise(k):
        return x_next, x0
    if tables.learned:
        log_var = rule.learned_log_var(variance_output, c["log_var_min"], c["log_var_max"])
        sigma = (0.5 * log_var).exp()
    else:
        sigma = c["sigma"]
    return rule.add_noise(x_next, c["noise_on"], sigma, noise), x0


def sample_loop(
    network: nn.Module,
    x: torch.Tensor,
    tables: StepTables,
    spec: SamplerSpec,
    objective: str,
    noise_fn: NoiseFn,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    class_labels: torch.Tensor | None = None,
    guidance: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the reverse chain from x_T; returns x_0 in [-1, 1] (the network's data range).
    ``class_labels`` [batch] go to a class-conditional network at every step; ``guidance(x,
    k)``: a classifier's scaled gradient at step k's input, which moves its step.

    Self-conditioning networks get the previous step's clipped x0 (zeros at the first step), as
    do the multistep solvers. ``on_step(k, x)`` is called after each step k = 1 .. n with its
    output.
    """
    self_condition = getattr(network, "self_condition", False)
    x0 = None
    for k in range(len(tables)):
        t = torch.full((x.shape[0],), int(tables.timesteps[k]), device=x.device, dtype=torch.long)
        labels = {} if class_labels is None else {"class_labels": class_labels}
        model_output = network(x, t, x0 if self_condition else None, **labels)
        noise = noise_fn(k + 1, tuple(x.shape)) if tables.adds_noise(k) else None
        gradient = None if guidance is None else guidance(x, k)
        x, x0 = denoise_step(model_output, x, tables, k, spec, objective, noise, x0, gradient)
        if on_step is not None:
            on_step(k + 1, x)
    return x
