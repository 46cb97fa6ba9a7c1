"""ddpm-fast: a fast, checked inference engine for DDPM U-Nets.

``ddpm_fast.load(path=None, **options)`` returns a Pipeline (``.network``, ``.schedule``,
``.config``, ``.sample(...)``); with no path, the embedded default model.
"""

from __future__ import annotations

import os

from .checkpoints import load_checkpoint, save_pipeline
from .errors import CheckpointError, ConfigError, DdpmFastError
from .pipeline import DiffusionConfig, Pipeline
from .version import __version__


def load(path: str | os.PathLike | None = None, **options) -> Pipeline:
    """Load a checkpoint (any format ddpm-fast reads) as a Pipeline; None: the embedded default.

    Options: ``use_ema`` (Trainer checkpoints, default True), ``device``, and what the file may not
    say: ``image_size``, ``beta_schedule``, ``timesteps``, ``schedule_kwargs``, ``objective``,
    ``variance``, ``channels``, ``self_condition``, ``learned_variance``,
    ``resnet_block_groups``, ``attn_heads``.
    """
    if path is None:
        from .default_model import load_default

        return load_default(**options)
    return load_checkpoint(path, **options)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DdpmFastError",
    "DiffusionConfig",
    "Pipeline",
    "__version__",
    "load",
    "load_checkpoint",
    "save_pipeline",
]
