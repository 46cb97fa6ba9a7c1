"""Which timesteps a chain of ``steps`` network evaluations visits, by spacing name.

- ``library``: denoising-diffusion-pytorch's (``ddpm_fast.schedule.sampling_timesteps``), the
  default of its own samplers (DDPM, DDIM).
- ``linspace``, ``leading``, ``trailing``: diffusers' (Table 2 of arXiv:2305.08891), with its
  ``steps_offset`` added to ``leading``. ``solver=True`` gives DPMSolverMultistepScheduler's
  variants, which space steps + 1 points and drop the last (t = 0 is replaced by the final sigma);
  otherwise DDIMScheduler's.
- ``sections`` and ``ddim-stride``: OpenAI's guided-diffusion and improved-diffusion
  (``space_timesteps``): the schedule cut into equal sections, each strided to its count (one
  section of ``steps`` by default; ``section_counts`` (10, 15, 20) as their "10,15,20"), and the
  DDIM paper's integer stride (their "ddimN"). The libraries' ``timestep_respacing`` strings are
  read by :func:`parse_respacing`; a model read from their files defaults to ``sections``, which
  DDIM runs as ``ddim-stride``, as their scripts do (:func:`model_spacing`).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .rule import FLOAT32_MAX, ZERO_SNR_SCALE

SPACINGS = ("library", "linspace", "leading", "trailing", "sections", "ddim-stride")
# The spacings whose step lands on the next visited timestep (SpacedDiffusion's respaced chain);
# diffusers' land on t - num_timesteps // steps.
NEXT_VISITED = ("library", "sections", "ddim-stride")
OPENAI_SPACINGS = ("sections", "ddim-stride")


def model_spacing(sampler: str, spacing: str | None) -> str | None:
    """The spacing a chain of ``sampler`` takes from a model whose default is ``spacing``: a
    model respaced as OpenAI's scripts respace it ("sections") runs DDIM with their "ddimN"
    stride and the solvers on their own default spacing; any other model's spacing as it is."""
    if spacing != "sections" or sampler == "ddpm":
        return spacing
    return "ddim-stride" if sampler == "ddim" else None


def parse_respacing(respacing: str, total: int) -> tuple[int, str, tuple[int, ...]]:
    """(steps, spacing, section_counts) of the libraries' ``timestep_respacing`` string: "250"
    (one section), "10,15,20" (three), "ddim25" (the DDIM stride), "" (every step)."""
    if not isinstance(respacing, str):
        raise ConfigError(f"timestep_respacing must be a string such as '250' or 'ddim25', got "
                          f"{respacing!r}")  # fmt: skip
    text = respacing.strip()
    if not text:
        return total, "sections", (total,)
    try:
        if text.startswith("ddim"):
            steps = int(text[len("ddim") :])
            return steps, "ddim-stride", (steps,)
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"timestep_respacing {respacing!r} is not a count ('250'), a list of section counts "
            "('10,15,20') or 'ddimN'"
        ) from None
    if any(c < 1 for c in counts):
        raise ConfigError(f"timestep_respacing {respacing!r}: every section count must be >= 1")
    return sum(counts), "sections", counts


def space_timesteps(total: int, section_counts: tuple[int, ...]) -> np.ndarray:
    """The libraries' ``space_timesteps(total, section_counts)``, increasing."""
    size_per, extra = divmod(total, len(section_counts))
    start, taken = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ConfigError(
                f"cannot divide a section of {size} timesteps into {count} steps "
                f"(timestep_respacing {','.join(map(str, section_counts))} on {total})"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0  # accumulated as the libraries do, so that every rounding is theirs
        for _ in range(count):
            taken.append(start + round(position))
            position += stride
        start += size
    return np.array(sorted(set(taken)), dtype=np.int64)


def ddim_stride(total: int, steps: int) -> np.ndarray:
    """The libraries' "ddimN": range(0, total, i) for the smallest integer stride i that gives
    ``steps`` timesteps; ConfigError naming the nearest counts that one gives."""
    for i in range(1, total):
        if len(range(0, total, i)) == steps:
            return np.arange(0, total, i, dtype=np.int64)
    counts = sorted({len(range(0, total, i)) for i in range(1, total)})
    below = max((c for c in counts if c < steps), default=None)
    above = min((c for c in counts if c > steps), default=None)
    near = " or ".join(str(c) for c in (below, above) if c is not None)
    raise ConfigError(
        f"no integer stride gives exactly {steps} DDIM steps on {total} timesteps "
        f"(timestep_respacing ddim{steps}); {near} do"
    )


def spaced_timesteps(
    num_timesteps: int,
    steps: int,
    spacing: str,
    steps_offset: int = 0,
    *,
    solver: bool = False,
    section_counts: tuple[int, ...] = (),
) -> np.ndarray:
    """The visited timesteps, int64, in sampling order (decreasing)."""
    total = num_timesteps
    if not 1 <= steps <= total:
        raise ConfigError(f"steps must be between 1 and the schedule's {total}, got {steps}")
    if solver and spacing in OPENAI_SPACINGS:
        raise ConfigError(f"timestep_spacing {spacing!r} is for the ddpm and ddim samplers")
    points = steps + 1 if solver else steps
    if spacing == "sections":
        t = space_timesteps(total, section_counts or (steps,))[::-1].copy()
    elif spacing == "ddim-stride":
        t = ddim_stride(total, steps)[::-1].copy()
    elif spacing == "library":
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
    if spacing in NEXT_VISITED:
        return next_timesteps(t)
    return np.maximum(t - num_timesteps // steps, -1).astype(np.int64)
