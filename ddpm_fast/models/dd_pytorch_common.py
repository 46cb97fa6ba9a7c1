"""What denoising-diffusion-pytorch's 1.x and 2.x U-Nets share, written once for both families.

The library repeats these pieces in each version's file. Here the family files
(:mod:`ddpm_fast.models.dd_pytorch_v1`, :mod:`ddpm_fast.models.dd_pytorch_v2`) keep what differs
(each Block's conv and norm, the attentions, the config's fields and checks, what
``infer_config`` reads beyond the stage widths) and take the rest from here, under the library's
names, so that module and parameter names (the checkpoints' state_dict keys) stay the library's:

- ``exists``, ``default``, ``Upsample``, ``Downsample``, ``SinusoidalPosEmb``,
  ``RandomOrLearnedSinusoidalPosEmb``: the same in both versions, line for line (1.x's
  SinusoidalPosEmb is 2.x's at its default ``theta``);
- ``Block``'s forward (conv, norm, ``x * (scale + 1) + shift``, SiLU; each family builds its own
  conv and norm) and ``ResnetBlock`` (each family says which Block it holds);
- ``Unet``: the U-Net both versions build, in the library's construction order (the order of its
  state_dict and of its time conditioning), its time MLP and its forward (the U-Net walk); a
  family subclass says which ResnetBlock, which attention at each stage and in the middle, and
  whether the Unet adds the attention's residual (2.x) or the attention holds it (1.x's
  ``Residual``);
- ``ConfigShape``: the config properties and JSON round trip both configs have; ``check_fields``
  the type checks both make;
- ``read_shapes``, ``read_channels`` and ``with_out_channels``: what both ``infer_config`` read
  off a state_dict (a time MLP whose width is not 4 * dim is refused for both, as 2.x did).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import pairwise

import torch
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..options import check_int


def exists(x) -> bool:
    return x is not None


def default(val, d):
    if exists(val):
        return val
    return d() if callable(d) else d


# the config


def boolean(name: str, value) -> bool:
    """``value`` if it is a bool; ConfigError otherwise (a config may come from a file's JSON)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def check_fields(config, ints: tuple[str, ...]) -> None:
    """The type checks both configs make, in place: ``ints`` and the optional ``init_dim`` and
    ``out_dim`` positive integers, the flags booleans, ``dim_mults`` a tuple of positive
    integers."""
    for name in ints:
        setattr(config, name, check_int(name, getattr(config, name), minimum=1))
    for name in ("init_dim", "out_dim"):
        if getattr(config, name) is not None:
            setattr(config, name, check_int(name, getattr(config, name), minimum=1))
    for name in ("self_condition", "learned_variance", "learned_sinusoidal_cond",
                 "random_fourier_features"):  # fmt: skip
        boolean(name, getattr(config, name))
    if not isinstance(config.dim_mults, list | tuple) or not config.dim_mults:
        raise ConfigError(f"dim_mults must be a list of integers, got {config.dim_mults!r}")
    config.dim_mults = tuple(check_int("dim_mults", m, minimum=1) for m in config.dim_mults)
    if config.learned_sinusoidal_dim % 2:
        raise ConfigError(
            f"learned_sinusoidal_dim must be even, got {config.learned_sinusoidal_dim}"
        )


class ConfigShape:
    """What both versions' ``UnetConfig`` dataclasses derive from their fields (``dim``,
    ``init_dim``, ``dim_mults``, ``out_dim``, ``channels``, ``learned_variance``, ``family``)."""

    @property
    def block_widths(self) -> list[int]:
        """Channel counts of the stages: ``[init_dim, dim * m for m in dim_mults]``."""
        return [default(self.init_dim, self.dim), *(self.dim * m for m in self.dim_mults)]

    @property
    def num_classes(self) -> None:
        """Neither version is class-conditional."""
        return None

    @property
    def output_channels(self) -> int:
        return default(self.out_dim, self.channels * (2 if self.learned_variance else 1))

    @property
    def downsample_factor(self) -> int:
        """Height and width must be multiples of this."""
        return 2 ** (len(self.dim_mults) - 1)

    def to_dict(self) -> dict:
        """The fields as JSON values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        """The config of ``to_dict``'s dict; ConfigError for an unknown or missing field."""
        d = {k: v for k, v in d.items() if k != "family"}
        try:
            return cls(**d)
        except TypeError as err:
            raise ConfigError(f"not a {cls.family} UnetConfig: {err}") from None


# small helper modules


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


# time embeddings


class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int, theta: int = 10000):
        super().__init__()
        self.dim = dim
        self.theta = theta

    def forward(self, x):
        half_dim = self.dim // 2
        emb = math.log(self.theta) / (half_dim - 1)
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
    """``proj`` -> ``norm`` -> ``* (scale + 1) + shift`` -> SiLU; a family's Block gives its conv
    and norm."""

    def __init__(self, proj: nn.Module, norm: nn.Module):
        super().__init__()
        self.proj = proj
        self.norm = norm
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.proj(x)
        x = self.norm(x)
        if exists(scale_shift):
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two ``block(dim, dim_out)`` (the first scaled and shifted by the time embedding's
    projection ``mlp``), plus a 1x1 conv of x where the width changes."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        *,
        time_emb_dim: int | None = None,
        block: Callable[[int, int], nn.Module],
    ):
        super().__init__()
        self.mlp = (
            nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
            if exists(time_emb_dim)
            else None
        )
        self.block1 = block(dim, dim_out)
        self.block2 = block(dim_out, dim_out)
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


