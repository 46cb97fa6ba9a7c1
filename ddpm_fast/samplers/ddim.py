"""DDIM, as denoising-diffusion-pytorch's ddim_sample runs it:
c_x0 = sqrt(abar_next), c_eps = sqrt(1 - abar_next - sigma^2),
sigma = eta sqrt((1 - abar_t / abar_next)(1 - abar_next) / (1 - abar_t)); the last step
(t_next = -1) returns x0.
"""

from __future__ import annotations

import numpy as np

from .rule import FLOAT32_MAX, Chain
from .spacing import next_timesteps, spaced_timesteps, x0_columns

NAMES = ("ddim",)
DEFAULT_SPACING = "library"
USES_ETA = True
CARRIES_X0_PREV = False
READS_VARIANCE = False


def noise_steps(name: str, steps: int, eta: float) -> str:
    """ "1" where step k adds noise: none with eta 0, else every step but the last."""
    return "0" * steps if eta == 0 else "1" * (steps - 1) + "0"


def chain(alphas_cumprod: np.ndarray, spec) -> Chain:
    total = len(alphas_cumprod)
    t = spaced_timesteps(total, spec.steps, spec.timestep_spacing, spec.steps_offset)
    t_next = next_timesteps(t)
    last = t_next < 0
    a_t = alphas_cumprod[t]
    a_next = np.where(last, 1.0, alphas_cumprod[np.maximum(t_next, 0)])
    zero = np.zeros_like(a_t)

    sigma = spec.eta * np.sqrt((1 - a_t / a_next) * (1 - a_next) / (1 - a_t))
    sigma = np.where(last, zero, sigma)
    columns = x0_columns(a_t) | {
        "x0_max": np.full_like(a_t, 1.0 if spec.clip_x0 else FLOAT32_MAX),
        "c_x0": np.sqrt(a_next),
        "c_xt": zero,
        "c_x0_prev": zero,
        "c_eps": np.where(last, zero, np.sqrt(np.maximum(1 - a_next - sigma**2, 0))),
        "sigma": sigma,
        "log_var_min": zero,
        "log_var_max": zero,
        "noise_on": (sigma > 0).astype(np.float64),
    }
    return Chain(t, t_next, columns)
