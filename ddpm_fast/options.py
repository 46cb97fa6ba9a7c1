"""The names and checks of user options, without torch: the CLI and ``OnnxSampler`` use them
where torch is not installed, and the torch-backed modules take their lists from here (tests
check that each list matches the tables it names)."""

from __future__ import annotations

import math
import numbers

from .errors import ConfigError

OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")
# What runs the engine's fp32 step on the CPU (ddpm_fast.engine.onnx_executor).
CPU_EXECUTORS = ("auto", "onnxruntime", "torch")
EXECUTOR_ENV = "DDPM_FAST_CPU_EXECUTOR"  # the default executor where the caller gives none
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
BETA_SCHEDULES = (
    "linear",
    "cosine",
    "sigmoid",
    "diffusers_linear",
    "diffusers_scaled_linear",
    "diffusers_squaredcos_cap_v2",
    "diffusers_sigmoid",
    "trained",
)
ENGINE_DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_BATCH_SIZE = 64
# Bounds that keep a typo (or a crafted file) from asking for terabytes before anything runs.
MAX_TIMESTEPS = 100_000
MAX_IMAGE_SIZE = 16_384


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int if it is an integer (Python or NumPy, not bool) within the bounds,
    else a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {_shown(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")
    return value


def check_seed(seed) -> int:
    """``seed`` as an int if it is an integer (Python or NumPy, not bool) in [0, 2**32): the low
    32 bits of the Philox key (``ddpm_fast.noise_stream``), else a ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {_shown(seed)}")
    return int(seed)


def check_real(name: str, value, *, minimum: float | None = None) -> float:
    """``value`` as a finite float (an int or float, not bool) at least ``minimum``, else a
    ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number, got {_shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g}, got {value:g}")
    return value


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; an unknown name is an error, never a default."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"unknown {name} {_shown(value)}; known: {', '.join(choices)}")
    return value


def resolve_batch_size(num: int, batch_size: int | None) -> int:
    """The batch size ``sample`` uses: as given, else up to DEFAULT_BATCH_SIZE."""
    if batch_size is None:
        return min(num, DEFAULT_BATCH_SIZE)
    return check_int("batch_size", batch_size, minimum=1)


def _shown(value) -> str:
    """A value in an error message: its repr, shortened, with its type where that helps."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return text
    return f"{text} ({type(value).__name__})"
