"""DPM-Solver++(2M), data prediction, as diffusers' DPMSolverMultistepScheduler runs it
(``algorithm_type="dpmsolver++"``, ``solver_order=2``, midpoint, ``lower_order_final``,
``final_sigmas_type="zero"``), and its SDE variant (``"sde-dpmsolver++"``).

With sigma_k = sqrt((1 - abar) / abar) at step k (float32, as diffusers stores them; Karras'
rho-7 ramp for the ``-karras`` names), alpha = 1 / sqrt(1 + sigma^2), s = sigma alpha,
lambda = log(alpha / s), h = lambda_next - lambda_k and r = h_prev / h:

    x_next = (s_next / s_k) x + A x0                                    (order 1)
    x_next = (s_next / s_k) x + A (1 + 1/(2r)) x0 - A / (2r) x0_prev    (order 2)

with A = alpha_next (1 - exp(-h)). The SDE variant multiplies the x term by exp(-h), uses
A = alpha_next (1 - exp(-2h)) and adds s_next sqrt(1 - exp(-2h)) z. The first step is order 1 (no
history yet), and so is the last, which lands on sigma = 0: x_next = x0.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import ConfigError
from .rule import Chain
from .spacing import clip_columns, spaced_timesteps

NAMES = ("dpm++2m", "dpm++2m-karras", "dpm++2m-sde", "dpm++2m-sde-karras")
DEFAULT_SPACING = "linspace"
USES_ETA = False
CARRIES_X0_PREV = True
READS_VARIANCE = False
KARRAS_RHO = 7.0
# diffusers upcasts the SDE step to float32 and draws its noise there.
GENERATOR_DRAWS_FP32 = True


def noise_steps(name: str, steps: int, eta: float) -> str:
    """ "1" where step k adds noise: the SDE variant at every step but the last."""
    return "1" * (steps - 1) + "0" if "-sde" in name else "0" * steps


def generator_draws(spec, timesteps: np.ndarray) -> np.ndarray:
    """Where diffusers' DPMSolverMultistepScheduler draws noise from the pipeline's generator:
    every step of the SDE variant, the last too (whose noise is multiplied by 0), in float32
    whatever the model's dtype (``GENERATOR_DRAWS_FP32``)."""
    return np.full(len(timesteps), "-sde" in spec.kind)


def karras_sigmas(sigmas: np.ndarray, steps: int) -> np.ndarray:
    """Karras et al.'s ramp from the schedule's largest sigma to its smallest (diffusers'
    ``_convert_to_karras``)."""
    ramp = np.linspace(0, 1, steps)
    min_inv, max_inv = sigmas[0] ** (1 / KARRAS_RHO), sigmas[-1] ** (1 / KARRAS_RHO)
    return (max_inv + ramp * (min_inv - max_inv)) ** KARRAS_RHO


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timestep whose log sigma is ``sigma``'s, by linear interpolation."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def timesteps_and_sigmas(alphas_cumprod: np.ndarray, spec) -> tuple[np.ndarray, np.ndarray]:
    """The visited timesteps and the sigmas of the steps, with the final 0 appended (float32
    values, as diffusers keeps them). A chain with a zero-length step (a sigma that does not
    fall) is a ConfigError: the solver divides by its h = 0 (``check_steps_fall``)."""
    t, sigmas = _timesteps_and_sigmas(alphas_cumprod, spec)
    check_steps_fall(alphas_cumprod, spec, t, sigmas)
    return t, sigmas


def _timesteps_and_sigmas(alphas_cumprod: np.ndarray, spec) -> tuple[np.ndarray, np.ndarray]:
    total = len(alphas_cumprod)
    # A zero terminal SNR schedule's abar_T = 0 is 2**-24 for DPM-Solver, as diffusers sets it
    # (a finite first sigma).
    alphas_cumprod = np.where(alphas_cumprod == 0, 2.0**-24, alphas_cumprod)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    if spec.kind.endswith("-karras"):
        chosen = karras_sigmas(sigmas, spec.steps)
        t = sigma_to_t(chosen, np.log(sigmas)).round().astype(np.int64)
    else:
        t = spaced_timesteps(
            total, spec.steps, spec.timestep_spacing, spec.steps_offset, solver=True
        )
        chosen = np.interp(t, np.arange(total), sigmas)
    sigmas = np.append(chosen, 0.0).astype(np.float32).astype(np.float64)
    return t, sigmas


def _falls(sigmas: np.ndarray) -> bool:
    return bool((np.diff(sigmas) < 0).all())


