"""Which timesteps a chain of ``steps`` network evaluations visits, by spacing name.

- ``library``: denoising-diffusion-pytorch's (``ddpm_fast.schedule.sampling_timesteps``), the
  default of its own samplers (DDPM, DDIM).
- ``linspace``, ``leading``, ``trailing``: diffusers' (Table 2 of arXiv:2305.08891), with its
  ``steps_offset`` added to ``leading``. ``solver=True`` gives DPMSolverMultistepScheduler's
  variants, which space steps + 1 points and drop the last (t = 0 is replaced by the final sigma);
  otherwise DDIMScheduler's.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .rule import FLOAT32_MAX, ZERO_SNR_SCALE

SPACINGS = ("library", "linspace", "leading", "trailing")


def spaced_timesteps(
    num_timesteps: int, steps: int, spacing: str, steps_offset: int = 0, *, solver: bool = False
) -> np.ndarray:
    """The visited timesteps, int64, in sampling order (decreasing)."""
    total = num_timesteps
    if not 1 <= steps <= total:
        raise ConfigError(f"steps must be between 1 and the schedule's {total}, got {steps}")
    points = steps + 1 if solver else steps
    if spacing == "library":
        from ..schedule import sampling_timesteps

        t = np.array([pair[0] for pair in sampling_timesteps(total, steps)], dtype=np.int64)
    elif spacing == "linspace":
        t = np.linspace(0, total - 1, points).round()[::-1][:steps].astype(np.int64)
    elif spacing == "leading":
        ratio = total // points
        t = (np.arange(0, points) * ratio).round()[::-1][:steps].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        t = _trailing(total, steps)
        if len(t) != steps:
            raise ConfigError(_trailing_overshoot(total, steps, t))
    else:
        raise ConfigError(f"unknown timestep_spacing {spacing!r}; known: {', '.join(SPACINGS)}")
    if len(t) != steps or t.min() < 0 or t.max() >= total:
        raise ConfigError(
            f"timestep_spacing {spacing!r} (steps_offset {steps_offset}) gives timesteps outside "
            f"[0, {total}) for {steps} steps"
        )
    return t


def _trailing(total: int, steps: int) -> np.ndarray:
    return np.arange(total, 0, -total / steps).round().astype(np.int64) - 1


def _trailing_overshoot(total: int, steps: int, t: np.ndarray) -> str:
    """Why diffusers' trailing spacing cannot run ``steps`` steps, and the nearest counts that
    can: ``steps`` float steps of total / steps can fall short of total, so arange makes one
    point more, timestep -1 (diffusers runs that extra step, on abar[-1]: the noisiest)."""

    def runs(n: int) -> bool:
        return len(_trailing(total, n)) == n

    near = [
        next((n for n in range(steps - 1, 0, -1) if runs(n)), None),
        next((n for n in range(steps + 1, total + 1) if runs(n)), None),
    ]
    near = " or ".join(str(n) for n in near if n is not None)
    return (
        f"timestep_spacing 'trailing' with {steps} steps gives {len(t)} timesteps on the "
        f"schedule's {total} (the float step {total}/{steps} reaches timestep {t[-1]}, as in "
        f"diffusers, which runs that extra step); use {near} steps, or another spacing"
    )


def x0_columns(abar: np.ndarray) -> dict[str, np.ndarray]:
    """The columns that recover x0 from x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (float64).

    At abar = 0 (a zero-terminal-SNR schedule's last timestep) 1 / sqrt(abar) is infinite:
    ``ZERO_SNR_SCALE`` stands in for both, so that eps = (s x - x0) / s is x there (its limit;
    x0's share, x0 / 2**64, is below float32's precision), as diffusers' v_prediction has it.
    A pred_noise network cannot step there (``rule.row_columns`` refuses it)."""
    zero_snr = abar == 0
    safe = np.where(zero_snr, 1.0, abar)
    return {
        "x0_from_xt": np.where(zero_snr, ZERO_SNR_SCALE, np.sqrt(1.0 / safe)),
        "x0_from_eps": np.where(zero_snr, ZERO_SNR_SCALE, np.sqrt(1.0 / safe - 1)),
        "x0_from_xt_v": np.sqrt(abar),
        "x0_from_v": np.sqrt(1.0 - abar),
    }


def next_timesteps(t: np.ndarray) -> np.ndarray:
    """Each visited timestep's successor, -1 after the last."""
    return np.append(t[1:], -1).astype(np.int64)


def clip_columns(spec, n: int) -> dict[str, np.ndarray]:
    """``x0_max`` (the clip bound, FLOAT32_MAX: none) and ``eps_x0_max`` (the bound of the x0
    that eps is derived from: x0_max, or FLOAT32_MAX for the unclipped x0) of ``spec``'s n steps."""
    x0_max = spec.clip_range if spec.clip_x0 else FLOAT32_MAX
    eps_x0_max = x0_max if spec.eps_from_clipped_x0 else FLOAT32_MAX
    return {"x0_max": np.full(n, x0_max), "eps_x0_max": np.full(n, eps_x0_max)}


def diffusers_previous(t: np.ndarray, num_timesteps: int, steps: int, spacing: str) -> np.ndarray:
    """The timestep each step lands on (-1: past the end): the next visited one for the library
    spacing, and for diffusers' spacings t - num_timesteps // steps, as DDIMScheduler.step has it
    (which is not the next visited timestep for linspace, or trailing when steps does not divide
    num_timesteps)."""
    if spacing == "library":
        return next_timesteps(t)
    return np.maximum(t - num_timesteps // steps, -1).astype(np.int64)
