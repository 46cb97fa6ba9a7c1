"""The one update rule of every sampler, over named per-step coefficient columns.

A sampler (one module of this package) turns (alphas_cumprod, spec) into the columns of
``TABLE`` for each step k; ``row_columns`` adds the network-objective ones (``a``, ``b``) and gives
``ROW``, the order in which the engine's coefficient table stores them. With x the chain's state,
``out`` the network's output and x0_prev the previous step's x0 (0 at the first step):

    x0     = clamp(a x - b out, -x0_max, x0_max)
    eps    = (x0_from_xt x - clamp(a x - b out, -eps_x0_max, eps_x0_max)) / x0_from_eps
    x_next = c_x0 x0 + c_xt x + c_x0_prev x0_prev + c_eps eps + noise_on sigma z

eps_x0_max = x0_max re-derives eps from the clipped x0 (denoising-diffusion-pytorch's DDIM, the
same numbers as using x0 itself); FLOAT32_MAX from the unclipped one, i.e. the network's own eps
(diffusers' DDIM, ``use_clipped_model_output=False``). sigma is the column's, or for learned
variance exp(log_var / 2), log_var interpolating (log_var_min, log_var_max) by (v + 1) / 2 (v: the
output's second half of channels).

The functions below are plain arithmetic, so the PyTorch reference, the ONNX step graph (traced
PyTorch), the NumPy OnnxSampler and the Triton step kernel (``triton.jit`` of these very
functions) all run the same expressions; only the clamp and the exp are spelled per backend.
No torch here: OnnxSampler imports this where torch is not installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError
from ..options import OBJECTIVES

# The columns a sampler computes, float64, one value per chain step.
TABLE = (
    "x0_from_xt",  # x0 = x0_from_xt x - x0_from_eps eps       (pred_noise)
    "x0_from_eps",
    "x0_from_xt_v",  # x0 = x0_from_xt_v x - x0_from_v v       (pred_v)
    "x0_from_v",
    "x0_max",  # x0 is clipped to [-x0_max, x0_max] (FLOAT32_MAX: not clipped)
    "eps_x0_max",  # eps is derived from x0 clipped to this bound (x0_max or FLOAT32_MAX)
    "c_x0",
    "c_xt",
    "c_x0_prev",  # the multistep solvers' history
    "c_eps",
    "sigma",  # noise scale (0 where the step adds none)
    "log_var_min",  # learned_range: log sigma^2 at frac 0 and 1
    "log_var_max",
    "noise_on",  # 1 where the step adds noise, else 0
)
# Classifier guidance (``ddpm_fast.guidance``): the step moves by guide * g, g the classifier's
# scaled gradient; for learned variance guide is exp(learned_log_var(v, guide_log_var_min,
# guide_log_var_max)) (DDPM's condition_mean: the model's variance, at the last step too).
# Columns of the samplers that can be guided (``Chain.guidance``); the PyTorch step reads them.
GUIDANCE = ("guide", "guide_log_var_min", "guide_log_var_max")
# One row of the fused step's coefficient table: the objective's (a, b), then the sampler's.
ROW = ("a", "b", *(name for name in TABLE if name not in ("x0_from_xt_v", "x0_from_v")))
FLOAT32_MAX = 3.4028234663852886e38  # clamp bound that leaves every finite float32 unchanged
ZERO_SNR_SCALE = 2.0**64  # 1 / sqrt(abar) at abar = 0 (spacing.x0_columns)


@dataclass
class Chain:
    """What a sampler module computes: the timesteps it visits (int, decreasing), the next ones
    (-1 after the last), its ``TABLE`` columns (float64 arrays), whether sigma is learned, and
    its ``GUIDANCE`` columns where classifier guidance applies to it (else None)."""

    timesteps: object
    next_timesteps: object
    columns: dict
    learned: bool = False
    guidance: dict | None = None

    def __post_init__(self) -> None:
        if set(self.columns) != set(TABLE):
            missing = sorted(set(TABLE) - set(self.columns))
            extra = sorted(set(self.columns) - set(TABLE))
            raise ValueError(
                f"a sampler's columns must be TABLE's: missing {missing}, extra {extra}"
            )
        if self.guidance is not None and set(self.guidance) != set(GUIDANCE):
            raise ValueError(f"a sampler's guidance columns must be {GUIDANCE}")


def row_columns(table: Mapping, objective: str) -> dict:
    """The ``ROW`` columns (arrays or tensors alike) of a sampler's ``TABLE`` columns for a
    network trained on ``objective``: x0 = a x - b out (pred_x0: a = 0, b = -1, x0 = out)."""
    if objective == "pred_noise":
        if bool((table["x0_from_xt_v"] == 0).any()):
            raise ConfigError(
                "a pred_noise (epsilon) network cannot step from alphas_cumprod = 0 (a zero "
                "terminal SNR schedule's last timestep: x0 = (x - eps) / 0); use a chain that "
                "does not visit it (e.g. leading spacing) or a v_prediction network"
            )
        a, b = table["x0_from_xt"], table["x0_from_eps"]
    elif objective == "pred_v":
        a, b = table["x0_from_xt_v"], table["x0_from_v"]
    elif objective == "pred_x0":
        zero = 0.0 * table["x0_from_xt"]
        a, b = zero, zero - 1.0
    else:
        raise ConfigError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    return {"a": a, "b": b} | {name: table[name] for name in ROW[2:]}


# The rule itself. Arguments are scalars or arrays of any one backend.


def estimate_x0(a, b, x, out):
    """The network's x0 before clipping."""
    return a * x - b * out


def estimate_eps(x0_from_xt, x0_from_eps, x, x0):
    """The noise that x0 implies (DDIM's eps; x0 clipped to eps_x0_max)."""
    return (x0_from_xt * x - x0) / x0_from_eps


def combine(c_x0, c_xt, c_x0_prev, c_eps, x0, x, x0_prev, eps):
    """The step's mean: c_x0 x0 + c_xt x + c_x0_prev x0_prev + c_eps eps."""
    return c_x0 * x0 + c_xt * x + c_x0_prev * x0_prev + c_eps * eps


def learned_log_var(v, log_var_min, log_var_max):
    """learned_range: log sigma^2 interpolated by frac = (v + 1) / 2."""
    frac = (v + 1.0) * 0.5
    return frac * log_var_max + (1.0 - frac) * log_var_min


def add_guidance(x_next, guide, gradient):
    """The classifier's pull on the step's mean: guide * gradient."""
    return x_next + guide * gradient


def add_noise(x_next, noise_on, sigma, z):
    """The step's output: its mean plus noise_on sigma z."""
    return x_next + noise_on * (sigma * z)