class Unet(nn.Module):
    """``forward(x, time, x_self_cond=None)``: x [B, C, H, W], time [B] -> [B, out_dim, H, W].

    The library's Unet less what its versions do differently, which a family's subclass gives:
    ``resnet_block``, ``stage_attention``, ``mid_attention`` and ``attention_residual``. The
    modules are built in the library's order (the state_dict's order, and a seeded network's
    initial weights)."""

    # Whether the Unet adds x to each attention's output (2.x), or the attention holds its own
    # residual (1.x's Residual(PreNorm(...))).
    attention_residual: bool = False

    def __init__(self, config, theta: int = 10000):
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
            sinu_pos_emb = SinusoidalPosEmb(dim, theta=theta)
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
                        self.resnet_block(dim_in, dim_in, time_dim),
                        self.resnet_block(dim_in, dim_in, time_dim),
                        self.stage_attention(ind, dim_in),
                        Downsample(dim_in, dim_out)
                        if not is_last
                        else nn.Conv2d(dim_in, dim_out, 3, padding=1),
                    ]
                )
            )

        mid_dim = dims[-1]
        self.mid_block1 = self.resnet_block(mid_dim, mid_dim, time_dim)
        self.mid_attn = self.mid_attention(mid_dim)
        self.mid_block2 = self.resnet_block(mid_dim, mid_dim, time_dim)

        for ind, (dim_in, dim_out) in enumerate(reversed(in_out)):
            is_last = ind == (len(in_out) - 1)
            self.ups.append(
                nn.ModuleList(
                    [
                        self.resnet_block(dim_out + dim_in, dim_out, time_dim),
                        self.resnet_block(dim_out + dim_in, dim_out, time_dim),
                        self.stage_attention(num_resolutions - 1 - ind, dim_out),
                        Upsample(dim_out, dim_in)
                        if not is_last
                        else nn.Conv2d(dim_out, dim_in, 3, padding=1),
                    ]
                )
            )

        self.out_dim = config.output_channels
        self.final_res_block = self.resnet_block(init_dim * 2, init_dim, time_dim)
        self.final_conv = nn.Conv2d(init_dim, self.out_dim, 1)

    def resnet_block(self, dim_in: int, dim_out: int, time_emb_dim: int) -> ResnetBlock:
        raise NotImplementedError

    def stage_attention(self, stage: int, width: int) -> nn.Module:
        """The attention of down stage ``stage`` (and of its up stage), at ``width`` channels."""
        raise NotImplementedError

    def mid_attention(self, width: int) -> nn.Module:
        raise NotImplementedError

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

    def attend(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A stage's or the middle's attention, with its residual."""
        return attn(x) + x if self.attention_residual else attn(x)

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
            x = self.attend(attn, x)
            h.append(x)
            x = downsample(x)

        x = self.mid_block1(x, cond["mid_block1"])
        x = self.attend(self.mid_attn, x)
        x = self.mid_block2(x, cond["mid_block2"])

        for i, (block1, block2, attn, upsample) in enumerate(self.ups):
            x = torch.cat((x, h.pop()), dim=1)
            x = block1(x, cond[f"ups.{i}.0"])
            x = torch.cat((x, h.pop()), dim=1)
            x = block2(x, cond[f"ups.{i}.1"])
            x = self.attend(attn, x)
            x = upsample(x)

        x = torch.cat((x, r), dim=1)
        x = self.final_res_block(x, cond["final_res_block"])
        return self.final_conv(x)


# what both infer_config read off a state_dict


@dataclass
class Shapes:
    """What the weight shapes of either version's Unet state_dict fix alike."""

    dim: int
    init_dim: int
    dim_mults: tuple[int, ...]
    in_channels: int
    out_channels: int
    learned_sinusoidal_cond: bool
    learned_sinusoidal_dim: int
    num_stages: int
    shape: Callable[[str], tuple[int, ...]]  # a key's shape; CheckpointError where it is missing

    def config_fields(self) -> dict:
        """The config fields these shapes fix (``init_dim`` None where it is ``dim``)."""
        return dict(
            dim=self.dim,
            init_dim=self.init_dim if self.init_dim != self.dim else None,
            dim_mults=self.dim_mults,
            learned_sinusoidal_cond=self.learned_sinusoidal_cond,
            learned_sinusoidal_dim=self.learned_sinusoidal_dim,
        )


def read_shapes(state_dict: dict[str, torch.Tensor], family: str) -> Shapes:
    """dim (the time MLP's width / 4), the time-embedding kind, init_dim, the in and out channels
    and each stage's width (its downsampling's outputs); CheckpointError naming the key where a
    shape does not fit."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointError(f"missing key {key!r}: this is not a {family} Unet state_dict")
        return tuple(state_dict[key].shape)

    time_dim, fourier_dim = shape("time_mlp.1.weight")[:2]
    if time_dim % 4:
        raise CheckpointError(f"time_mlp.1.weight has {time_dim} outputs, not 4 * dim")
    dim = time_dim // 4
    learned = "time_mlp.0.weights" in state_dict
    init_dim, in_channels = shape("init_conv.weight")[:2]
    out_channels = shape("final_conv.weight")[0]

    num_stages = len({int(m.group(1)) for k in state_dict if (m := re.match(r"downs\.(\d+)\.", k))})
    if num_stages == 0:
        raise CheckpointError(f"no 'downs.*' keys: this is not a {family} Unet state_dict")
    widths = [init_dim]
    for i in range(num_stages):
        down = f"downs.{i}.3.1.weight" if f"downs.{i}.3.1.weight" in state_dict else None
        widths.append(shape(down or f"downs.{i}.3.weight")[0])
    if any(w % dim for w in widths[1:]):
        raise CheckpointError(f"stage widths {widths[1:]} are not multiples of dim={dim}")
    return Shapes(
        dim=dim,
        init_dim=init_dim,
        dim_mults=tuple(w // dim for w in widths[1:]),
        in_channels=in_channels,
        out_channels=out_channels,
        learned_sinusoidal_cond=learned,
        learned_sinusoidal_dim=fourier_dim - 1 if learned else 16,
        num_stages=num_stages,
        shape=shape,
    )


def read_channels(options: dict, shapes: Shapes) -> dict:
    """channels, self_condition and learned_variance, taken out of ``options`` where given, else
    read off the in and out channels: (in, out) of (2c, 2c) read as c' = 2c unless an option
    says otherwise."""
    in_channels, out_channels = shapes.in_channels, shapes.out_channels
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
    return dict(channels=channels, self_condition=self_condition, learned_variance=learned_variance)


def with_out_channels(config, shapes: Shapes):
    """``config`` with ``out_dim`` set where the default would not give the file's outputs."""
    if config.output_channels != shapes.out_channels:
        config.out_dim = shapes.out_channels
    return config
