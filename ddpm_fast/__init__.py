"""ddpm-fast: a fast, checked inference engine for DDPM U-Nets.

``ddpm_fast.load(path=None, **options)`` returns a Pipeline (``.network``, ``.schedule``,
``.config``, ``.sample(...)``); with no path, the embedded default model.

The names that need torch (``Pipeline``, ``load_checkpoint``, ...) are imported on first use, so
that ``ddpm_fast.export.onnx_sampler`` (ONNX Runtime + NumPy only) runs where torch is not
installed.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from .errors import CheckpointError, ConfigError, DdpmFastError
from .version import __version__

if TYPE_CHECKING:
    from .checkpoints import load_checkpoint, save_pipeline
    from .diffusers_pipeline import from_diffusers
    from .guidance import load_classifier
    from .pipeline import DiffusionConfig, Pipeline

# name -> the submodule that defines it, imported on first access (PEP 562).
_LAZY = {
    "load_checkpoint": "checkpoints",
    "save_pipeline": "checkpoints",
    "DiffusionConfig": "pipeline",
    "from_diffusers": "diffusers_pipeline",
    "load_classifier": "guidance",
    "Pipeline": "pipeline",
}
# Submodules that ``import ddpm_fast`` used to import eagerly, reachable as attributes as before.
_SUBMODULES = ("checkpoints", "models", "noise", "pipeline", "samplers", "schedule")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


def load(path: str | os.PathLike | None = None, **options) -> Pipeline:
    """Load a checkpoint (any format ddpm-fast reads) as a Pipeline; None: the embedded default.

    Options: ``use_ema`` (Trainer checkpoints, default True), ``device``, and what the file may not
    say: ``image_size``, ``beta_schedule``, ``timesteps``, ``schedule_kwargs``, ``objective``,
    ``variance``, ``auto_normalize``, ``channels``, ``self_condition``, ``learned_variance``,
    ``resnet_block_groups``, ``attn_heads``.
    """
    if path is None:
        from .default_model import load_default

        return load_default(**options)
    from .checkpoints import load_checkpoint

    return load_checkpoint(path, **options)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DdpmFastError",
    "DiffusionConfig",
    "Pipeline",
    "__version__",
    "from_diffusers",
    "load",
    "load_checkpoint",
    "load_classifier",
    "save_pipeline",
]
