"""The reference samplers: DDPM ancestral sampling and DDIM, as denoising-diffusion-pytorch
runs them.

Both are one update rule over a table of per-step coefficients (float64, from ``schedule``):

    x0     = the network's prediction of x_0 (by objective), clipped to [-1, 1]
    eps    = (sqrt(1/abar_t) x_t - x0) / sqrt(1/abar_t - 1)           (re-derived after clipping)
    x_next = c_x0 x0 + c_xt x_t + c_eps eps + sigma noise

DDPM (steps == T): c_x0, c_xt are the posterior mean coefficients and sigma^2 the posterior
variance ("fixed_small", the library's choice) or beta_t ("fixed_large", the original DDPM
CIFAR-10 model's). Fewer steps respace the chain over the library's DDIM timesteps, with beta'
= 1 - abar_t / abar_next. ``learned_range`` interpolates log sigma^2 between the two by the
network's extra output channels, as the library's LearnedGaussianDiffusion does.
DDIM: c_x0 = sqrt(abar_next), c_eps = sqrt(1 - abar_next - sigma^2),
sigma = eta sqrt((1 - abar_t / abar_next)(1 - abar_next) / (1 - abar_t)).
The last step (t_next = -1) returns x0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .options import OBJECTIVES, SAMPLERS, VARIANCES
from .schedule import Schedule, sampling_timesteps

# (step k counted from 1, shape of the batch) -> standard normal noise for that step.
NoiseFn = Callable[[int, tuple[int, ...]], torch.Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    """Which chain to run: sampler kind, number of network evaluations, DDIM's eta, and the
    DDPM variance (ignored by DDIM)."""

    kind: str = "ddpm"
    steps: int = 1000
    eta: float = 0.0
    variance: str = "fixed_small"

    def __post_init__(self) -> None:
        if self.kind not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.kind!r}; known: {', '.join(SAMPLERS)}")
        if self.variance not in VARIANCES:
            raise ConfigError(f"unknown variance {self.variance!r}; known: {', '.join(VARIANCES)}")
        if not self.eta >= 0:
            raise ConfigError(f"eta must be >= 0, got {self.eta}")


@dataclass
class StepTables:
    """Coefficients for each step k = 0 .. n-1 of a chain (float64 on the CPU)."""

    timesteps: torch.Tensor  # t at step k (int64)
    next_timesteps: torch.Tensor  # t_next at step k, -1 at the end (int64)
    x0_from_xt: torch.Tensor  # sqrt(1 / abar_t)
    x0_from_eps: torch.Tensor  # sqrt(1 / abar_t - 1)
    x0_from_xt_v: torch.Tensor  # sqrt(abar_t), for pred_v
    x0_from_v: torch.Tensor  # sqrt(1 - abar_t), for pred_v
    c_x0: torch.Tensor
    c_xt: torch.Tensor
    c_eps: torch.Tensor
    sigma: torch.Tensor  # 0 where the step adds no noise
    log_var_min: torch.Tensor  # learned_range: log sigma^2 at frac 0 and 1
    log_var_max: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def adds_noise(self, k: int, spec: SamplerSpec) -> bool:
        if spec.kind == "ddpm" and spec.variance == "learned_range":
            return bool(self.next_timesteps[k] >= 0)
        return bool(self.sigma[k] > 0)


def step_tables(schedule: Schedule, spec: SamplerSpec) -> StepTables:
    """The per-step coefficients of ``spec``'s chain over ``schedule``, computed in float64."""
    pairs = sampling_timesteps(schedule.num_timesteps, spec.steps)
    t = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    t_next = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    abar = schedule.alphas_cumprod
    a_t = abar[t]
    last = t_next < 0
    a_next = torch.where(last, torch.ones_like(a_t), abar[t_next.clamp(min=0)])

    zero = torch.zeros_like(a_t)
    if spec.kind == "ddpm":
        beta = 1.0 - a_t / a_next  # respaced beta; beta_t itself when t_next == t - 1
        c_x0 = beta * torch.sqrt(a_next) / (1.0 - a_t)
        c_xt = (1.0 - a_next) * torch.sqrt(1.0 - beta) / (1.0 - a_t)
        c_eps = zero
        posterior_variance = beta * (1.0 - a_next) / (1.0 - a_t)
        variance = beta if spec.variance == "fixed_large" else posterior_variance
        sigma = torch.where(last, zero, torch.sqrt(variance))
        log_var_min = torch.log(posterior_variance.clamp(min=1e-20))
        log_var_max = torch.log(beta)
    else:
        sigma = spec.eta * torch.sqrt((1 - a_t / a_next) * (1 - a_next) / (1 - a_t))
        sigma = torch.where(last, zero, sigma)
        c_x0 = torch.sqrt(a_next)
        c_xt = zero
        c_eps = torch.where(last, zero, torch.sqrt((1 - a_next - sigma**2).clamp(min=0)))
        log_var_min = log_var_max = zero
    return StepTables(
        timesteps=t,
        next_timesteps=t_next,
        x0_from_xt=schedule.sqrt_recip_alphas_cumprod[t],
        x0_from_eps=schedule.sqrt_recipm1_alphas_cumprod[t],
        x0_from_xt_v=schedule.sqrt_alphas_cumprod[t],
        x0_from_v=schedule.sqrt_one_minus_alphas_cumprod[t],
        c_x0=c_x0,
        c_xt=c_xt,
        c_eps=c_eps,
        sigma=sigma,
        log_var_min=log_var_min,
        log_var_max=log_var_max,
    )


