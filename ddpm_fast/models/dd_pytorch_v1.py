"""The U-Net of denoising-diffusion-pytorch 1.0 to 1.6, as a plain PyTorch reference.

Module and parameter names are the library's, so its state_dicts load with strict key matching;
the math is the library's line for line, so the outputs agree. Weight-standardised 3x3 convs +
GroupNorm + time scale/shift + SiLU blocks, ``Residual(PreNorm(LayerNorm, LinearAttention))`` at
every stage, full attention in the middle, pixel-unshuffle down- and nearest-neighbour upsampling.

The pieces 2.x has too (the Unet's construction and forward, ``ResnetBlock``, ``Block``'s
forward, ``Upsample``, ``Downsample``, the time embeddings, what ``infer_config`` reads of both)
are :mod:`ddpm_fast.models.dd_pytorch_common`'s; 1.x's own are its Block's weight-standardised
conv and GroupNorm, ``Residual(PreNorm(...))`` around LayerNorm-ed attentions, and its config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..options import check_int
from . import dd_pytorch_common as common
from .continuous_time import fourier_refusal
from .convs import conv_holding

FAMILY = "dd-pytorch-v1"
# Network options a user may give where a state_dict cannot tell them (see infer_config).
OPTIONS = ("channels", "self_condition", "learned_variance", "resnet_block_groups", "attn_heads")


@dataclass
class UnetConfig(common.ConfigShape):
    """The constructor arguments of the library's ``Unet`` (with its defaults), plus the
    attention shape that 1.x fixes at 4 heads of 32 (kept here so a config says it)."""

    dim: int
    init_dim: int | None = None
    out_dim: int | None = None
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    channels: int = 3
    self_condition: bool = False
    resnet_block_groups: int = 8
    learned_variance: bool = False
    learned_sinusoidal_cond: bool = False
    random_fourier_features: bool = False
    learned_sinusoidal_dim: int = 16
    attn_heads: int = 4
    attn_dim_head: int = 32
    family: str = field(default=FAMILY, init=False)

    def __post_init__(self) -> None:
        self._check_types()
        if self.dim <= 0 or not self.dim_mults or min(self.dim_mults) <= 0:
            raise ConfigError(
                f"dim and dim_mults must be positive, got {self.dim}, {self.dim_mults}"
            )
        if self.init_dim not in (None, self.dim):
            # The final block takes cat(x, r) with 2 * init_dim channels but is built for 2 * dim:
            # the library builds such a network and fails in its forward.
            raise ConfigError(
                f"init_dim must equal dim ({self.dim}) in {FAMILY}, got {self.init_dim}"
            )
        groups = self.resnet_block_groups
        widths = {self.dim, *self.block_widths}
        bad = sorted(w for w in widths if w % groups)
        if bad:
            raise ConfigError(
                f"resnet_block_groups={groups} must divide every block width; {bad} do not"
            )

    def _check_types(self) -> None:
        """Every field of the type it must have (a config may come from a file's JSON)."""
        ints = ("dim", "channels", "resnet_block_groups", "learned_sinusoidal_dim", "attn_heads")
        common.check_fields(self, (*ints, "attn_dim_head"))


# small helper modules


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args, **kwargs):
        return self.fn(x, *args, **kwargs) + x


def dtype_eps(dtype: torch.dtype) -> float:
    """The library's epsilon for weight standardisation and LayerNorm: 1e-5 in fp32, else 1e-3."""
    return 1e-5 if dtype == torch.float32 else 1e-3


class WeightStandardizedConv2d(nn.Conv2d):
    """Weight standardisation (arXiv 1903.10520): w <- (w - mean_o) / sqrt(var_o + eps) per
    output channel o."""

    def standardized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        eps = dtype_eps(dtype)
        weight = self.weight
        mean = reduce(weight, "o ... -> o 1 1 1", "mean")
        var = reduce(weight, "o ... -> o 1 1 1", partial(torch.var, unbiased=False))
        return (weight - mean) * (var + eps).rsqrt()

    def forward(self, x):
        weight = self.standardized_weight(x.dtype)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class LayerNorm(nn.Module):
    """LayerNorm over channels (per pixel), gain only, the library's dtype-dependent eps."""

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        eps = dtype_eps(x.dtype)
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn = fn
        self.norm = LayerNorm(dim)

    def forward(self, x):
        return self.fn(self.norm(x))


# building blocks


class Block(common.Block):
    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__(
            WeightStandardizedConv2d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out)
        )


class ResnetBlock(common.ResnetBlock):
    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int | None = None, groups: int = 8):
        block = partial(Block, groups=groups)
        super().__init__(dim, dim_out, time_emb_dim=time_emb_dim, block=block)


class LinearAttention(nn.Module):
    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden_dim, dim, 1), LayerNorm(dim))

    def forward(self, x):
        h, w = x.shape[-2:]
        qkv = self.to_qkv(x).chunk(3, dim=1)
        q, k, v = (rearrange(t, "b (h c) x y -> b h c (x y)", h=self.heads) for t in qkv)
        q = q.softmax(dim=-2)
        k = k.softmax(dim=-1)
        q = q * self.scale
        v = v / (h * w)
        context = torch.einsum("b h d n, b h e n -> b h d e", k, v)
        out = torch.einsum("b h d e, b h d n -> b h e n", context, q)
        out = rearrange(out, "b h c (x y) -> b (h c) x y", h=self.heads, x=h, y=w)
        return self.to_out(out)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        qkv = self.to_qkv(x).chunk(3, dim=1)
        q, k, v = (rearrange(t, "b (h c) x y -> b h c (x y)", h=self.heads) for t in qkv)
        q = q * self.scale
        sim = torch.einsum("b h d i, b h d j -> b h i j", q, k)
        attn = sim.softmax(dim=-1)
        out = torch.einsum("b h i j, b h d j -> b h i d", attn, v)
        out = rearrange(out, "b h (x y) d -> b (h d) x y", x=h, y=w)
        return self.to_out(out)


