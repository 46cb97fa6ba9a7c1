"""The U-Net of denoising-diffusion-pytorch 2.x (written from 2.3.4), as a plain PyTorch reference.

Module and parameter names are the library's, so its state_dicts load with strict key matching;
the math is the library's line for line, so the outputs agree. Against 1.x: plain 3x3 convs +
RMSNorm + time scale/shift + SiLU blocks (no weight standardisation, no GroupNorm); each stage's
attention is linear or full (``full_attn``), with its own RMSNorm inside, learned memory
key/values prepended to its keys and values, and the residual added by the Unet; per-stage
``attn_heads`` and ``attn_dim_head``; the final block works at ``init_dim``, not ``dim``.

The library's ``flash_attn`` only picks ``F.scaled_dot_product_attention`` over the einsum path
with the same scale (dim_head ** -0.5): the same function, so it is not a config field here and
the reference always takes the einsum path. ``dropout`` is a training setting (0 at inference).

Versions: 2.0.0 to 2.3.4 have the same keys and math (2.0.0's final block works at ``dim``,
which is ``init_dim`` in every network its forward runs). 1.8 to 1.11 had this attention but
GroupNorm Blocks (``norm.weight``), 1.8 without memory key/values: neither this family nor 1.x
reads those. The family contract (``matches``, ``infer_config``, ...) is at the end.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from itertools import pairwise

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..options import check_int
from .continuous_time import fourier_refusal

FAMILY = "dd-pytorch-v2"
LIBRARY_VERSION = "2.3.4"  # the version this file and its fixtures follow


def exists(x) -> bool:
    return x is not None


def default(val, d):
    if exists(val):
        return val
    return d() if callable(d) else d


def _per_stage(name: str, value, num_stages: int, check) -> tuple:
    """The library's ``cast_tuple``: one value for every stage, or a tuple with one per stage
    (its ``zip`` would silently drop stages for a shorter tuple, so that is an error here)."""
    if isinstance(value, list | tuple):
        if len(value) != num_stages:
            raise ConfigError(
                f"{name} must have one entry per stage ({num_stages}), got {list(value)}"
            )
        return tuple(check(name, v) for v in value)
    return (check(name, value),) * num_stages


def _positive_int(name: str, value) -> int:
    return check_int(name, value, minimum=1)


def _boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass
class UnetConfig:
    """The constructor arguments of the library's ``Unet`` that change the function at inference
    (with its defaults), normalised: ``full_attn``, ``attn_heads`` and ``attn_dim_head`` become
    one entry per stage (``full_attn=None`` is the library's "full attention only at the
    innermost stage"). ``num_mem_kv`` is fixed at 4 by 2.3.4's Unet; it is a field so that a
    config says it and shapes can be checked against it."""

    dim: int
    init_dim: int | None = None
    out_dim: int | None = None
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    channels: int = 3
    self_condition: bool = False
    learned_variance: bool = False
    learned_sinusoidal_cond: bool = False
    random_fourier_features: bool = False
    learned_sinusoidal_dim: int = 16
    sinusoidal_pos_emb_theta: int = 10000
    attn_dim_head: tuple[int, ...] | int = 32
    attn_heads: tuple[int, ...] | int = 4
    full_attn: tuple[bool, ...] | bool | None = None
    num_mem_kv: int = 4
    family: str = field(default=FAMILY, init=False)

    def __post_init__(self) -> None:
        for name in ("dim", "channels", "learned_sinusoidal_dim", "sinusoidal_pos_emb_theta"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        self.num_mem_kv = check_int("num_mem_kv", self.num_mem_kv, minimum=0)
        for name in ("init_dim", "out_dim"):
            if getattr(self, name) is not None:
                setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        for name in ("self_condition", "learned_variance", "learned_sinusoidal_cond",
                     "random_fourier_features"):  # fmt: skip
            _boolean(name, getattr(self, name))
        if not isinstance(self.dim_mults, list | tuple) or not self.dim_mults:
            raise ConfigError(f"dim_mults must be a list of integers, got {self.dim_mults!r}")
        self.dim_mults = tuple(check_int("dim_mults", m, minimum=1) for m in self.dim_mults)
        stages = len(self.dim_mults)
        if not self.full_attn:  # the library's `if not full_attn`: None, False, () alike
            self.full_attn = (*((False,) * (stages - 1)), True)
        self.full_attn = _per_stage("full_attn", self.full_attn, stages, _boolean)
        self.attn_heads = _per_stage("attn_heads", self.attn_heads, stages, _positive_int)
        self.attn_dim_head = _per_stage("attn_dim_head", self.attn_dim_head, stages, _positive_int)
        if self.learned_sinusoidal_dim % 2:
            raise ConfigError(
                f"learned_sinusoidal_dim must be even, got {self.learned_sinusoidal_dim}"
            )
        sinusoidal = not self.learned_sinusoidal_cond and not self.random_fourier_features
        if sinusoidal and (self.dim < 4 or self.dim % 2):
            # SinusoidalPosEmb divides by half_dim - 1 and gives 2 * (dim // 2) features to a
            # Linear that takes dim: the library builds such a network and fails in its forward.
            raise ConfigError(
                f"dim must be even and at least 4 for sinusoidal time features, got {self.dim}"
            )

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
        for name in ("dim_mults", "full_attn", "attn_heads", "attn_dim_head"):
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UnetConfig:
        d = {k: v for k, v in d.items() if k != "family"}
        try:
            return cls(**d)
        except TypeError as err:  # an unknown or missing field
            raise ConfigError(f"not a {FAMILY} UnetConfig: {err}") from None


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


class RMSNorm(nn.Module):
    """``x / max(||x||_2 over channels, 1e-12) * g * sqrt(C)`` per pixel (F.normalize's eps)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.g * self.scale


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
    """conv 3x3 -> RMSNorm -> ``* (scale + 1) + shift`` -> SiLU."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = RMSNorm(dim_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.proj(x)
        x = self.norm(x)
        if exists(scale_shift):
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int | None = None):
        super().__init__()
        self.mlp = (
            nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
            if exists(time_emb_dim)
            else None
        )
        self.block1 = Block(dim, dim_out)
        self.block2 = Block(dim_out, dim_out)
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
    """RMSNorm, then linear attention whose keys and values start with ``num_mem_kv`` learned
    columns (``mem_kv`` [2, heads, dim_head, num_mem_kv]); no residual (the Unet adds it)."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, num_mem_kv: int = 4):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        hidden_dim = dim_head * heads
        self.norm = RMSNorm(dim)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, dim_head, num_mem_kv))
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden_dim, dim, 1), RMSNorm(dim))

    def forward(self, x):
        b, _, h, w = x.shape
        x = self.norm(x)
        qkv = self.to_qkv(x).chunk(3, dim=1)
        q, k, v = (rearrange(t, "b (h c) x y -> b h c (x y)", h=self.heads) for t in qkv)
        mk, mv = (repeat(t, "h c n -> b h c n", b=b) for t in self.mem_kv)
        k, v = torch.cat((mk, k), dim=-1), torch.cat((mv, v), dim=-1)
        q = q.softmax(dim=-2)
        k = k.softmax(dim=-1)
        q = q * self.scale
        context = torch.einsum("b h d n, b h e n -> b h d e", k, v)
        out = torch.einsum("b h d e, b h d n -> b h e n", context, q)
        out = rearrange(out, "b h c (x y) -> b (h c) x y", h=self.heads, x=h, y=w)
        return self.to_out(out)


