"""The bench's model zoo: named configurations with seeded random weights (time does not depend
on them), the embedded default model, or a checkpoint.

The seed's CIFAR-10 U-Net (denoising-diffusion-pytorch 1.x, dim 64, dim_mults 1, 2, 4, 8: 35.7M
parameters) at 32 x 32, 64 x 64 and 128 x 128; ``ddpm-cifar10``, the DDPM paper's CIFAR-10 network
as diffusers' UNet2DModel (google/ddpm-cifar10-32's config and scheduler, 35.7M parameters);
``dd2-cifar10``, a denoising-diffusion-pytorch 2.x Unet of the same widths; OpenAI's ADM U-Nets as
their READMEs' flags build them: ``adm-cifar10`` (improved-diffusion's CIFAR-10 model),
``adm-imagenet64`` (guided-diffusion's class-conditional 64 x 64 model) and ``adm-256`` (its
256 x 256 unconditional model, the prior of image-restoration work: for the GPU).
"""

from __future__ import annotations

import dataclasses

import torch

from .. import load
from ..errors import ConfigError
from ..guidance import Classifier
from ..models import adm, adm_classifier, dd_pytorch_v1, dd_pytorch_v2, diffusers_unet2d
from ..pipeline import DiffusionConfig, Pipeline
from ..schedule import ScheduleConfig

# google/ddpm-cifar10-32 (the DDPM paper's CIFAR-10 model as diffusers converted it): its unet's
# config.json and its scheduler_config.json, less bookkeeping fields.
DDPM_CIFAR10_UNET = {
    "_class_name": "UNet2DModel",
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "time_embedding_type": "positional",
}
DDPM_CIFAR10_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}


def _dd1_cifar10(size: int) -> Pipeline:
    network = dd_pytorch_v1.Unet(dd_pytorch_v1.UnetConfig(dim=64, dim_mults=(1, 2, 4, 8)))
    return Pipeline(network, DiffusionConfig(image_size=size), source=f"cifar10 ({size} px)")


def _ddpm_cifar10() -> Pipeline:
    from ..diffusers_folder import schedule_from_scheduler

    config = diffusers_unet2d.UnetConfig.from_diffusers(DDPM_CIFAR10_UNET)
    diffusion, _ = schedule_from_scheduler("ddpm-cifar10", DDPM_CIFAR10_SCHEDULER)
    diffusion = dataclasses.replace(diffusion, image_size=DDPM_CIFAR10_UNET["sample_size"])
    source = "ddpm-cifar10 (google/ddpm-cifar10-32's architecture, random weights)"
    return Pipeline(diffusers_unet2d.Unet(config), diffusion, source=source)


def _dd2_cifar10() -> Pipeline:
    # Unet(dim=64, dim_mults=(1, 2, 4, 8), flash_attn=False): full attention at the last stage
    # (2.x's default); GaussianDiffusion's defaults (sigmoid schedule, pred_v) at 32 px.
    network = dd_pytorch_v2.Unet(dd_pytorch_v2.UnetConfig(dim=64, dim_mults=(1, 2, 4, 8)))
    return Pipeline(network, DiffusionConfig(image_size=32), source="dd2-cifar10 (32 px)")


# The ADM models' UNetModel arguments, from their READMEs' MODEL_FLAGS (attention_ds is
# image_size // attention_resolutions; channel_mult the scripts' default for the image size).
ADM_MODELS = {
    # improved-diffusion: --image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True
    # --diffusion_steps 4000 --noise_schedule cosine (num_heads 4, attention at 16 and 8 px,
    # scale-shift norm and rescaled timesteps: the script's defaults).
    "adm-cifar10": (
        32, ("cosine", 4000),
        dict(model_channels=128, out_channels=6, num_res_blocks=3, attention_ds=(2, 4),
             channel_mult=(1, 2, 2, 2), num_heads=4, use_scale_shift_norm=True,
             timestep_scale=1000 / 4000, library="improved-diffusion"),
    ),
    # guided-diffusion's 64x64_diffusion.pt: --attention_resolutions 32,16,8 --class_cond True
    # --diffusion_steps 1000 --image_size 64 --learn_sigma True --noise_schedule cosine
    # --num_channels 192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown True
    # --use_new_attention_order True --use_scale_shift_norm True
    "adm-imagenet64": (
        64, ("cosine", 1000),
        dict(model_channels=192, out_channels=6, num_res_blocks=3, attention_ds=(2, 4, 8),
             channel_mult=(1, 2, 3, 4), num_classes=1000, num_head_channels=64,
             resblock_updown=True, use_new_attention_order=True, use_scale_shift_norm=True),
    ),
    # guided-diffusion's 256x256_diffusion_uncond.pt: --attention_resolutions 32,16,8
    # --class_cond False --diffusion_steps 1000 --image_size 256 --learn_sigma True
    # --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2
    # --resblock_updown True --use_scale_shift_norm True
    "adm-256": (
        256, ("linear", 1000),
        dict(model_channels=256, out_channels=6, num_res_blocks=2, attention_ds=(8, 16, 32),
             channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64, resblock_updown=True,
             use_scale_shift_norm=True),
    ),
}  # fmt: skip


