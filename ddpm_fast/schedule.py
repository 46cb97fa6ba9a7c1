"""Beta schedules and every coefficient table derived from them, in float64, in one place.

The schedules are denoising-diffusion-pytorch's (1.x) to the bit: the reference sampler, the
engine's tables and the ONNX step all read their coefficients from here. Tables are float64;
``library_buffers`` rounds them to float32 as the library stores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .options import MAX_TIMESTEPS, check_int, check_real


def linear_beta_schedule(timesteps: int) -> torch.Tensor:
    """The original DDPM schedule, beta from 1e-4 to 0.02, rescaled to ``timesteps``."""
    scale = 1000 / timesteps
    return torch.linspace(scale * 0.0001, scale * 0.02, timesteps, dtype=torch.float64)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: abar(t) = cos((t/T + s)/(1 + s) * pi/2)^2."""
    steps = timesteps + 1
    t = torch.linspace(0, timesteps, steps, dtype=torch.float64) / timesteps
    alphas_cumprod = torch.cos((t + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0, 0.999)


def sigmoid_beta_schedule(
    timesteps: int, start: float = -3, end: float = 3, tau: float = 1, clamp_min: float = 1e-5
) -> torch.Tensor:
    """Jabri et al.'s sigmoid schedule (arXiv 2212.11972, fig. 8). ``clamp_min`` is accepted and
    unused, as in the library; its sigmoid end points are float32 scalars, as in the library."""
    steps = timesteps + 1
    t = torch.linspace(0, timesteps, steps, dtype=torch.float64) / timesteps
    v_start = torch.tensor(start / tau).sigmoid()
    v_end = torch.tensor(end / tau).sigmoid()
    alphas_cumprod = (-((t * (end - start) + start) / tau).sigmoid() + v_end) / (v_end - v_start)
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0, 0.999)


# diffusers' schedulers (DDPMScheduler, DDIMScheduler) compute their betas in float32: the same
# float32 betas here, widened to float64 (the products after that are float64, as for 1.x).
# ``rescale_zero_snr`` (1: diffusers' ``rescale_betas_zero_snr``) rescales them, in float32 as
# diffusers does, so that alphas_cumprod reaches 0 at the last timestep (arXiv:2305.08891).


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """diffusers' rescale_zero_terminal_snr (Algorithm 1 of arXiv:2305.08891), float32: sqrt(abar)
    shifted to end at 0 and scaled to keep its first value; the last beta becomes 1."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def _diffusers(betas: torch.Tensor, rescale_zero_snr: float) -> torch.Tensor:
    """float32 betas, rescaled if asked, widened to float64."""
    return (rescale_zero_terminal_snr(betas) if rescale_zero_snr else betas).double()


def diffusers_linear_beta_schedule(
    timesteps: int, beta_start: float = 0.0001, beta_end: float = 0.02, rescale_zero_snr: float = 0
) -> torch.Tensor:
    """diffusers' "linear": beta from beta_start to beta_end (not rescaled to ``timesteps``)."""
    betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float32)
    return _diffusers(betas, rescale_zero_snr)


def diffusers_scaled_linear_beta_schedule(
    timesteps: int, beta_start: float = 0.0001, beta_end: float = 0.02, rescale_zero_snr: float = 0
) -> torch.Tensor:
    """diffusers' "scaled_linear": sqrt(beta) linear from sqrt(beta_start) to sqrt(beta_end)."""
    roots = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float32)
    return _diffusers(roots**2, rescale_zero_snr)


def diffusers_squaredcos_cap_v2_beta_schedule(
    timesteps: int, rescale_zero_snr: float = 0
) -> torch.Tensor:
    """diffusers' "squaredcos_cap_v2": betas_for_alpha_bar with the cosine abar, capped at
    0.999, computed in Python floats and stored as float32."""

    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - abar((i + 1) / timesteps) / abar(i / timesteps), 0.999) for i in range(timesteps)
    ]
    return _diffusers(torch.tensor(betas, dtype=torch.float32), rescale_zero_snr)


def diffusers_sigmoid_beta_schedule(
    timesteps: int, beta_start: float = 0.0001, beta_end: float = 0.02, rescale_zero_snr: float = 0
) -> torch.Tensor:
    """diffusers' "sigmoid": sigmoid(linspace(-6, 6)) scaled into [beta_start, beta_end]."""
    x = torch.linspace(-6, 6, timesteps)
    return _diffusers(torch.sigmoid(x) * (beta_end - beta_start) + beta_start, rescale_zero_snr)


def trained_beta_schedule(
    timesteps: int, betas: tuple = (), rescale_zero_snr: float = 0
) -> torch.Tensor:
    """A file's own betas (diffusers' ``trained_betas``), as float32 like diffusers."""
    if len(betas) != timesteps:
        raise ConfigError(f"trained_betas has {len(betas)} values for {timesteps} timesteps")
    return _diffusers(torch.tensor(betas, dtype=torch.float32), rescale_zero_snr)