class Attention(nn.Module):
    """RMSNorm, then softmax attention over the pixels with ``num_mem_kv`` learned keys and
    values first (``mem_kv`` [2, heads, num_mem_kv, dim_head]); no residual (the Unet adds it).
    The library's ``Attend`` with flash off: ``softmax(q k^T * dim_head ** -0.5) v``."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, num_mem_kv: int = 4):
        super().__init__()
        self.heads = heads
        hidden_dim = dim_head * heads
        self.norm = RMSNorm(dim)
        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_mem_kv, dim_head))
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        x = self.norm(x)
        qkv = self.to_qkv(x).chunk(3, dim=1)
        q, k, v = (rearrange(t, "b (h c) x y -> b h (x y) c", h=self.heads) for t in qkv)
        mk, mv = (repeat(t, "h n d -> b h n d", b=b) for t in self.mem_kv)
        k, v = torch.cat((mk, k), dim=-2), torch.cat((mv, v), dim=-2)
        scale = q.shape[-1] ** -0.5
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * scale
        attn = sim.softmax(dim=-1)
        out = torch.einsum("b h i j, b h j d -> b h i d", attn, v)
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
            sinu_pos_emb = SinusoidalPosEmb(dim, theta=config.sinusoidal_pos_emb_theta)
            fourier_dim = dim
        self.time_mlp = nn.Sequential(
            sinu_pos_emb,
            nn.Linear(fourier_dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )

        def resnet_block(dim_in: int, dim_out: int) -> ResnetBlock:
            return ResnetBlock(dim_in, dim_out, time_emb_dim=time_dim)

        def attention(width: int, full: bool, heads: int, dim_head: int) -> nn.Module:
            klass = Attention if full else LinearAttention
            return klass(width, heads=heads, dim_head=dim_head, num_mem_kv=config.num_mem_kv)

        per_stage = (config.full_attn, config.attn_heads, config.attn_dim_head)
        stages = list(zip(in_out, *per_stage, strict=True))
        self.downs = nn.ModuleList([])
        self.ups = nn.ModuleList([])
        for ind, ((dim_in, dim_out), full, heads, dim_head) in enumerate(stages):
            is_last = ind >= len(in_out) - 1
            self.downs.append(
                nn.ModuleList(
                    [
                        resnet_block(dim_in, dim_in),
                        resnet_block(dim_in, dim_in),
                        attention(dim_in, full, heads, dim_head),
                        Downsample(dim_in, dim_out)
                        if not is_last
                        else nn.Conv2d(dim_in, dim_out, 3, padding=1),
                    ]
                )
            )

        mid_dim = dims[-1]
        self.mid_block1 = resnet_block(mid_dim, mid_dim)
        self.mid_attn = attention(mid_dim, True, config.attn_heads[-1], config.attn_dim_head[-1])
        self.mid_block2 = resnet_block(mid_dim, mid_dim)

        for ind, ((dim_in, dim_out), full, heads, dim_head) in enumerate(reversed(stages)):
            is_last = ind == len(in_out) - 1
            self.ups.append(
                nn.ModuleList(
                    [
                        resnet_block(dim_out + dim_in, dim_out),
                        resnet_block(dim_out + dim_in, dim_out),
                        attention(dim_out, full, heads, dim_head),
                        Upsample(dim_out, dim_in)
                        if not is_last
                        else nn.Conv2d(dim_out, dim_in, 3, padding=1),
                    ]
                )
            )

        self.out_dim = config.output_channels
        self.final_res_block = resnet_block(init_dim * 2, init_dim)
        self.final_conv = nn.Conv2d(init_dim, self.out_dim, 1)

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
            x = attn(x) + x
            h.append(x)
            x = downsample(x)

        x = self.mid_block1(x, cond["mid_block1"])
        x = self.mid_attn(x) + x
        x = self.mid_block2(x, cond["mid_block2"])

        for i, (block1, block2, attn, upsample) in enumerate(self.ups):
            x = torch.cat((x, h.pop()), dim=1)
            x = block1(x, cond[f"ups.{i}.0"])
            x = torch.cat((x, h.pop()), dim=1)
            x = block2(x, cond[f"ups.{i}.1"])
            x = attn(x) + x
            x = upsample(x)

        x = torch.cat((x, r), dim=1)
        x = self.final_res_block(x, cond["final_res_block"])
        return self.final_conv(x)


# the family contract (see ddpm_fast.models)

# Network options a user may give: the (in, out) channel reading where shapes leave it open,
# and the one constructor argument that changes the function but is not stored.
OPTIONS = ("channels", "self_condition", "learned_variance", "sinusoidal_pos_emb_theta")
UNSTORED_DEFAULTS = {"sinusoidal_pos_emb_theta": UnetConfig.sinusoidal_pos_emb_theta}
# Norms a half-precision graph computes in float32, as the engine's kernel does (fp32 is the
# function to approximate; a sum of squares over the channels is where half precision loses most).
HALF_PRECISION_FP32 = (RMSNorm,)
# Keys only a 2.x Unet has (1.x: `mid_attn.fn.norm.g` and a GroupNorm's `norm.weight`).
SIGNATURE = ("mid_attn.mem_kv", "mid_block1.block1.norm.g", "time_mlp.1.weight")


def remap_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """2.x keys are this reference's already."""
    return weights


