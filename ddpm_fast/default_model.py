"""The model ``load()`` gives with no path: the embedded default.

Until trained weights ship in ``assets/``, it is a small network initialised from a fixed seed,
labelled untrained: it exercises every code path and draws noise-like images.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ConfigError
from .models.dd_pytorch_v1 import Unet, UnetConfig
from .pipeline import DiffusionConfig, Pipeline, override_diffusion
from .schedule import ScheduleConfig

ASSET = Path(__file__).parent / "assets" / "default.safetensors"
UNTRAINED_CONFIG = UnetConfig(dim=16, dim_mults=(1, 2), channels=1)
UNTRAINED_DIFFUSION = DiffusionConfig(
    image_size=8, schedule=ScheduleConfig("linear", 1000), objective="pred_noise"
)


def untrained_default() -> Pipeline:
    """The placeholder: the default architecture with weights from seed 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = Unet(UNTRAINED_CONFIG)
    return Pipeline(
        network,
        UNTRAINED_DIFFUSION,
        source="embedded default (untrained)",
        notes=("untrained: random weights from seed 0; its samples are noise",),
    )


def load_default(**options) -> Pipeline:
    """The shipped weights if present, else the untrained placeholder; options as ``load``'s."""
    from .checkpoints import load_checkpoint, split_options

    if ASSET.exists():
        return load_checkpoint(ASSET, **options)
    device = options.pop("device", None)
    options.pop("use_ema", None)
    unet_options, diffusion_options = split_options(options)
    if unet_options:
        raise ConfigError(
            f"the default model's network is fixed; {', '.join(unet_options)} cannot be set"
        )
    pipeline = untrained_default()
    pipeline = Pipeline(
        pipeline.network,
        override_diffusion(pipeline.diffusion, diffusion_options),
        source=pipeline.source,
        notes=pipeline.notes,
    )
    if device is not None:
        pipeline.network.to(device)
    return pipeline
