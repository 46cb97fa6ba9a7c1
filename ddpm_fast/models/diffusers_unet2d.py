"""diffusers' ``UNet2DModel`` (written from diffusers 0.42.1), as a plain PyTorch reference.

Module and parameter names are diffusers' (so a ``diffusion_pytorch_model.safetensors`` loads
with strict key matching), the math is diffusers' line for line: ResnetBlock2D (GroupNorm, SiLU,
conv, + time bias or x (1 + scale) + shift, GroupNorm, SiLU, conv, + shortcut), Attention
(GroupNorm, q/k/v linears, scaled_dot_product_attention, out linear, + residual), strided-conv
downsampling, nearest-neighbour + conv upsampling, positional or Gaussian Fourier time features.

Read here: DownBlock2D, AttnDownBlock2D, UpBlock2D, AttnUpBlock2D, UNetMidBlock2D, class
embeddings (``num_class_embeds`` with ``class_embed_type`` None: an embedding of the labels, added
to the time embedding; "timestep": the labels through the time features and their own MLP) and
the config fields listed in :class:`UnetConfig`; anything else (a text-conditional UNet, labels
given as vectors ("identity"), other block types, ResnetDownsample/Upsample variants) is a
ConfigError naming the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..options import check_int, check_real

FAMILY = "diffusers-unet2d"
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
TIME_EMBEDDINGS = ("positional", "fourier")
TIME_SCALE_SHIFTS = ("default", "scale_shift")
# config.json fields that must keep the value given (diffusers' default) to be read here.
FIXED_FIELDS = {
    "mid_block_type": "UNetMidBlock2D",
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "attn_norm_num_groups": None,
}
CLASS_EMBED_TYPES = (None, "timestep")
# Fields read for their own sake nowhere (training-only or bookkeeping).
IGNORED_FIELDS = {"_class_name", "_diffusers_version", "_name_or_path", "dropout",
                  "num_train_timesteps", "sample_size"}  # fmt: skip
# Network options a user may give: none (the folder's config.json says everything).
OPTIONS: tuple[str, ...] = ()
UNSTORED_DEFAULTS: dict = {}


@dataclass
class UnetConfig:
    """The ``UNet2DModel`` config fields this reference reads (diffusers' defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = (
        "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
    )  # fmt: skip
    up_block_types: tuple[str, ...] = (
        "AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D",
    )  # fmt: skip
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    family: str = field(default=FAMILY, init=False)

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        self.downsample_padding = check_int("downsample_padding", self.downsample_padding,
                                            minimum=0)  # fmt: skip
        for name in ("time_embedding_dim", "attention_head_dim"):
            if getattr(self, name) is not None:
                setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        for name in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self.freq_shift = check_real("freq_shift", self.freq_shift)
        self.mid_block_scale_factor = check_real("mid_block_scale_factor",
                                                 self.mid_block_scale_factor)  # fmt: skip
        if self.mid_block_scale_factor == 0:
            raise ConfigError("mid_block_scale_factor must not be 0")
        self.norm_eps = check_real("norm_eps", self.norm_eps, minimum=0)
        _choice("time_embedding_type", self.time_embedding_type, TIME_EMBEDDINGS)
        self._check_class_embedding()
        _choice("resnet_time_scale_shift", self.resnet_time_scale_shift, TIME_SCALE_SHIFTS)
        for name, known in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            value = getattr(self, name)
            if not isinstance(value, list | tuple) or not value:
                raise ConfigError(f"{name} must be a list of block names, got {value!r}")
            for block in value:
                _choice(name, block, known)
            setattr(self, name, tuple(value))
        if not isinstance(self.block_out_channels, list | tuple) or not self.block_out_channels:
            raise ConfigError(f"block_out_channels must be a list, got {self.block_out_channels!r}")
        self.block_out_channels = tuple(
            check_int("block_out_channels", c, minimum=1) for c in self.block_out_channels
        )
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({n}) differ in length"
            )
        bad = sorted({c for c in self.block_out_channels if c % self.norm_num_groups})
        if bad:
            raise ConfigError(
                f"norm_num_groups={self.norm_num_groups} must divide block_out_channels; "
                f"{bad} do not"
            )
        for i, c in enumerate(self.block_out_channels):
            attn = self.down_block_types[i].startswith("Attn") or i == n - 1
            if attn and self.attention_head_dim is not None and c % self.attention_head_dim:
                raise ConfigError(
                    f"attention_head_dim={self.attention_head_dim} does not divide "
                    f"block_out_channels[{i}]={c}"
                )

    @property
    def channels(self) -> int:
        return self.in_channels

    @property
    def self_condition(self) -> bool:
        return False

    @property
    def num_classes(self) -> int | None:
        """The label range of a class-conditional network (``num_class_embeds``), else None."""
        return self.num_class_embeds

    def _check_class_embedding(self) -> None:
        if self.class_embed_type == "identity":
            raise ConfigError(
                "class_embed_type='identity' (class labels given as embedding vectors) is not "
                "supported: ddpm-fast's class labels are integers"
            )
        _choice("class_embed_type", self.class_embed_type, CLASS_EMBED_TYPES)
        if self.num_class_embeds is not None:
            self.num_class_embeds = check_int("num_class_embeds", self.num_class_embeds, minimum=1)
        elif self.class_embed_type == "timestep":
            raise ConfigError(
                "class_embed_type='timestep' without num_class_embeds: the labels' range is not "
                "stated (set num_class_embeds in config.json)"
            )
        if self.num_classes is not None and self.time_embedding_type == "fourier":
            raise ConfigError(
                "class embeddings with time_embedding_type='fourier' are not supported"
            )

    @property
    def output_channels(self) -> int:
        return self.out_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def time_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    def to_dict(self) -> dict:
        """The fields, plus ``channels`` and ``self_condition`` (derived: readers of ddpm-fast's
        files, such as the ONNX metadata check, look for them in every family's config)."""
        d = asdict(self)
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            d[name] = list(d[name])
        return {**d, "channels": self.channels, "self_condition": self.self_condition}

    @classmethod
    def from_dict(cls, d: dict) -> UnetConfig:
        d = {k: v for k, v in d.items() if k not in ("family", "channels", "self_condition")}
        unknown = sorted(set(d) - {f.name for f in cls.__dataclass_fields__.values() if f.init})
        if unknown:
            raise ConfigError(f"unknown {FAMILY} config field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_diffusers(cls, config: dict) -> UnetConfig:
        """The config of a diffusers ``config.json`` (UNet2DModel); ConfigError naming the first
        field this reference does not read (a value other than its default) or does not know."""
        if not isinstance(config, dict):
            raise ConfigError(f"a UNet2DModel config is a JSON object, got {config!r}")
        name = config.get("_class_name", "UNet2DModel")
        if name != "UNet2DModel":
            raise ConfigError(f"_class_name is {name!r}: only UNet2DModel is read")
        for key, value in FIXED_FIELDS.items():
            if (
                key in config
                and config[key] != value
                and not (key == "act_fn" and config[key] == "swish")
            ):
                raise ConfigError(f"{key}={config[key]!r} is not supported (only {value!r})")
        known = {f.name for f in cls.__dataclass_fields__.values() if f.init}
        unknown = sorted(set(config) - known - set(FIXED_FIELDS) - IGNORED_FIELDS)
        if unknown:
            raise ConfigError(f"UNet2DModel config field {unknown[0]!r} is not supported")
        return cls(**{k: v for k, v in config.items() if k in known})


def _choice(name: str, value, known: tuple[str, ...]) -> None:
    if value not in known:
        raise ConfigError(f"{name} {value!r} is not supported; known: {', '.join(known)}")


# time embeddings


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float
) -> torch.Tensor:
    """diffusers' ``get_timestep_embedding`` (scale 1, max_period 10000)."""
    half_dim = dim // 2
    exponent = -math.log(10000) * torch.arange(0, half_dim, dtype=torch.float32,
                                               device=timesteps.device)  # fmt: skip
    exponent = exponent / (half_dim - shift)
    emb = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