def fold(network: Unet) -> None:
    """Nothing to fold: 2.x's convs are plain (no weight standardisation) and its norms have
    no statistics that do not depend on the input."""


def gaussian_diffusion_refuses(config: UnetConfig) -> str | None:
    """Why 2.3.4's GaussianDiffusion would not hold this network, or None (a continuous-time
    file: ``continuous_time``)."""
    return fourier_refusal(config, LIBRARY_VERSION)


def matches(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether a Unet state_dict (prefixes stripped) is a 2.x one: its blocks' RMSNorm gains
    and the memory key/values of its attention, which 1.x has not."""
    return all(k in state_dict for k in SIGNATURE)


def infer_config(state_dict: dict[str, torch.Tensor], **options) -> UnetConfig:
    """The config that the weight shapes of a 2.x Unet state_dict determine.

    Shapes fix dim, init_dim, dim_mults, channels, out_dim, self_condition, learned_variance,
    the time-embedding kind, and per stage full vs linear attention (a linear one ends in an
    RMSNorm: ``to_out.1.g``), its heads and dim_head (``mem_kv``'s shape) and num_mem_kv.
    Only ``sinusoidal_pos_emb_theta`` is not stored (10000 assumed). ``options`` may settle what
    shapes leave open: (in, out) channels of (2c, 2c) read as c' = 2c unless
    ``channels``/``self_condition``/``learned_variance`` say otherwise. Random and learned
    Fourier features compute the same function, so both read as ``learned_sinusoidal_cond``.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointError(f"missing key {key!r}: this is not a {FAMILY} Unet state_dict")
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
        raise CheckpointError(f"no 'downs.*' keys: this is not a {FAMILY} Unet state_dict")
    widths = [init_dim]
    full_attn, heads, dim_heads = [], [], []
    num_mem_kv = None
    for i in range(num_stages):
        down = f"downs.{i}.3.1.weight" if f"downs.{i}.3.1.weight" in state_dict else None
        widths.append(shape(down or f"downs.{i}.3.weight")[0])
        full = f"downs.{i}.2.to_out.1.g" not in state_dict
        _, h, a, b = _mem_kv_shape(f"downs.{i}.2.mem_kv", shape)
        stage_mem, dim_head = (a, b) if full else (b, a)
        full_attn.append(full)
        heads.append(h)
        dim_heads.append(dim_head)
        if num_mem_kv not in (None, stage_mem):
            raise CheckpointError(
                f"downs.{i}.2.mem_kv holds {stage_mem} memory key/values, other stages "
                f"{num_mem_kv}; the library uses one number for all"
            )
        num_mem_kv = stage_mem
    if any(w % dim for w in widths[1:]):
        raise CheckpointError(f"stage widths {widths[1:]} are not multiples of dim={dim}")
    dim_mults = tuple(w // dim for w in widths[1:])

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
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)}: not options of {FAMILY} (its weights fix them); "
            f"known: {', '.join(OPTIONS)}"
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
        attn_heads=tuple(heads),
        attn_dim_head=tuple(dim_heads),
        full_attn=tuple(full_attn),
        num_mem_kv=num_mem_kv,
        **options,
    )
    if config.output_channels != out_channels:
        config.out_dim = out_channels
    return config


def _mem_kv_shape(key: str, shape) -> tuple[int, int, int, int]:
    dims = shape(key)
    if len(dims) != 4 or dims[0] != 2:
        raise CheckpointError(f"{key} has shape {list(dims)}, not [2, heads, *, *]")
    return dims
