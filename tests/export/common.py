"""Small random models for the ONNX tests (8 x 8 images, dim 8: fast on a 2-core CPU)."""

from __future__ import annotations

import copy

import torch

from ddpm_fast.models.dd_pytorch_v1 import Unet, UnetConfig
from ddpm_fast.pipeline import DiffusionConfig, Pipeline
from ddpm_fast.schedule import ScheduleConfig


def make_pipeline(
    *,
    objective: str = "pred_noise",
    self_condition: bool = False,
    learned_variance: bool = False,
    variance: str = "fixed_small",
    schedule: str = "linear",
    timesteps: int = 100,
    channels: int = 1,
    image_size: int = 8,
    learned_sinusoidal_cond: bool = False,
    seed: int = 0,
) -> Pipeline:
    """A random network whose every weight (norm gains and biases included) is perturbed, so that
    no path is an identity."""
    torch.manual_seed(seed)
    config = UnetConfig(
        dim=8,
        dim_mults=(1, 2),
        channels=channels,
        self_condition=self_condition,
        learned_variance=learned_variance,
        learned_sinusoidal_cond=learned_sinusoidal_cond,
        resnet_block_groups=4,
        attn_heads=2,
        attn_dim_head=8,
    )
    network = Unet(config)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    diffusion = DiffusionConfig(
        image_size=image_size,
        schedule=ScheduleConfig(schedule, timesteps),
        objective=objective,
        variance=variance,
    )
    return Pipeline(network, diffusion, source=f"test model (seed {seed})")


def perturbed(pipeline: Pipeline, scale: float = 1e-2) -> Pipeline:
    """The same model with its last conv's weights moved by ``scale``: what verification must
    catch."""
    network = copy.deepcopy(pipeline.network)
    with torch.no_grad():
        network.final_conv.weight.add_(scale)
    return Pipeline(network, pipeline.diffusion, source="a perturbed copy")
