"""The model ``load()`` gives with no path: the embedded default.

A DDPM of the seed architecture trained on scikit-learn's 8 x 8 digits by
scripts/train_digits.py (1 channel, 1000 linear-schedule timesteps, pred_noise, EMA weights),
shipped in ``assets/`` as a ddpm-fast safetensors file (3.3 MB).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError

if TYPE_CHECKING:
    from .pipeline import Pipeline

ASSET = Path(__file__).parent / "assets" / "default.safetensors"
SOURCE = "embedded default (digits 8x8)"


def load_default(**options) -> Pipeline:
    """The embedded default model; options as ``load``'s."""
    from .checkpoints import load_checkpoint

    if not ASSET.exists():
        raise CheckpointError(
            f"{ASSET}: the embedded default model is missing from this installation; reinstall "
            "ddpm-fast or pass a checkpoint"
        )
    pipeline = load_checkpoint(ASSET, **options)
    pipeline.source = SOURCE
    return pipeline