def check_steps_fall(alphas_cumprod: np.ndarray, spec, t: np.ndarray, sigmas: np.ndarray) -> None:
    """ConfigError where two steps share a sigma: h = 0, and r = h_prev / h divides by it (NaN
    from the next step on). linspace and leading spacing space steps + 1 points over the
    schedule's timesteps, so ``steps`` equal to its length repeats one (leading: all of them).
    diffusers 0.42.1 keeps the duplicates (its set_timesteps removes none) and gives NaN too, so
    there is no chain of its to match: refused, with what runs instead."""
    if _falls(sigmas):
        return
    k = int(np.flatnonzero(np.diff(sigmas) >= 0)[0])
    instead = []
    shorter = (replace(spec, steps=n) for n in range(spec.steps - 1, 0, -1))
    fewer = next((s for s in shorter if _runs(alphas_cumprod, s)), None)
    if fewer is not None:
        instead.append(f"at most {fewer.steps} steps")
    karras = spec.kind.endswith("-karras")  # its sigmas do not depend on the spacing
    trailing = replace(spec, timestep_spacing="trailing")
    if not karras and spec.timestep_spacing != "trailing" and _runs(alphas_cumprod, trailing):
        instead.append("timestep_spacing 'trailing'")
    if not karras and _runs(alphas_cumprod, replace(spec, kind=f"{spec.kind}-karras")):
        instead.append(f"sampler {spec.kind}-karras")
    if len(instead) > 1:
        instead[-1] = f"or {instead[-1]}"
    raise ConfigError(
        f"sampler {spec.kind} with {spec.steps} steps and timestep_spacing "
        f"{spec.timestep_spacing!r} visits timestep {t[k]} twice on the schedule's "
        f"{len(alphas_cumprod)} timesteps (a zero-length step: DPM-Solver divides by zero); "
        f"use {', '.join(instead) or 'another chain'}"
    )


def _runs(alphas_cumprod: np.ndarray, spec) -> bool:
    """Whether ``spec``'s chain has no zero-length step."""
    try:
        return _falls(_timesteps_and_sigmas(alphas_cumprod, spec)[1])
    except ConfigError:
        return False


def chain(alphas_cumprod: np.ndarray, spec) -> Chain:
    t, sigmas = timesteps_and_sigmas(alphas_cumprod, spec)
    n = len(t)
    alpha = 1 / np.sqrt(sigmas**2 + 1)
    s = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(s)  # +inf at the final sigma 0
    sde = "-sde" in spec.kind
    a_k, s_k = alpha[:n], s[:n]
    a_next, s_next = alpha[1:], s[1:]
    h = lam[1:] - lam[:n]
    final = sigmas[1:] == 0
    h = np.where(final, 1.0, h)  # placeholder where the step lands on sigma 0 (set below)
    decay = np.exp(-h) if sde else np.ones(n)
    big_a = -a_next * np.expm1(-2 * h if sde else -h)
    # r = h_prev / h; order 1 at the first step and at the last (lower_order_final).
    r = np.ones(n)
    r[1:] = (lam[1:n] - lam[: n - 1]) / h[1:]
    second = np.arange(n) > 0
    second &= ~final
    c_x0 = np.where(second, big_a * (1 + 0.5 / r), big_a)
    c_x0_prev = np.where(second, -big_a * 0.5 / r, 0.0)
    c_xt = s_next / s_k * decay
    noise = s_next * np.sqrt(-np.expm1(-2 * h)) if sde else np.zeros(n)
    # sigma_next = 0: x_next = x0 exactly (exp(-h) = 0).
    c_x0, c_xt, c_x0_prev = np.where(final, 1.0, c_x0), np.where(final, 0.0, c_xt), c_x0_prev
    noise = np.where(final, 0.0, noise)
    zero = np.zeros(n)
    columns = clip_columns(spec, n) | {
        # diffusers: x0 = (x - s eps) / alpha and x0 = alpha x - s v, from the float32 sigmas
        "x0_from_xt": 1 / a_k,
        "x0_from_eps": s_k / a_k,
        "x0_from_xt_v": a_k,
        "x0_from_v": s_k,
        "c_x0": c_x0,
        "c_xt": c_xt,
        "c_x0_prev": c_x0_prev,
        "c_eps": zero,
        "sigma": noise,
        "log_var_min": zero,
        "log_var_max": zero,
        "noise_on": (noise > 0).astype(np.float64),
    }
    t_next = np.append(t[1:], -1).astype(np.int64)
    return Chain(t, t_next, columns)
