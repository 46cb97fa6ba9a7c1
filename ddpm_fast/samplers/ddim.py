"""DDIM, as denoising-diffusion-pytorch's ddim_sample and diffusers' DDIMScheduler run it:
c_x0 = sqrt(abar_next), c_eps = sqrt(1 - abar_next - sigma^2),
sigma = eta sqrt((1 - abar_t / abar_next)(1 - abar_next) / (1 - abar_t)); a step that lands past
t = 0 (abar_next = 1, diffusers' set_alpha_to_one) returns x0. abar_next is the next visited
timestep's for the library's and OpenAI's spacings, and t - num_timesteps // steps for diffusers'
spacings (``spacing.diffusers_previous``). eps is re-derived from the clipped x0 or is the
network's own (``spec.eps_from_clipped_x0``: the column ``eps_x0_max``).
"""

from __future__ import annotations

import numpy as np

from .rule import Chain
from .spacing import clip_columns, diffusers_previous, next_timesteps, spaced_timesteps, x0_columns

NAMES = ("ddim",)
DEFAULT_SPACING = "library"
USES_ETA = True
CARRIES_X0_PREV = False
GENERATOR_DRAWS_FP32 = False  # drawn in the model's dtype, as diffusers' step
READS_VARIANCE = False


def noise_steps(name: str, steps: int, eta: float) -> str:
    """ "1" where step k adds noise: none with eta 0, else every step but the last."""
    return "0" * steps if eta == 0 else "1" * (steps - 1) + "0"


def generator_draws(spec, timesteps: np.ndarray) -> np.ndarray:
    """Where diffusers' DDIMScheduler draws noise from the pipeline's generator: every step where
    eta > 0, the last too (whose sigma is 0)."""
    return np.full(len(timesteps), spec.eta > 0)


def chain(alphas_cumprod: np.ndarray, spec) -> Chain:
    total = len(alphas_cumprod)
    t = spaced_timesteps(
        total, spec.steps, spec.timestep_spacing, spec.steps_offset,
        section_counts=spec.section_counts,
    )  # fmt: skip
    landing = diffusers_previous(t, total, spec.steps, spec.timestep_spacing)
    last = landing < 0
    a_t = alphas_cumprod[t]
    a_next = np.where(last, 1.0, alphas_cumprod[np.maximum(landing, 0)])
    zero = np.zeros_like(a_t)

    sigma = spec.eta * np.sqrt((1 - a_t / a_next) * (1 - a_next) / (1 - a_t))
    sigma = np.where(last, zero, sigma)
    columns = (
        x0_columns(a_t)
        | clip_columns(spec, len(t))
        | {
            "c_x0": np.sqrt(a_next),
            "c_xt": zero,
            "c_x0_prev": zero,
            "c_eps": np.where(last, zero, np.sqrt(np.maximum(1 - a_next - sigma**2, 0))),
            "sigma": sigma,
            "log_var_min": zero,
            "log_var_max": zero,
            "noise_on": (sigma > 0).astype(np.float64),
        }
    )
    # condition_score: eps' = eps - sqrt(1 - abar) g and x0' from eps' (not clipped again),
    # i.e. x_next moves by (c_x0 (1 - abar) / sqrt(abar) - c_eps sqrt(1 - abar)) g.
    # At abar = 0 (a zero terminal SNR schedule) it is infinite: such chains cannot be guided.
    with np.errstate(divide="ignore"):
        guide = columns["c_x0"] * (1 - a_t) / np.sqrt(a_t) - columns["c_eps"] * np.sqrt(1 - a_t)
    guidance = {"guide": guide, "guide_log_var_min": zero, "guide_log_var_max": zero}
    return Chain(t, next_timesteps(t), columns, guidance=guidance)