class Unet(common.Unet):
    """``forward(x, time, x_self_cond=None)``: x [B, C, H, W], time [B] -> [B, out_dim, H, W].

    The library's Unet (:class:`~ddpm_fast.models.dd_pytorch_common.Unet`) with 1.x's blocks:
    ``Residual(PreNorm(LinearAttention))`` at every stage and ``Residual(PreNorm(Attention))`` in
    the middle, 4 heads of 32 unless the config says otherwise. ``final_res_block`` works at
    ``init_dim``, which is ``dim`` here (the library writes ``dim``)."""

    def resnet_block(self, dim_in: int, dim_out: int, time_emb_dim: int) -> ResnetBlock:
        groups = self.config.resnet_block_groups
        return ResnetBlock(dim_in, dim_out, time_emb_dim=time_emb_dim, groups=groups)

    def stage_attention(self, stage: int, width: int) -> nn.Module:
        attention = LinearAttention(width, self.config.attn_heads, self.config.attn_dim_head)
        return Residual(PreNorm(width, attention))

    def mid_attention(self, width: int) -> nn.Module:
        return Residual(
            PreNorm(width, Attention(width, self.config.attn_heads, self.config.attn_dim_head))
        )


# the family contract (see ddpm_fast.models)

# What the shapes of a state_dict cannot tell, with the library's defaults.
UNSTORED_DEFAULTS = {
    "resnet_block_groups": UnetConfig.resnet_block_groups,
    "attn_heads": UnetConfig.attn_heads,
}
# Norms a half-precision graph computes in float32 (the library's half-precision LayerNorm eps,
# 1e-3 for 1e-5, alone moves a trained network's output by ~2.5e-2).
HALF_PRECISION_FP32 = (nn.GroupNorm, LayerNorm)


def matches(weights: dict[str, torch.Tensor]) -> bool:
    """A 1.x Unet: a time MLP, GroupNorm Blocks (``norm.weight``; 2.x has RMSNorm ``norm.g``)
    and linear attention behind a PreNorm at every stage (``downs.0.2.fn.fn``)."""
    return (
        "time_mlp.1.weight" in weights
        and "downs.0.0.block1.norm.weight" in weights
        and "downs.0.0.block1.proj.weight" in weights
        and "downs.0.2.fn.fn.to_qkv.weight" in weights
    )


def gaussian_diffusion_refuses(config: UnetConfig) -> str | None:
    """Why 1.6.4's GaussianDiffusion would not hold this network, or None (a continuous-time
    file: ``continuous_time``)."""
    return fourier_refusal(config, "1.6.4")


def remap_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """1.x keys are this reference's already."""
    return weights


def standardized_conv(conv: WeightStandardizedConv2d) -> nn.Conv2d:
    """A plain conv with ``conv``'s weight standardised in float32 (the library's fp32 eps):
    a half-precision engine casts the fp32 reference's weights, it does not re-standardise
    with the library's looser half-precision eps."""
    weight = conv.standardized_weight(torch.float32).to(conv.weight.dtype)
    return conv_holding(
        weight,
        conv.bias,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
    )


def fold(network: Unet) -> None:
    """Every WeightStandardizedConv2d of ``network`` becomes :func:`standardized_conv`, in place."""
    for module in list(network.modules()):
        for name, child in module.named_children():
            if isinstance(child, WeightStandardizedConv2d):
                setattr(module, name, standardized_conv(child))


def infer_config(state_dict: dict[str, torch.Tensor], **options) -> UnetConfig:
    """The config that the weight shapes of a library state_dict determine.

    Shapes fix dim, init_dim, dim_mults, channels, out_dim, self_condition, learned_variance and
    the time-embedding kind; ``options`` supply the rest (resnet_block_groups, attn_heads) and may
    settle what shapes leave open: (in, out) channels of (2c, 2c) read as c' = 2c unless
    ``channels``/``self_condition``/``learned_variance`` say otherwise. Random and learned Fourier
    features compute the same function, so both read as ``learned_sinusoidal_cond``.
    """

    shapes = common.read_shapes(state_dict, FAMILY)
    hidden = shapes.shape("downs.0.2.fn.fn.to_qkv.weight")[0] // 3
    channels = common.read_channels(options, shapes)
    heads = check_int("attn_heads", options.pop("attn_heads", UnetConfig.attn_heads), minimum=1)
    if hidden % heads:
        raise CheckpointError(
            f"the attention width {hidden} (downs.0.2.fn.fn.to_qkv.weight) is not a multiple of "
            f"attn_heads={heads}"
        )
    config = UnetConfig(
        **shapes.config_fields(),
        **channels,
        attn_heads=heads,
        attn_dim_head=hidden // heads,
        **options,
    )
    return common.with_out_channels(config, shapes)
