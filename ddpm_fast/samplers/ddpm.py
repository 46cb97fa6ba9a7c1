"""DDPM ancestral sampling, as denoising-diffusion-pytorch's p_sample_loop runs it.

c_x0, c_xt are the posterior mean coefficients and sigma^2 the posterior variance
("fixed_small") or beta_t ("fixed_large"); fewer steps respace the chain with
beta' = 1 - abar_t / abar_next. ``learned_range`` interpolates log sigma^2 between the two by the
network's extra output channels, as the library's LearnedGaussianDiffusion does. The last step
adds no noise. diffusers' DDPMScheduler is the same chain (its previous timestep is the next
visited one); where its last timestep is above 0 (leading spacing with a steps_offset, trailing)
it adds noise there too: sigma 1e-10 for fixed_small (left out here), but a real one for
fixed_large and learned_range, which ddpm-fast refuses (ConfigError) rather than differ.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .rule import Chain
from .spacing import NEXT_VISITED, clip_columns, next_timesteps, spaced_timesteps, x0_columns

NAMES = ("ddpm",)
DEFAULT_SPACING = "library"
USES_ETA = False
CARRIES_X0_PREV = False
GENERATOR_DRAWS_FP32 = False  # drawn in the model's dtype, as diffusers' step
READS_VARIANCE = True  # learned_range: sigma from the network


def noise_steps(name: str, steps: int, eta: float) -> str:
    """ "1" where step k adds noise: every step but the last."""
    return "1" * (steps - 1) + "0"


def generator_draws(spec, timesteps: np.ndarray) -> np.ndarray:
    """Where diffusers' DDPMScheduler draws noise from the pipeline's generator: at every
    timestep above 0, the last one too where it is (``noise="torch-generator"``)."""
    return np.asarray(timesteps) > 0


def chain(alphas_cumprod: np.ndarray, spec) -> Chain:
    total = len(alphas_cumprod)
    t = spaced_timesteps(
        total, spec.steps, spec.timestep_spacing, spec.steps_offset,
        section_counts=spec.section_counts,
    )  # fmt: skip
    if spec.timestep_spacing not in NEXT_VISITED and t[-1] > 0 and spec.variance != "fixed_small":
        raise ConfigError(
            f"timestep_spacing {spec.timestep_spacing!r} (steps_offset {spec.steps_offset}) ends "
            f"the {spec.steps}-step chain at timestep {t[-1]}, where diffusers' DDPMScheduler adds "
            f"{spec.variance} noise and ddpm-fast adds none; use linspace, or leading with "
            "steps_offset 0"
        )
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
    log_var_min = np.log(np.maximum(posterior_variance, 1e-20))
    columns = (
        x0_columns(a_t)
        | clip_columns(spec, len(t))
        | {
            "c_x0": beta * np.sqrt(a_next) / (1.0 - a_t),
            "c_xt": (1.0 - a_next) * np.sqrt(1.0 - beta) / (1.0 - a_t),
            "c_x0_prev": zero,
            "c_eps": zero,
            "sigma": sigma,
            "log_var_min": log_var_min,
            "log_var_max": np.log(beta),
            "noise_on": noise_on.astype(np.float64),
        }
    )
    guidance = guidance_columns(spec, beta, posterior_variance, log_var_min)
    return Chain(t, t_next, columns, learned=learned, guidance=guidance)


def guidance_columns(spec, beta, posterior_variance, log_var_min) -> dict:
    """The variance guided-diffusion's condition_mean moves the mean by (mean + variance * g):
    fixed_small's posterior variance (0 at the last step), fixed_large's beta but at the last
    step the posterior variance of the one before (the library's), learned_range's log variance
    bounds with the same last-step lower bound (``posterior_log_variance_clipped``)."""
    before_last = posterior_variance[-2] if len(beta) > 1 else 0.0
    if spec.variance == "fixed_large":
        guide = np.append(beta[:-1], before_last)
    elif spec.variance == "fixed_small":
        guide = posterior_variance
    else:
        guide = np.zeros_like(beta)
    low = log_var_min.copy()
    if len(beta) > 1:
        low[-1] = log_var_min[-2]
    return {"guide": guide, "guide_log_var_min": low, "guide_log_var_max": np.log(beta)}