def _adm(name: str) -> Pipeline:
    size, (schedule, steps), fields = ADM_MODELS[name]
    network = adm.Unet(adm.UnetConfig(**fields))
    diffusion = DiffusionConfig(
        image_size=size, schedule=ScheduleConfig(schedule, steps), objective="pred_noise",
        variance="learned_range",
    )  # fmt: skip
    return Pipeline(network, diffusion, source=f"{name} ({size} px, random weights)")


# name -> (what it is, its pipeline). Weights are random (seed 0): time does not depend on them.
MODELS = {
    "cifar10": ("the seed's 1.x CIFAR-10 U-Net, 32 px", lambda: _dd1_cifar10(32)),
    "cifar10-64": ("the same at 64 px", lambda: _dd1_cifar10(64)),
    "cifar10-128": ("the same at 128 px", lambda: _dd1_cifar10(128)),
    "ddpm-cifar10": ("google/ddpm-cifar10-32's UNet2DModel and scheduler", _ddpm_cifar10),
    "dd2-cifar10": ("a denoising-diffusion-pytorch 2.x Unet, dim 64, 32 px", _dd2_cifar10),
    "adm-cifar10": ("improved-diffusion's CIFAR-10 UNetModel, 32 px", lambda: _adm("adm-cifar10")),
    "adm-imagenet64": (
        "guided-diffusion's class-conditional ImageNet 64x64 UNetModel",
        lambda: _adm("adm-imagenet64"),
    ),
    "adm-256": ("guided-diffusion's unconditional 256x256 UNetModel", lambda: _adm("adm-256")),
}


# guided-diffusion's classifiers for the ADM models (create_classifier at their image size, the
# README's flags: width 128, attention at 32, 16 and 8 px, attention pooling, scale-shift norm,
# up/down ResBlocks; depth 4 at 64 px, 2 at 256), 1000 classes.
CLASSIFIERS = {
    "adm-imagenet64": (64, dict(num_res_blocks=4, attention_ds=(2, 4, 8),
                                channel_mult=(1, 2, 3, 4))),
    "adm-256": (256, dict(num_res_blocks=2, attention_ds=(8, 16, 32),
                          channel_mult=(1, 1, 2, 2, 4, 4))),
}  # fmt: skip


def model_classifier(model: str) -> Classifier:
    """The random-weight classifier (seed 0) of a model of ``CLASSIFIERS``, for ``--classifier``."""
    if model not in CLASSIFIERS:
        raise ConfigError(
            f"--classifier: the bench has classifiers for {', '.join(CLASSIFIERS)}, not {model}"
        )
    size, fields = CLASSIFIERS[model]
    config = adm_classifier.ClassifierConfig(
        in_channels=3, model_channels=128, num_classes=1000, conv_resample=True,
        use_scale_shift_norm=True, resblock_updown=True, pool="attention",
        pool_size=size // 2 ** (len(fields["channel_mult"]) - 1), **fields,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        network = adm_classifier.EncoderUNet(config)
        with torch.no_grad():
            for p in network.parameters():
                p.normal_(0.0, 0.02)
    return Classifier(network, size, source=f"{model}'s classifier (random weights)")


def model_pipeline(model: str) -> Pipeline:
    """A named configuration of ``MODELS`` (random weights, seed 0, the same every call),
    "default" (the embedded model) or a checkpoint path."""
    if model == "default":
        return load()
    if model in MODELS:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return MODELS[model][1]()
    return load(model)