class Timesteps(nn.Module):
    def __init__(self, dim: int, flip_sin_to_cos: bool, shift: float):
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.shift = dim, flip_sin_to_cos, shift

    def forward(self, timesteps):
        return timestep_embedding(timesteps, self.dim, self.flip_sin_to_cos, self.shift)


class GaussianFourierProjection(nn.Module):
    """UNet2DModel's (log=True, flip_sin_to_cos=False): sin, cos of 2 pi log(t) w."""

    def __init__(self, embedding_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * 16, requires_grad=False)

    def forward(self, x):
        # torch.log of an integer tensor is float32's log: the same, written so ONNX's Log
        # (floats only) traces it.
        x = torch.log(x if x.is_floating_point() else x.float())
        x_proj = x[:, None] * self.weight[None, :] * 2 * math.pi
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, time_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, time_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, sample):
        return self.linear_2(self.act(self.linear_1(sample)))


# building blocks


class ResnetBlock2D(nn.Module):
    """``forward(x, cond)``: ``cond`` is ``time_emb_proj(silu(emb))`` [B or 1, C or 2C],
    computed once per timestep by ``Unet.time_conditioning`` (diffusers computes it here)."""

    def __init__(self, in_channels: int, out_channels: int, config: UnetConfig,
                 output_scale_factor: float = 1.0):  # fmt: skip
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.scale_shift = config.resnet_time_scale_shift == "scale_shift"
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.time_emb_proj = nn.Linear(
            config.time_dim, out_channels * (2 if self.scale_shift else 1)
        )
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)
            if in_channels != out_channels
            else None
        )

    def project_time(self, emb: torch.Tensor) -> torch.Tensor:
        return self.time_emb_proj(self.nonlinearity(emb))

    def forward(self, input_tensor, cond):
        hidden_states = self.nonlinearity(self.norm1(input_tensor))
        hidden_states = self.conv1(hidden_states)
        temb = cond[:, :, None, None]
        if self.scale_shift:
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = self.norm2(hidden_states)
            hidden_states = hidden_states * (1 + time_scale) + time_shift
        else:
            hidden_states = self.norm2(hidden_states + temb)
        hidden_states = self.nonlinearity(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor


class Attention(nn.Module):
    """diffusers' ``Attention`` as UNet2DModel builds it (AttnProcessor2_0): self-attention
    over the H x W positions, biased q/k/v/out linears, residual, ``/ rescale_output_factor``."""

    def __init__(self, channels: int, heads: int, groups: int | None, eps: float,
                 rescale_output_factor: float = 1.0):  # fmt: skip
        super().__init__()
        self.heads = heads
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps, affine=True) if groups else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, hidden_states):
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = self.to_q(hidden_states)
        key = self.to_k(hidden_states)
        value = self.to_v(hidden_states)
        head_dim = key.shape[-1] // self.heads
        query, key, value = (
            t.view(b, -1, self.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        hidden_states = F.scaled_dot_product_attention(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(b, -1, self.heads * head_dim)
        hidden_states = self.to_out[1](self.to_out[0](hidden_states))
        hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        return (hidden_states + residual) / self.rescale_output_factor


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _heads(config: UnetConfig, channels: int) -> int:
    return channels // (config.attention_head_dim or channels)


class DownBlock(nn.Module):
    """DownBlock2D / AttnDownBlock2D: ``layers_per_block`` x (resnet[, attention]), then a
    downsampler unless last; ``attentions`` is empty for DownBlock2D."""

    def __init__(self, kind: str, in_ch: int, out_ch: int, last: bool, config: UnetConfig):
        super().__init__()
        n = config.layers_per_block
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, config) for i in range(n)
        )
        groups, eps = config.norm_num_groups, config.norm_eps
        self.attentions = nn.ModuleList(
            Attention(out_ch, _heads(config, out_ch), groups, eps)
            for _ in range(n if kind == "AttnDownBlock2D" else 0)
        )
        self.downsamplers = (
            None if last else nn.ModuleList([Downsample2D(out_ch, config.downsample_padding)])
        )


class UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D: ``layers_per_block + 1`` x (cat skip, resnet[, attention]),
    then an upsampler unless last."""

    def __init__(self, kind: str, in_ch: int, prev_ch: int, out_ch: int, last: bool,
                 config: UnetConfig):  # fmt: skip
        super().__init__()
        n = config.layers_per_block + 1
        self.resnets = nn.ModuleList(
            ResnetBlock2D(
                (prev_ch if i == 0 else out_ch) + (in_ch if i == n - 1 else out_ch), out_ch, config
            )
            for i in range(n)
        )
        groups, eps = config.norm_num_groups, config.norm_eps
        self.attentions = nn.ModuleList(
            Attention(out_ch, _heads(config, out_ch), groups, eps)
            for _ in range(n if kind == "AttnUpBlock2D" else 0)
        )
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(out_ch)])


class MidBlock(nn.Module):
    """UNetMidBlock2D with one layer: resnet, attention (if ``add_attention``), resnet."""

    def __init__(self, channels: int, config: UnetConfig):
        super().__init__()
        factor = config.mid_block_scale_factor
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, config, output_scale_factor=factor) for _ in range(2)
        )
        # diffusers: the attention's GroupNorm only with the "default" time scale-shift.
        groups = config.norm_num_groups if config.resnet_time_scale_shift == "default" else None
        self.attentions = nn.ModuleList(
            [Attention(channels, _heads(config, channels), groups, config.norm_eps, factor)]
            if config.add_attention
            else []
        )


class Unet(nn.Module):
    """``forward(x, time, x_self_cond=None)``: x [B, C, H, W], time [B] -> [B, out, H, W]."""

    def __init__(self, config: UnetConfig):
        super().__init__()
        self.config = config
        self.channels = config.in_channels
        self.self_condition = False
        widths = config.block_out_channels
        first = widths[0]
        self.conv_in = nn.Conv2d(config.in_channels, first, 3, padding=1)
        if config.time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(first)
            time_input = 2 * first
        else:
            self.time_proj = Timesteps(first, config.flip_sin_to_cos, config.freq_shift)
            time_input = first
        self.time_embedding = TimestepEmbedding(time_input, config.time_dim)
        if config.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(time_input, config.time_dim)
        elif config.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(config.num_class_embeds, config.time_dim)

        n = len(widths)
        self.down_blocks = nn.ModuleList()
        out_ch = first
        for i, kind in enumerate(config.down_block_types):
            in_ch, out_ch = out_ch, widths[i]
            self.down_blocks.append(DownBlock(kind, in_ch, out_ch, i == n - 1, config))
        self.mid_block = MidBlock(widths[-1], config)
        self.up_blocks = nn.ModuleList()
        reversed_widths = list(reversed(widths))
        out_ch = reversed_widths[0]
        for i, kind in enumerate(config.up_block_types):
            prev_ch, out_ch = out_ch, reversed_widths[i]
            in_ch = reversed_widths[min(i + 1, n - 1)]
            self.up_blocks.append(UpBlock(kind, in_ch, prev_ch, out_ch, i == n - 1, config))
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, first, eps=config.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(first, config.out_channels, 3, padding=1)
        # (name, ResnetBlock2D) in module order, listed once: the engine's class-conditional
        # step projects through them every step, with no walk of the module tree.
        self.timed_blocks = [
            (n, m) for n, m in self.named_modules() if isinstance(m, ResnetBlock2D)
        ]

    def embed_timesteps(self, time: torch.Tensor) -> torch.Tensor:
        """The time features through their MLP: [n, time_dim]."""
        return self.time_embedding(self.time_proj(time))

    def embed_labels(self, class_labels: torch.Tensor) -> torch.Tensor:
        """diffusers' class_emb: the labels' embedding, or their time features through the
        class MLP ("timestep")."""
        if self.config.num_classes is None:
            raise ValueError("this UNet2DModel takes no class labels")
        if self.config.class_embed_type == "timestep":
            return self.class_embedding(self.time_proj(class_labels)).float()
        return self.class_embedding(class_labels).float()

    def conditioning_from_embedding(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """{ResnetBlock2D name: ``time_emb_proj(silu(emb))``} in module order."""
        return {name: m.project_time(emb).float() for name, m in self.timed_blocks}

    def time_conditioning(
        self, time: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """{ResnetBlock2D name: ``time_emb_proj(silu(emb))``} in module order (emb: the time
        embedding, plus the class embedding of ``class_labels`` for a class-conditional network),
        and with Fourier features ``"output_divisor"``: t itself [n, 1] (the output is divided
        by it)."""
        emb = self.embed_timesteps(time)
        if self.config.num_classes is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            emb = emb + self.embed_labels(class_labels)
        elif class_labels is not None:
            raise ValueError("this UNet2DModel takes no class labels")
        cond = self.conditioning_from_embedding(emb)
        if self.config.time_embedding_type == "fourier":
            cond["output_divisor"] = time.float()[:, None]
        return cond

    def forward(self, x, time, x_self_cond=None, class_labels=None):
        time = torch.as_tensor(time, device=x.device)
        if time.ndim == 0:
            time = time[None]
        time = time * torch.ones(x.shape[0], dtype=time.dtype, device=time.device)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=x.device)
        cond = self.time_conditioning(time, class_labels)
        return self.forward_conditioned(x, cond, x_self_cond)

    def forward_conditioned(self, x, cond: dict[str, torch.Tensor], x_self_cond=None):
        """The forward given ``cond = time_conditioning(time)``."""
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        x = self.conv_in(x)
        skips = [x]
        for i, block in enumerate(self.down_blocks):
            for j, resnet in enumerate(block.resnets):
                x = resnet(x, cond[f"down_blocks.{i}.resnets.{j}"])
                if len(block.attentions):
                    x = block.attentions[j](x)
                skips.append(x)
            if block.downsamplers is not None:
                x = block.downsamplers[0](x)
                skips.append(x)
        mid = self.mid_block
        x = mid.resnets[0](x, cond["mid_block.resnets.0"])
        if len(mid.attentions):
            x = mid.attentions[0](x)
        x = mid.resnets[1](x, cond["mid_block.resnets.1"])
        for i, block in enumerate(self.up_blocks):
            for j, resnet in enumerate(block.resnets):
                x = resnet(torch.cat([x, skips.pop()], dim=1), cond[f"up_blocks.{i}.resnets.{j}"])
                if len(block.attentions):
                    x = block.attentions[j](x)
            if block.upsamplers is not None:
                x = block.upsamplers[0](x)
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        if "output_divisor" in cond:
            x = x / cond["output_divisor"].reshape(-1, 1, 1, 1)
        return x


# the family contract (see ddpm_fast.models)

HALF_PRECISION_FP32 = (nn.GroupNorm,)
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def matches(weights: dict[str, torch.Tensor]) -> bool:
    """A UNet2DModel state_dict: conv_in, the time embedding's MLP, resnets in down_blocks."""
    return (
        "conv_in.weight" in weights
        and "time_embedding.linear_1.weight" in weights
        and "down_blocks.0.resnets.0.conv1.weight" in weights
    )


def remap_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The attention keys of old diffusers files (``query``, ``key``, ``value``, ``proj_attn``,
    as in the google/ddpm-* weights) under their current names."""
    out = {}
    for key, value in weights.items():
        parts = key.split(".")
        if ".attentions." in f".{key}" and len(parts) >= 3 and parts[-2] in LEGACY_ATTENTION:
            key = ".".join([*parts[:-2], LEGACY_ATTENTION[parts[-2]], parts[-1]])
        out[key] = value
    return out


def infer_config(weights: dict[str, torch.Tensor], unet_config: dict | None = None) -> UnetConfig:
    """The config of a folder's ``config.json`` (``unet_config``); the weights are checked
    against it when the network is built. A bare state_dict without it cannot be read."""
    if unet_config is None:
        raise CheckpointError(
            f"a {FAMILY} state_dict needs its config.json: give the folder that holds both"
        )
    return UnetConfig.from_diffusers(unet_config)


def fold(network: Unet) -> None:
    """Nothing to fold: every weight is used as stored."""
