"""DDPM ancestral sampling, as denoising-diffusion-pytorch's p_sample_loop runs it.

c_x0, c_xt are the posterior mean coefficients and sigma^2 the posterior variance
("fixed_small") or beta_t ("fixed_large"); fewer steps respace the chain with
beta' = 1 - abar_t / abar_next. ``learned_range`` interpolates log sigma^2 between the two by the
network's extra output channels, as the library's LearnedGaussianDiffusion does. The last step
adds no noise.
"""

from __future__ import annotations

import numpy as np

from .rule import FLOAT32_MAX, Chain
from .spacing import next_timesteps, spaced_timesteps, x0_columns

NAMES = ("ddpm",)
DEFAULT_SPACING = "library"
USES_ETA = False
CARRIES_X0_PREV = False
READS_VARIANCE = True  # learned_range: sigma from the network


def noise_steps(name: str, steps: int, eta: float) -> str:
    """ "1" where step k adds noise: every step but the last."""
    return "1" * (steps - 1) + "0"


def chain(alphas_cumprod: np.ndarray, spec) -> Chain:
    total = len(alphas_cumprod)
    t = spaced_timesteps(total, spec.steps, spec.timestep_spacing, spec.steps_offset)
    t_next = next_timesteps(t)
    last = t_next < 0
    a_t = alphas_cumprod[t]
    a_next = np.where(last, 1.0, alphas_cumprod[np.maximum(t_next, 0)])
    zero = np.zeros_like(a_t)

    beta = 1.0 - a_t / a_next  # respaced beta; beta_t itself when t_next == t - 1
    posterior_variance = beta * (1.0 - a_next) / (1.0 - a_t)
    variance = beta if spec.variance == "fixed_large" else posterior_variance
    sigma = np.where(last, zero, np.sqrt(variance))
    learned = spec.variance == "learned_range"
    noise_on = ~last if learned else sigma > 0
    columns = x0_columns(a_t) | {
        "x0_max": np.full_like(a_t, 1.0 if spec.clip_x0 else FLOAT32_MAX),
        "c_x0": beta * np.sqrt(a_next) / (1.0 - a_t),
        "c_xt": (1.0 - a_next) * np.sqrt(1.0 - beta) / (1.0 - a_t),
        "c_x0_prev": zero,
        "c_eps": zero,
        "sigma": sigma,
        "log_var_min": np.log(np.maximum(posterior_variance, 1e-20)),
        "log_var_max": np.log(beta),
        "noise_on": noise_on.astype(np.float64),
    }
    return Chain(t, t_next, columns, learned=learned)
