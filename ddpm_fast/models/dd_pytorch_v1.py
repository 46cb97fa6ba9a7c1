"""The U-Net of denoising-diffusion-pytorch 1.0 to 1.6, as a plain PyTorch reference.

Module and parameter names are the library's, so its state_dicts load with strict key matching;
the math is the library's line for line, so the outputs agree. Weight-standardised 3x3 convs +
GroupNorm + time scale/shift + SiLU blocks, ``Residual(PreNorm(LayerNorm, LinearAttention))`` at
every stage, full attention in the middle, pixel-unshuffle down- and nearest-neighbour upsampling.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import pairwise

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from einops.layers.torch import Rearrange
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..options import check_int
from .continuous_time import fourier_refusal
from .convs import conv_holding

FAMILY = "dd-pytorch-v1"
# Network options a user may give where a state_dict cannot tell them (see infer_config).
OPTIONS = ("channels", "self_condition", "learned_variance", "resnet_block_groups", "attn_heads")


def exists(x) -> bool:
    return x is not None


def default(val, d):
    if exists(val):
        return val
    return d() if callable(d) else d


@dataclass
class UnetConfig:
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
        if self.learned_sinusoidal_dim % 2:
            raise ConfigError(
                f"learned_sinusoidal_dim must be even, got {self.learned_sinusoidal_dim}"
            )

    def _check_types(self) -> None:
        """Every field of the type it must have (a config may come from a file's JSON)."""
        for name in ("dim", "channels", "resnet_block_groups", "learned_sinusoidal_dim",
                     "attn_heads", "attn_dim_head"):  # fmt: skip
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        for name in ("init_dim", "out_dim"):
            if getattr(self, name) is not None:
                setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        for name in ("self_condition", "learned_variance", "learned_sinusoidal_cond",
                     "random_fourier_features"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.dim_mults, list | tuple) or not self.dim_mults:
            raise ConfigError(f"dim_mults must be a list of integers, got {self.dim_mults!r}")
        self.dim_mults = tuple(check_int("dim_mults", m, minimum=1) for m in self.dim_mults)

    @property
    def block_widths(self) -> list[int]:
        """Channel counts of the stages: ``[init_dim, dim * m for m in dim_mults]``."""
        return [default(self.init_dim, self.dim), *(self.dim * m for m in self.dim_mults)]

    @property
    def output_channels(self) -> int:
        return default(self.out_dim, self.channels * (2 if self.learned_variance else 1))

    @property
    def downsample_factor(self) -> int:
        """Height and width must be multiples of this."""
        return 2 ** (len(self.dim_mults) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dim_mults"] = list(self.dim_mults)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UnetConfig:
        d = {k: v for k, v in d.items() if k != "family"}
        return cls(**d)


# small helper modules


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args, **kwargs):
        return self.fn(x, *args, **kwargs) + x


def Upsample(dim: int, dim_out: int | None = None) -> nn.Module:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(dim, default(dim_out, dim), 3, padding=1),
    )


def Downsample(dim: int, dim_out: int | None = None) -> nn.Module:
    return nn.Sequential(
        Rearrange("b c (h p1) (w p2) -> b (c p1 p2) h w", p1=2, p2=2),
        nn.Conv2d(dim * 4, default(dim_out, dim), 1),
    )


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