BETA_SCHEDULES = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
    "sigmoid": sigmoid_beta_schedule,
    "diffusers_linear": diffusers_linear_beta_schedule,
    "diffusers_scaled_linear": diffusers_scaled_linear_beta_schedule,
    "diffusers_squaredcos_cap_v2": diffusers_squaredcos_cap_v2_beta_schedule,
    "diffusers_sigmoid": diffusers_sigmoid_beta_schedule,
    "trained": trained_beta_schedule,
}


@dataclass(frozen=True)
class ScheduleConfig:
    """Which beta schedule, over how many training timesteps, with which keyword arguments."""

    name: str = "sigmoid"
    timesteps: int = 1000
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in BETA_SCHEDULES:
            raise ConfigError(
                f"unknown beta schedule {self.name!r}; known: {', '.join(BETA_SCHEDULES)}"
            )
        timesteps = check_int("timesteps", self.timesteps, minimum=1, maximum=MAX_TIMESTEPS)
        object.__setattr__(self, "timesteps", timesteps)  # a NumPy integer becomes an int
        kwargs = self.kwargs
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise ConfigError(f"schedule_kwargs must be a dict of named numbers, got {kwargs!r}")
        for key, value in kwargs.items():
            if self.name == "trained" and key == "betas":  # the one list-valued argument
                if not isinstance(value, list | tuple):
                    raise ConfigError(f"trained betas must be a list of numbers, got {value!r}")
                object.__setattr__(self, "kwargs", {**kwargs, key: tuple(value)})
                for beta in value:
                    check_real("trained_betas", beta)
                continue
            check_real(f"schedule_kwargs[{key!r}]", value)

    def to_dict(self) -> dict:
        return {"name": self.name, "timesteps": self.timesteps, "kwargs": dict(self.kwargs)}


class Schedule:
    """Every table of a discrete-time Gaussian diffusion, float64, indexed by timestep t.

    abar_t = prod_{s<=t} (1 - beta_s); the posterior q(x_{t-1} | x_t, x_0) has variance
    beta_t (1 - abar_{t-1}) / (1 - abar_t) and mean coef1_t x_0 + coef2_t x_t.
    """

    def __init__(self, config: ScheduleConfig):
        self.config = config
        try:
            betas = BETA_SCHEDULES[config.name](config.timesteps, **config.kwargs)
        except TypeError as err:
            raise ConfigError(f"bad arguments for the {config.name} schedule: {err}") from None
        below_one = betas < 1
        if config.kwargs.get("rescale_zero_snr"):
            below_one[-1] = True  # beta_T = 1 (abar_T = 0): the samplers' columns stay finite
        if not bool(((betas > 0) & below_one).all()):
            # e.g. the linear schedule rescaled to 20 steps reaches beta = 1, where abar = 0 and
            # every table divides by zero.
            raise ConfigError(
                f"the {config.name} schedule over {config.timesteps} timesteps has betas outside "
                f"(0, 1) (max {float(betas.max()):.4g}); use more timesteps"
            )
        self.betas = betas
        self.alphas = alphas = 1.0 - betas
        self.alphas_cumprod = alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = alphas_cumprod_prev = F.pad(
            alphas_cumprod[:-1], (1, 0), value=1.0
        )
        self.sqrt_alphas_cumprod = torch.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - alphas_cumprod)
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_log_variance_clipped = torch.log(self.posterior_variance.clamp(min=1e-20))
        self.posterior_mean_coef1 = betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod)
        )

    @property
    def num_timesteps(self) -> int:
        return self.config.timesteps

    # The tables a GaussianDiffusion registers as float32 buffers, under the same names.
    LIBRARY_BUFFERS = (
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    )

    def library_buffers(self) -> dict[str, torch.Tensor]:
        """The tables as denoising-diffusion-pytorch stores them (float32)."""
        return {name: getattr(self, name).to(torch.float32) for name in self.LIBRARY_BUFFERS}


def sampling_timesteps(num_timesteps: int, steps: int) -> list[tuple[int, int]]:
    """The library's (t, t_next) pairs for a chain of ``steps`` steps, t_next = -1 at the end.

    ``linspace(-1, T - 1, steps + 1)`` in float32, truncated to int, reversed: for steps == T it is
    (T-1, T-2), ..., (0, -1). DDIM uses it for any step count, and so does respaced DDPM here.
    """
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(
            f"steps must be between 1 and the schedule's {num_timesteps}, got {steps}"
        )
    times = torch.linspace(-1, num_timesteps - 1, steps=steps + 1)
    times = list(reversed(times.int().tolist()))
    return list(pairwise(times))
