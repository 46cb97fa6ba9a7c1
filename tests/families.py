"""Tiny random networks of every registered family, for the tests written once for all of them
(tests/test_families.py, tests/export/test_families.py). A new family adds its configs here; a
registered family without any fails ``test_every_family_has_test_networks``."""

from __future__ import annotations

import torch

from ddpm_fast.models import FAMILIES, adm, dd_pytorch_v1, dd_pytorch_v2, diffusers_unet2d
from ddpm_fast.pipeline import DiffusionConfig, Pipeline
from ddpm_fast.schedule import ScheduleConfig

# family -> {case name: config}; 8 x 8 images at most 2 stages (the Triton interpreter is slow).
CONFIGS = {
    dd_pytorch_v1.FAMILY: {
        "v1-selfcond-learned-var": dd_pytorch_v1.UnetConfig(
            dim=8, dim_mults=(1, 2), self_condition=True, learned_variance=True,
            resnet_block_groups=4, attn_heads=2, attn_dim_head=8,
        ),
    },
    dd_pytorch_v2.FAMILY: {
        "v2-selfcond-learned-var-full-attn": dd_pytorch_v2.UnetConfig(
            dim=8, dim_mults=(1, 2), self_condition=True, learned_variance=True,
            full_attn=(True, False), attn_heads=(2, 3), attn_dim_head=8,
        ),
        "v2-learned-sinusoidal-init-dim": dd_pytorch_v2.UnetConfig(
            dim=8, init_dim=12, dim_mults=(1, 2), channels=1, learned_sinusoidal_cond=True,
            learned_sinusoidal_dim=8, attn_heads=2, attn_dim_head=4, num_mem_kv=2,
        ),
    },
    diffusers_unet2d.FAMILY: {
        "unet2d-cifar-like": diffusers_unet2d.UnetConfig(
            block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
            norm_num_groups=4, attention_head_dim=None, downsample_padding=0,
            flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
        ),
        "unet2d-fourier-scale-shift": diffusers_unet2d.UnetConfig(
            in_channels=1, out_channels=2, block_out_channels=(8, 16),
            down_block_types=("AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D"), layers_per_block=1,
            norm_num_groups=4, attention_head_dim=4, time_embedding_type="fourier",
            resnet_time_scale_shift="scale_shift", center_input_sample=True,
            mid_block_scale_factor=1.5,
        ),
    },
    # GroupNorm32 (the libraries' fixed 32 groups) needs widths that are multiples of 32.
    adm.FAMILY: {
        "adm-scale-shift-updown-heads": adm.UnetConfig(
            model_channels=32, out_channels=6, num_res_blocks=1, attention_ds=(2,),
            channel_mult=(1, 2), num_head_channels=16, use_new_attention_order=True,
            resblock_updown=True, use_scale_shift_norm=True,
        ),
        "adm-legacy-time-bias": adm.UnetConfig(
            model_channels=32, num_res_blocks=1, attention_ds=(1, 2), channel_mult=(1, 2),
            num_heads=2, library="improved-diffusion", timestep_scale=0.25,
        ),
    },
}  # fmt: skip
# Class-conditional networks: the tests of class labels through every path take them.
CLASS_CONDITIONAL_CONFIGS = {
    "adm-class-conditional": (adm.FAMILY, adm.UnetConfig(
        model_channels=32, out_channels=6, num_res_blocks=1, attention_ds=(2,),
        channel_mult=(1, 2), num_classes=5, num_head_channels=16, resblock_updown=True,
        use_scale_shift_norm=True,
    )),
}  # fmt: skip
# The ADM networks' GroupNorm32 gains (Sequential-indexed keys): near 1, as the others'.
ADM_NORMS = ("in_layers.0.weight", "out_layers.0.weight", "out.0.weight")
CASES = {
    name: (family, config) for family, cases in CONFIGS.items() for name, config in cases.items()
}
# Fourier features take log(t): t = 0 is NaN in diffusers too; these networks see t >= 1.
POSITIVE_TIMES = {"unet2d-fourier-scale-shift"}


def random_network(name: str, seed: int = 0) -> torch.nn.Module:
    """The case's network with every parameter random (norm gains near 1), in eval mode."""
    family, config = CASES[name] if name in CASES else CLASS_CONDITIONAL_CONFIGS[name]
    torch.manual_seed(seed)
    network = FAMILIES[family].Unet(config).eval()
    with torch.no_grad():
        for key, p in network.named_parameters():
            if key.endswith((".g", "norm.weight", "norm1.weight", "norm2.weight", *ADM_NORMS)):
                p.normal_(1.0, 0.2)
            elif key.endswith("bias") or p.dim() == 1:
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.5 / p[0].numel() ** 0.5)
    return network


def timesteps(name: str, steps: int = 100) -> torch.Tensor:
    """A few timesteps of a ``steps``-step schedule, t = 0 where the family allows it."""
    low = 1 if name in POSITIVE_TIMES else 0
    return torch.tensor([steps - 1, steps // 2, low + 1, low])


def random_pipeline(name: str, *, objective: str = "pred_noise", steps: int = 100,
                    variance: str = "fixed_small", seed: int = 0) -> Pipeline:  # fmt: skip
    network = random_network(name, seed)
    diffusion = DiffusionConfig(
        image_size=8, schedule=ScheduleConfig("linear", steps), objective=objective,
        variance=variance,
    )  # fmt: skip
    return Pipeline(network, diffusion, source=f"test network {name}")