# time embeddings


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        half_dim = self.dim // 2
        emb = math.log(10000) / (half_dim - 1)
        emb = torch.exp(torch.arange(half_dim, device=x.device) * -emb)
        emb = x[:, None] * emb[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class RandomOrLearnedSinusoidalPosEmb(nn.Module):
    """Random (frozen) or learned Fourier features of t, with t itself prepended."""

    def __init__(self, dim: int, is_random: bool = False):
        super().__init__()
        half_dim = dim // 2
        self.weights = nn.Parameter(torch.randn(half_dim), requires_grad=not is_random)

    def forward(self, x):
        x = rearrange(x, "b -> b 1")
        freqs = x * rearrange(self.weights, "d -> 1 d") * 2 * math.pi
        fouriered = torch.cat((freqs.sin(), freqs.cos()), dim=-1)
        return torch.cat((x, fouriered), dim=-1)


# building blocks


class Block(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.proj(x)
        x = self.norm(x)
        if exists(scale_shift):
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int | None = None, groups: int = 8):
        super().__init__()
        self.mlp = (
            nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
            if exists(time_emb_dim)
            else None
        )
        self.block1 = Block(dim, dim_out, groups=groups)
        self.block2 = Block(dim_out, dim_out, groups=groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, cond=None):
        """``cond``: ``self.mlp(time_emb)`` [B or 1, 2 * dim_out], computed once per timestep by
        ``Unet.time_conditioning`` (the library applies the MLP here: the same numbers)."""
        scale_shift = None
        if exists(self.mlp) and exists(cond):
            cond = rearrange(cond, "b c -> b c 1 1")
            scale_shift = cond.chunk(2, dim=1)
        h = self.block1(x, scale_shift=scale_shift)
        h = self.block2(h)
        return h + self.res_conv(x)


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


class Unet(nn.Module):
    """``forward(x, time, x_self_cond=None)``: x [B, C, H, W], time [B] -> [B, out_dim, H, W]."""

    def __init__(self, config: UnetConfig):
        super().__init__()
        self.config = config
        dim, channels = config.dim, config.channels
        self.channels = channels
        self.self_condition = config.self_condition
        input_channels = channels * (2 if config.self_condition else 1)

        dims = config.block_widths
        init_dim = dims[0]
        self.init_conv = nn.Conv2d(input_channels, init_dim, 7, padding=3)
        in_out = list(pairwise(dims))
        block_klass = partial(ResnetBlock, groups=config.resnet_block_groups)
        attn_klass = partial(
            LinearAttention, heads=config.attn_heads, dim_head=config.attn_dim_head
        )

        time_dim = dim * 4
        self.random_or_learned_sinusoidal_cond = (
            config.learned_sinusoidal_cond or config.random_fourier_features
        )
        if self.random_or_learned_sinusoidal_cond:
            sinu_pos_emb = RandomOrLearnedSinusoidalPosEmb(
                config.learned_sinusoidal_dim, config.random_fourier_features
            )
            fourier_dim = config.learned_sinusoidal_dim + 1
        else:
            sinu_pos_emb = SinusoidalPosEmb(dim)
            fourier_dim = dim
        self.time_mlp = nn.Sequential(
            sinu_pos_emb,
            nn.Linear(fourier_dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )

        self.downs = nn.ModuleList([])
        self.ups = nn.ModuleList([])
        num_resolutions = len(in_out)
        for ind, (dim_in, dim_out) in enumerate(in_out):
            is_last = ind >= (num_resolutions - 1)
            self.downs.append(
                nn.ModuleList(
                    [
                        block_klass(dim_in, dim_in, time_emb_dim=time_dim),
                        block_klass(dim_in, dim_in, time_emb_dim=time_dim),
                        Residual(PreNorm(dim_in, attn_klass(dim_in))),
                        Downsample(dim_in, dim_out)
                        if not is_last
                        else nn.Conv2d(dim_in, dim_out, 3, padding=1),
                    ]
                )
            )

        mid_dim = dims[-1]
        self.mid_block1 = block_klass(mid_dim, mid_dim, time_emb_dim=time_dim)
        self.mid_attn = Residual(
            PreNorm(mid_dim, Attention(mid_dim, config.attn_heads, config.attn_dim_head))
        )
        self.mid_block2 = block_klass(mid_dim, mid_dim, time_emb_dim=time_dim)

        for ind, (dim_in, dim_out) in enumerate(reversed(in_out)):
            is_last = ind == (len(in_out) - 1)
            self.ups.append(
                nn.ModuleList(
                    [
                        block_klass(dim_out + dim_in, dim_out, time_emb_dim=time_dim),
                        block_klass(dim_out + dim_in, dim_out, time_emb_dim=time_dim),
                        Residual(PreNorm(dim_out, attn_klass(dim_out))),
                        Upsample(dim_out, dim_in)
                        if not is_last
                        else nn.Conv2d(dim_out, dim_in, 3, padding=1),
                    ]
                )
            )

        self.out_dim = config.output_channels
        self.final_res_block = block_klass(dim * 2, dim, time_emb_dim=time_dim)
        self.final_conv = nn.Conv2d(dim, self.out_dim, 1)

    def time_conditioning(self, time: torch.Tensor) -> dict[str, torch.Tensor]:
        """{ResnetBlock name: its ``mlp(time_mlp(time))`` [n, 2 * dim_out]} (scale, then shift),
        float32, in module order."""
        t = self.time_mlp(time)
        return {
            name: m.mlp(t).float()
            for name, m in self.named_modules()
            if isinstance(m, ResnetBlock) and m.mlp is not None
        }

    def forward(self, x, time, x_self_cond=None):
        return self.forward_conditioned(x, self.time_conditioning(time), x_self_cond)

    def forward_conditioned(self, x, cond: dict[str, torch.Tensor], x_self_cond=None):
        """The forward given ``cond = time_conditioning(time)``."""
        if self.self_condition:
            x_self_cond = default(x_self_cond, lambda: torch.zeros_like(x))
            x = torch.cat((x_self_cond, x), dim=1)

        x = self.init_conv(x)
        r = x.clone()
        h = []

        for i, (block1, block2, attn, downsample) in enumerate(self.downs):
            x = block1(x, cond[f"downs.{i}.0"])
            h.append(x)
            x = block2(x, cond[f"downs.{i}.1"])
            x = attn(x)
            h.append(x)
            x = downsample(x)

        x = self.mid_block1(x, cond["mid_block1"])
        x = self.mid_attn(x)
        x = self.mid_block2(x, cond["mid_block2"])

        for i, (block1, block2, attn, upsample) in enumerate(self.ups):
            x = torch.cat((x, h.pop()), dim=1)
            x = block1(x, cond[f"ups.{i}.0"])
            x = torch.cat((x, h.pop()), dim=1)
            x = block2(x, cond[f"ups.{i}.1"])
            x = attn(x)
            x = upsample(x)

        x = torch.cat((x, r), dim=1)
        x = self.final_res_block(x, cond["final_res_block"])
        return self.final_conv(x)


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

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointError(f"missing key {key!r}: this is not a {FAMILY} Unet state_dict")
        return tuple(state_dict[key].shape)

    time_dim, fourier_dim = shape("time_mlp.1.weight")
    dim = time_dim // 4
    learned = "time_mlp.0.weights" in state_dict
    init_dim, in_channels = shape("init_conv.weight")[:2]
    out_channels = shape("final_conv.weight")[0]

    num_stages = len({int(m.group(1)) for k in state_dict if (m := re.match(r"downs\.(\d+)\.", k))})
    if num_stages == 0:
        raise CheckpointError(f"no 'downs.*' keys: this is not a {FAMILY} Unet state_dict")
    widths = [init_dim]
    for i in range(num_stages):
        key = (
            f"downs.{i}.3.1.weight"
            if f"downs.{i}.3.1.weight" in state_dict
            else f"downs.{i}.3.weight"
        )
        widths.append(shape(key)[0])
    if any(w % dim for w in widths[1:]):
        raise CheckpointError(f"stage widths {widths[1:]} are not multiples of dim={dim}")
    dim_mults = tuple(w // dim for w in widths[1:])
    hidden = shape("downs.0.2.fn.fn.to_qkv.weight")[0] // 3

    channels = options.pop("channels", None)
    self_condition = options.pop("self_condition", None)
    learned_variance = options.pop("learned_variance", None)
    if channels is None:
        if self_condition is None:
            self_condition = in_channels == 2 * out_channels
        channels = in_channels // 2 if self_condition else in_channels
    if self_condition is None:
        self_condition = in_channels == 2 * channels
    if learned_variance is None:
        learned_variance = out_channels == 2 * channels
    heads = check_int("attn_heads", options.pop("attn_heads", UnetConfig.attn_heads), minimum=1)
    if hidden % heads:
        raise CheckpointError(
            f"the attention width {hidden} (downs.0.2.fn.fn.to_qkv.weight) is not a multiple of "
            f"attn_heads={heads}"
        )
    config = UnetConfig(
        dim=dim,
        init_dim=init_dim if init_dim != dim else None,
        dim_mults=dim_mults,
        channels=channels,
        self_condition=self_condition,
        learned_variance=learned_variance,
        learned_sinusoidal_cond=learned,
        learned_sinusoidal_dim=fourier_dim - 1 if learned else 16,
        attn_heads=heads,
        attn_dim_head=hidden // heads,
        **options,
    )
    if config.output_channels != out_channels:
        config.out_dim = out_channels
    return config
