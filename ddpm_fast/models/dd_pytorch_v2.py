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

Only what differs from 1.x is here (RMSNorm, the attentions with memory key/values, the per-stage
attention config, reading them off a state_dict); the Unet's construction and forward, its
ResnetBlock, resampling and time embeddings are :mod:`ddpm_fast.models.dd_pytorch_common`'s,
which 1.x (:mod:`ddpm_fast.models.dd_pytorch_v1`) subclasses too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..options import check_int
from . import dd_pytorch_common as common
from .continuous_time import fourier_refusal

FAMILY = "dd-pytorch-v2"
LIBRARY_VERSION = "2.3.4"  # the version this file and its fixtures follow


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


@dataclass
class UnetConfig(common.ConfigShape):
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
        ints = ("dim", "channels", "learned_sinusoidal_dim", "sinusoidal_pos_emb_theta")
        common.check_fields(self, ints)
        self.num_mem_kv = check_int("num_mem_kv", self.num_mem_kv, minimum=0)
        stages = len(self.dim_mults)
        if not self.full_attn:  # the library's `if not full_attn`: None, False, () alike
            self.full_attn = (*((False,) * (stages - 1)), True)
        self.full_attn = _per_stage("full_attn", self.full_attn, stages, common.boolean)
        self.attn_heads = _per_stage("attn_heads", self.attn_heads, stages, _positive_int)
        self.attn_dim_head = _per_stage("attn_dim_head", self.attn_dim_head, stages, _positive_int)
        sinusoidal = not self.learned_sinusoidal_cond and not self.random_fourier_features
        if sinusoidal and (self.dim < 4 or self.dim % 2):
            # SinusoidalPosEmb divides by half_dim - 1 and gives 2 * (dim // 2) features to a
            # Linear that takes dim: the library builds such a network and fails in its forward.
            raise ConfigError(
                f"dim must be even and at least 4 for sinusoidal time features, got {self.dim}"
            )


# small helper modules


class RMSNorm(nn.Module):
    """``x / max(||x||_2 over channels, 1e-12) * g * sqrt(C)`` per pixel (F.normalize's eps)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.g * self.scale


# building blocks


class Block(common.Block):
    """conv 3x3 -> RMSNorm -> ``* (scale + 1) + shift`` -> SiLU."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__(nn.Conv2d(dim, dim_out, 3, padding=1), RMSNorm(dim_out))


class ResnetBlock(common.ResnetBlock):
    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: int | None = None):
        super().__init__(dim, dim_out, time_emb_dim=time_emb_dim, block=Block)


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


class Unet(common.Unet):
    """``forward(x, time, x_self_cond=None)``: x [B, C, H, W], time [B] -> [B, out_dim, H, W].

    The library's Unet (:class:`~ddpm_fast.models.dd_pytorch_common.Unet`) with 2.x's blocks:
    per stage a linear or full attention (``full_attn``) with its own heads and dim_head, full
    attention in the middle at the innermost stage's heads, the residual added by the Unet."""

    attention_residual = True

    def __init__(self, config: UnetConfig):
        super().__init__(config, theta=config.sinusoidal_pos_emb_theta)

    def resnet_block(self, dim_in: int, dim_out: int, time_emb_dim: int) -> ResnetBlock:
        return ResnetBlock(dim_in, dim_out, time_emb_dim=time_emb_dim)

    def stage_attention(self, stage: int, width: int) -> nn.Module:
        config = self.config
        klass = Attention if config.full_attn[stage] else LinearAttention
        heads, dim_head = config.attn_heads[stage], config.attn_dim_head[stage]
        return klass(width, heads=heads, dim_head=dim_head, num_mem_kv=config.num_mem_kv)

    def mid_attention(self, width: int) -> nn.Module:
        config = self.config
        heads, dim_head = config.attn_heads[-1], config.attn_dim_head[-1]
        return Attention(width, heads=heads, dim_head=dim_head, num_mem_kv=config.num_mem_kv)


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

    shapes = common.read_shapes(state_dict, FAMILY)
    full_attn, heads, dim_heads = [], [], []
    num_mem_kv = None
    for i in range(shapes.num_stages):
        full = f"downs.{i}.2.to_out.1.g" not in state_dict
        _, h, a, b = _mem_kv_shape(f"downs.{i}.2.mem_kv", shapes.shape)
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
    channels = common.read_channels(options, shapes)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(
            f"{', '.join(unknown)}: not options of {FAMILY} (its weights fix them); "
            f"known: {', '.join(OPTIONS)}"
        )
    config = UnetConfig(
        **shapes.config_fields(),
        **channels,
        attn_heads=tuple(heads),
        attn_dim_head=tuple(dim_heads),
        full_attn=tuple(full_attn),
        num_mem_kv=num_mem_kv,
        **options,
    )
    return common.with_out_channels(config, shapes)


def _mem_kv_shape(key: str, shape) -> tuple[int, int, int, int]:
    dims = shape(key)
    if len(dims) != 4 or dims[0] != 2:
        raise CheckpointError(f"{key} has shape {list(dims)}, not [2, heads, *, *]")
    return dims