def predict_x0(
    model_output: torch.Tensor, x: torch.Tensor, tables: StepTables, k: int, objective: str
) -> torch.Tensor:
    """The network's estimate of x_0 at step k, before clipping."""
    if objective == "pred_noise":
        return float(tables.x0_from_xt[k]) * x - float(tables.x0_from_eps[k]) * model_output
    if objective == "pred_x0":
        return model_output
    if objective == "pred_v":
        return float(tables.x0_from_xt_v[k]) * x - float(tables.x0_from_v[k]) * model_output
    raise ConfigError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")


def denoise_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    tables: StepTables,
    k: int,
    spec: SamplerSpec,
    objective: str,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step from the network's output: returns (x_next, clipped x0).

    ``noise`` may be None only where the step adds none (``tables.adds_noise``).
    """
    channels = x.shape[1]
    variance_output = None
    if model_output.shape[1] == 2 * channels:  # learned variance: [prediction, frac]
        model_output, variance_output = model_output.chunk(2, dim=1)
    x0 = predict_x0(model_output, x, tables, k, objective).clamp(-1.0, 1.0)

    x_next = float(tables.c_x0[k]) * x0 + float(tables.c_xt[k]) * x
    if tables.c_eps[k] != 0:
        eps = (float(tables.x0_from_xt[k]) * x - x0) / float(tables.x0_from_eps[k])
        x_next = x_next + float(tables.c_eps[k]) * eps
    if not tables.adds_noise(k, spec):
        return x_next, x0
    if spec.kind == "ddpm" and spec.variance == "learned_range":
        if variance_output is None:
            raise ConfigError("variance 'learned_range' needs a network with learned_variance")
        frac = (variance_output + 1) * 0.5
        log_var = frac * float(tables.log_var_max[k]) + (1 - frac) * float(tables.log_var_min[k])
        sigma = (0.5 * log_var).exp()
    else:
        sigma = float(tables.sigma[k])
    return x_next + sigma * noise, x0


def sample_loop(
    network: nn.Module,
    x: torch.Tensor,
    tables: StepTables,
    spec: SamplerSpec,
    objective: str,
    noise_fn: NoiseFn,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the reverse chain from x_T; returns x_0 in [-1, 1] (the network's data range).

    Self-conditioning networks get the previous step's clipped x0 (zeros at the first step).
    ``on_step(k, x)`` is called after each step k = 1 .. n with its output.
    """
    self_condition = getattr(network, "self_condition", False)
    x0 = None
    for k in range(len(tables)):
        t = torch.full((x.shape[0],), int(tables.timesteps[k]), device=x.device, dtype=torch.long)
        model_output = network(x, t, x0 if self_condition else None)
        noise = noise_fn(k + 1, tuple(x.shape)) if tables.adds_noise(k, spec) else None
        x, x0 = denoise_step(model_output, x, tables, k, spec, objective, noise)
        if on_step is not None:
            on_step(k + 1, x)
    return x
