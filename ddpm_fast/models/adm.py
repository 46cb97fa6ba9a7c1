"""OpenAI's ADM U-Net: guided-diffusion's and improved-diffusion's ``UNetModel``, as a plain
PyTorch reference (written from openai/guided-diffusion and openai/improved-diffusion, MIT).

Module and parameter names are the libraries' (``input_blocks.1.0.in_layers.0.weight``, ...), so
a released ``model.state_dict()`` file (``256x256_diffusion_uncond.pt``, ``lsun_bedroom.pt``,
``cifar10_uncond_50M_500K.pt``) loads with strict key matching; the math is the libraries' line
for line: ResBlock (GroupNorm32, SiLU, conv; the time embedding's projection added, or with
``use_scale_shift_norm`` GroupNorm32 then ``* (1 + scale) + shift``; SiLU, conv; + skip), with
``resblock_updown`` ResBlocks that resample inside, AttentionBlock (GroupNorm32, a 1x1 qkv conv,
QKVAttention or QKVAttentionLegacy, a 1x1 out conv, + residual), sinusoidal timestep features
(cos first) through a two-layer MLP, and a class embedding added to it for class-conditional
models.

improved-diffusion's network is guided-diffusion's with the legacy attention order, heads by
count, integer channel multipliers and no resblock_updown; one reference reads both
(``UnetConfig.library`` says whose defaults a file was read with). ``timestep_scale`` is the
libraries' ``rescale_timesteps`` (1000 / diffusion_steps, else 1): the network multiplies the
integer timestep it is given by it, so every consumer passes the original timesteps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..options import check_int, check_real

FAMILY = "adm"
LIBRARIES = ("guided-diffusion", "improved-diffusion")
NORM_GROUPS = 32  # the libraries' normalization(): GroupNorm32(32, channels)


@dataclass
class UnetConfig:
    """guided-diffusion's ``UNetModel`` arguments (its defaults), as a dataclass.

    ``attention_ds`` holds the downsample rates with attention (UNetModel's
    ``attention_resolutions`` argument); the libraries' *flag* of that name is in pixels
    (``image_size // rate``)."""

    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 3
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (2, 4)
    channel_mult: tuple[float, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    timestep_scale: float = 1.0
    library: str = "guided-diffusion"
    family: str = field(default=FAMILY, init=False)

    def __post_init__(self) -> None:
        for name in ("in_channels", "model_channels", "out_channels", "num_res_blocks"):
            setattr(self, name, check_int(name, getattr(self, name), minimum=1))
        if self.num_classes is not None:
            self.num_classes = check_int("num_classes", self.num_classes, minimum=1)
        self.num_heads = check_int("num_heads", self.num_heads, minimum=1)
        for name in ("num_head_channels", "num_heads_upsample"):
            value = check_int(name, getattr(self, name), minimum=-1)
            if value == 0:
                raise ConfigError(f"{name} must be -1 (unset) or positive, got 0")
            setattr(self, name, value)
        for name in ("conv_resample", "use_scale_shift_norm", "resblock_updown",
                     "use_new_attention_order"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.channel_mult, list | tuple) or not self.channel_mult:
            raise ConfigError(f"channel_mult must be a list of numbers, got {self.channel_mult!r}")
        mults = tuple(check_real("channel_mult", m, minimum=0.0) for m in self.channel_mult)
        self.channel_mult = tuple(int(m) if float(m).is_integer() else m for m in mults)
        for m in self.channel_mult:
            width = int(m * self.model_channels)
            if width < 1 or width % NORM_GROUPS:
                raise ConfigError(
                    f"channel_mult {m} x model_channels {self.model_channels} = {width} channels: "
                    f"the libraries' GroupNorm32 needs a positive multiple of {NORM_GROUPS}"
                )
        if not isinstance(self.attention_ds, list | tuple):
            raise ConfigError(f"attention_ds must be a list of rates, got {self.attention_ds!r}")
        self.attention_ds = tuple(
            sorted({check_int("attention_ds", d, minimum=1) for d in self.attention_ds})
        )
        self.timestep_scale = check_real("timestep_scale", self.timestep_scale, minimum=0.0)
        if self.library not in LIBRARIES:
            known = ", ".join(LIBRARIES)
            raise ConfigError(f"library must be one of {known}, got {self.library!r}")
        for width in self.attention_widths():
            heads_of(width, self.num_heads, self.num_head_channels)
            heads_of(width, self.upsample_heads, self.num_head_channels)

    @property
    def upsample_heads(self) -> int:
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample

    def attention_widths(self) -> list[int]:
        """The channel count of every attention block (the middle one included)."""
        widths = [self.width(level) for level in range(len(self.channel_mult))
                  if 2**level in self.attention_ds]  # fmt: skip
        return [*widths, self.width(len(self.channel_mult) - 1)]

    def width(self, level: int) -> int:
        return int(self.channel_mult[level] * self.model_channels)

    @property
    def channels(self) -> int:
        return self.in_channels

    @property
    def self_condition(self) -> bool:
        return False

    @property
    def output_channels(self) -> int:
        return self.out_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def time_dim(self) -> int:
        return self.model_channels * 4

    def to_dict(self) -> dict:
        """The fields, plus ``channels`` and ``self_condition`` (derived: readers of ddpm-fast's
        files look for them in every family's config)."""
        d = asdict(self)
        d["attention_ds"] = list(d["attention_ds"])
        d["channel_mult"] = list(d["channel_mult"])
        return {**d, "channels": self.channels, "self_condition": self.self_condition}

    @classmethod
    def from_dict(cls, d: dict) -> UnetConfig:
        d = {k: v for k, v in d.items() if k not in ("family", "channels", "self_condition")}
        unknown = sorted(set(d) - {f.name for f in cls.__dataclass_fields__.values() if f.init})
        if unknown:
            raise ConfigError(f"unknown {FAMILY} config field(s): {', '.join(unknown)}")
        return cls(**d)


def heads_of(channels: int, num_heads: int, num_head_channels: int) -> int:
    """AttentionBlock's head count: ``channels // num_head_channels`` where that is set, else
    ``num_heads``; ConfigError where the heads do not divide the channels."""
    if num_head_channels != -1:
        if channels % num_head_channels:
            raise ConfigError(
                f"num_head_channels={num_head_channels} does not divide an attention block's "
                f"{channels} channels"
            )
        return channels // num_head_channels
    if channels % num_heads:
        raise ConfigError(f"num_heads={num_heads} does not divide an attention block's "
                          f"{channels} channels")  # fmt: skip
    return num_heads


# building blocks


class GroupNorm32(nn.GroupNorm):
    """The libraries' GroupNorm: computed in float32, returned in the input's dtype."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(NORM_GROUPS, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """The libraries' sinusoidal features: [cos, sin] of t * exp(-log(max_period) * i / half)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
    ).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose ResBlocks also take the block's conditioning (``cond``: its
    ``emb_layers`` output, computed by ``Unet.time_conditioning``)."""

    def forward(self, x, cond: dict[str, torch.Tensor], prefix: str):
        for i, layer in enumerate(self):
            x = layer(x, cond[f"{prefix}.{i}"]) if isinstance(layer, ResBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    """``forward(x, cond)``: ``cond`` is ``emb_layers(emb)`` [B or 1, C or 2C], computed once per
    timestep (and label) by ``Unet.time_conditioning`` (the libraries compute it here)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False,
                 down: bool = False):  # fmt: skip
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm
                      else self.out_channels),
        )  # fmt: skip
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=0.0),
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:  # the libraries' use_conv=False: a 1x1 conv
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def project(self, emb: torch.Tensor) -> torch.Tensor:
        return self.emb_layers(emb)

    def forward(self, x, cond):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_rest(x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = cond.type(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            h = out_rest(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Heads split before q, k, v (improved-diffusion's order): qkv [N, H * 3 * C, T]."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v)
        return a.reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """q, k, v split before heads (guided-diffusion's ``use_new_attention_order``)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum(
            "bct,bcs->bts",
            (q * scale).view(bs * self.n_heads, ch, length),
            (k * scale).view(bs * self.n_heads, ch, length),
        )
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * self.n_heads, ch, length))
        return a.reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int, num_head_channels: int,
                 use_new_attention_order: bool):  # fmt: skip
        super().__init__()
        self.channels = channels
        self.num_heads = heads_of(channels, num_heads, num_head_channels)
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        order = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = order(self.num_heads)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = self.proj_out(self.attention(qkv))
        return (x + h).reshape(b, c, *spatial)


class Unet(nn.Module):
    """``forward(x, timesteps, x_self_cond=None, class_labels=None)``: x [B, C, H, W], timesteps
    [B] (the original integer timesteps), class_labels [B] for a class-conditional network."""

    def __init__(self, config: UnetConfig):
        super().__init__()
        self.config = config
        self.channels = config.in_channels
        self.self_condition = False
        c = config
        mc, emb_dim = c.model_channels, c.time_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))  # fmt: skip
        if c.num_classes is not None:
            self.label_emb = nn.Embedding(c.num_classes, emb_dim)

        def resblock(ch, out=None, up=False, down=False):
            return ResBlock(ch, emb_dim, out, c.use_scale_shift_norm, up=up, down=down)

        def attention(ch, heads):
            return AttentionBlock(ch, heads, c.num_head_channels, c.use_new_attention_order)

        ch = input_ch = c.width(0)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(c.in_channels, ch, 3, padding=1))]
        )
        input_block_chans = [ch]
        ds = 1
        for level in range(len(c.channel_mult)):
            for _ in range(c.num_res_blocks):
                layers = [resblock(ch, c.width(level))]
                ch = c.width(level)
                if ds in c.attention_ds:
                    layers.append(attention(ch, c.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(c.channel_mult) - 1:
                down = (resblock(ch, ch, down=True) if c.resblock_updown
                        else Downsample(ch, c.conv_resample, ch))  # fmt: skip
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            resblock(ch), attention(ch, c.num_heads), resblock(ch)
        )
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [resblock(ch + input_block_chans.pop(), c.width(level))]
                ch = c.width(level)
                if ds in c.attention_ds:
                    layers.append(attention(ch, c.upsample_heads))
                if level and i == c.num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if c.resblock_updown
                                  else Upsample(ch, c.conv_resample, ch))  # fmt: skip
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.Conv2d(input_ch, c.out_channels, 3, padding=1)
        )
        # (name, ResBlock) in module order, listed once: the engine's class-conditional step
        # projects through them every step, with no walk of the module tree.
        self.timed_blocks = [(n, m) for n, m in self.named_modules() if isinstance(m, ResBlock)]

    @property
    def class_conditional(self) -> bool:
        return self.config.num_classes is not None

    def embed_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``time_embed`` of the sinusoidal features of ``timesteps * timestep_scale``."""
        t = timesteps
        if self.config.timestep_scale != 1.0:
            t = t.float() * self.config.timestep_scale
        return self.time_embed(timestep_embedding(t, self.config.model_channels)).float()

    def embed_labels(self, class_labels: torch.Tensor) -> torch.Tensor:
        if not self.class_conditional:
            raise ValueError("an unconditional ADM network takes no class labels")
        return self.label_emb(class_labels).float()

    def conditioning_from_embedding(self, emb: torch.Tensor) -> dict[str, torch.Tensor]:
        """{ResBlock name: its ``emb_layers(emb)``}, in module order."""
        return {name: m.project(emb).float() for name, m in self.timed_blocks}

    def time_conditioning(
        self, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        emb = self.embed_timesteps(timesteps)
        if self.class_conditional:
            if class_labels is None:
                raise ValueError("a class-conditional ADM network needs class labels")
            emb = emb + self.embed_labels(class_labels)
        elif class_labels is not None:
            raise ValueError("an unconditional ADM network takes no class labels")
        return self.conditioning_from_embedding(emb)

    def forward(self, x, timesteps, x_self_cond=None, class_labels=None):
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps * torch.ones(x.shape[0], dtype=timesteps.dtype, device=x.device)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=x.device)
        cond = self.time_conditioning(timesteps, class_labels)
        return self.forward_conditioned(x, cond, x_self_cond)

    def forward_conditioned(self, x, cond: dict[str, torch.Tensor], x_self_cond=None):
        """The forward given ``cond = time_conditioning(timesteps[, class_labels])``."""
        hs = []
        h = x
        for i, module in enumerate(self.input_blocks):
            h = module(h, cond, f"input_blocks.{i}")
            hs.append(h)
        h = self.middle_block(h, cond, "middle_block")
        for i, module in enumerate(self.output_blocks):
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, cond, f"output_blocks.{i}")
        return self.out(h)


# the family contract (see ddpm_fast.models)

HALF_PRECISION_FP32 = (nn.GroupNorm,)
# The libraries' flags that say what the weights cannot (they settle the config), those the
# weights fix (accepted, checked against them), the diffusion's (``library_diffusion``) and the
# training-only ones (accepted and noted: they do not change sampling).
NETWORK_FLAGS = ("num_heads", "num_head_channels", "num_heads_upsample",
                 "use_new_attention_order", "rescale_timesteps", "library")  # fmt: skip
WEIGHT_FLAGS = ("num_channels", "num_res_blocks", "channel_mult", "attention_resolutions",
                "class_cond", "learn_sigma", "use_scale_shift_norm", "resblock_updown")  # fmt: skip
DIFFUSION_FLAGS = ("noise_schedule", "diffusion_steps", "sigma_small", "predict_xstart")
TRAINING_FLAGS = ("use_fp16", "dropout", "use_checkpoint", "use_kl", "rescale_learned_sigmas",
                  "lr", "batch_size", "microbatch", "weight_decay", "ema_rate",
                  "lr_anneal_steps", "log_interval", "save_interval", "schedule_sampler",
                  "fp16_scale_growth", "resume_checkpoint", "data_dir", "num_samples",
                  "use_ddim", "clip_denoised", "model_path")  # fmt: skip
OPTIONS: tuple[str, ...] = NETWORK_FLAGS + WEIGHT_FLAGS + DIFFUSION_FLAGS + TRAINING_FLAGS
UNSTORED_DEFAULTS: dict = {}  # which values are assumed depends on the library: see notes()
# The scripts' defaults (script_util.model_and_diffusion_defaults) where a flag is not given.
LIBRARY_DEFAULTS = {
    "guided-diffusion": {"num_heads": 4, "num_head_channels": -1, "num_heads_upsample": -1,
                         "use_new_attention_order": False, "rescale_timesteps": False},
    "improved-diffusion": {"num_heads": 4, "num_head_channels": -1, "num_heads_upsample": -1,
                           "use_new_attention_order": False, "rescale_timesteps": True},
}  # fmt: skip


# The libraries' flag types (script_util's argparse: str2bool for booleans).
BOOL_FLAGS = ("class_cond", "learn_sigma", "use_scale_shift_norm", "resblock_updown",
              "use_new_attention_order", "rescale_timesteps", "sigma_small", "predict_xstart",
              "use_fp16", "use_checkpoint", "use_kl", "rescale_learned_sigmas", "use_ddim",
              "clip_denoised")  # fmt: skip
INT_FLAGS = ("image_size", "num_channels", "num_res_blocks", "num_heads", "num_head_channels",
             "num_heads_upsample", "diffusion_steps", "batch_size", "num_samples", "microbatch",
             "lr_anneal_steps", "log_interval", "save_interval")  # fmt: skip
FLOAT_FLAGS = ("dropout", "lr", "weight_decay", "fp16_scale_growth")
STRING_FLAGS = ("attention_resolutions", "channel_mult", "noise_schedule", "timestep_respacing",
                "schedule_sampler", "ema_rate", "resume_checkpoint", "data_dir", "model_path",
                "library")  # fmt: skip


def parse_model_flags(text: str) -> dict:
    """The libraries' MODEL_FLAGS (and DIFFUSION_FLAGS, SAMPLE_FLAGS) string, pasted as it is:
    ``--attention_resolutions 32,16,8 --class_cond True ...`` -> {flag: value}."""
    words = text.split()
    if len(words) % 2:
        raise ConfigError(f"model flags come in pairs (--flag value): {text!r}")
    flags = {}
    for name, value in zip(words[::2], words[1::2], strict=True):
        key = name.removeprefix("--")
        if not name.startswith("--") or key in flags:
            raise ConfigError(f"model flags: {name!r} is not a new --flag")
        if key not in (*BOOL_FLAGS, *INT_FLAGS, *FLOAT_FLAGS, *STRING_FLAGS):
            raise ConfigError(f"model flags: --{key} is not a flag of the ADM libraries")
        try:
            if key in BOOL_FLAGS:
                flags[key] = _str2bool(value)
            elif key in INT_FLAGS:
                flags[key] = int(value)
            elif key in FLOAT_FLAGS:
                flags[key] = float(value)
            else:
                flags[key] = value
        except ValueError:
            raise ConfigError(f"model flags: --{key} {value!r} is not a valid value") from None
    return flags


def _str2bool(value: str) -> bool:
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(value)


def matches(weights: dict[str, torch.Tensor]) -> bool:
    """A UNetModel state_dict (the time MLP, the first input conv), or guided-diffusion's
    classifier (EncoderUNetModel: the same start, no output blocks), which ``infer_config``
    refuses by name."""
    return "time_embed.0.weight" in weights and "input_blocks.0.0.weight" in weights


def remap_keys(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The libraries' keys are this reference's: nothing to rename."""
    return weights


def count_blocks(weights: dict, prefix: str) -> int:
    """How many ``prefix.N`` blocks hold weights (the highest N + 1)."""
    found = [int(k.split(".")[1]) for k in weights if k.startswith(f"{prefix}.")]
    return max(found) + 1 if found else 0


def _library(weights_say: dict, options: dict) -> tuple[str, bool]:
    """(library, assumed): guided-diffusion where a file or flag uses what only it has."""
    if "library" in options:
        if options["library"] not in LIBRARIES:
            known = ", ".join(LIBRARIES)
            raise ConfigError(f"library must be one of {known}, got {options['library']!r}")
        return options["library"], False
    guided = (
        weights_say["resblock_updown"]
        or any(not float(m).is_integer() for m in weights_say["channel_mult"])
        or options.get("num_head_channels", -1) != -1
        or options.get("use_new_attention_order", False)
    )
    if guided:
        return "guided-diffusion", False
    return "improved-diffusion", True


def encoder_layouts(weights: dict[str, torch.Tensor], blocks: int) -> list[dict]:
    """The fields of the down half (input blocks) that the weight shapes fix, one candidate per
    count of res blocks that ``blocks`` = levels * (res blocks + 1) allows: a UNetModel's output
    blocks, or an EncoderUNetModel's input blocks (the caller keeps the candidate whose layout
    fits every key)."""
    mc = weights["time_embed.0.weight"].shape[1]
    candidates = []
    for nrb in range(1, blocks):
        if blocks % (nrb + 1):
            continue
        levels = blocks // (nrb + 1)
        starts = [1 + level * (nrb + 1) for level in range(levels)]
        try:
            widths = [weights[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0] for i in starts]
            emb = weights["input_blocks.1.0.emb_layers.1.weight"].shape[0]
        except KeyError:
            continue
        down = f"input_blocks.{starts[0] + nrb}.0" if levels > 1 else None
        updown = down is not None and f"{down}.in_layers.0.weight" in weights
        candidates.append(dict(
            in_channels=weights["input_blocks.0.0.weight"].shape[1],
            model_channels=mc,
            num_res_blocks=nrb,
            attention_ds=tuple(2**level for level, i in enumerate(starts)
                               if f"input_blocks.{i}.1.qkv.weight" in weights),
            channel_mult=tuple(w // mc if w % mc == 0 else w / mc for w in widths),
            use_scale_shift_norm=emb == 2 * widths[0],
            resblock_updown=updown,
            conv_resample=updown or down is None or f"{down}.op.weight" in weights,
        ))  # fmt: skip
    return candidates


def _shape_fields(weights: dict[str, torch.Tensor]) -> list[dict]:
    """The configs' fields that the weight shapes fix (``encoder_layouts`` plus the head)."""
    labels = weights.get("label_emb.weight")
    head = dict(out_channels=weights["out.2.weight"].shape[0],
                num_classes=None if labels is None else labels.shape[0])  # fmt: skip
    layouts = encoder_layouts(weights, count_blocks(weights, "output_blocks"))
    return [{**fields_, **head} for fields_ in layouts]


def fits(network: type[nn.Module], config, weights: dict[str, torch.Tensor]) -> bool:
    """Whether ``network(config)``, laid out on the meta device, has the weights' keys and
    shapes."""
    with torch.device("meta"):
        skeleton = network(config)
    expected = {k: v.shape for k, v in skeleton.state_dict().items()}
    return expected == {k: v.shape for k, v in weights.items()}


def infer_config(weights: dict[str, torch.Tensor], **options) -> UnetConfig:
    """The config the weights fix, ``options`` (the libraries' flag names) settling the rest:
    num_heads, num_head_channels, num_heads_upsample, use_new_attention_order,
    rescale_timesteps with diffusion_steps, library; flags the weights fix are checked against
    them (a ConfigError naming both)."""
    if "out.2.weight" not in weights or not count_blocks(weights, "output_blocks"):
        raise CheckpointError(
            "a guided-diffusion classifier (EncoderUNetModel), not a diffusion model: load it "
            "with ddpm_fast.load_classifier and pass it as classifier="
        )
    candidates = _shape_fields(weights)
    if not candidates:
        raise CheckpointError("an ADM UNetModel whose blocks do not follow the libraries' layout")
    say = candidates[0]
    # SuperResModel's first conv takes the 3 image channels and the 3 of the upsampled
    # low-resolution image (the libraries' images are RGB); no diffusion model takes more
    # channels than it gives.
    if say["in_channels"] == 2 * 3 or say["in_channels"] > say["out_channels"]:
        raise CheckpointError(
            f"a super-resolution UNetModel (SuperResModel: its first conv takes "
            f"{say['in_channels']} channels, the image and the upsampled low-resolution image); "
            "not supported"
        )
    library, _ = _library(say, options)
    given = {k: v for k, v in options.items() if k in NETWORK_FLAGS}
    flags = {**LIBRARY_DEFAULTS[library], **given}
    scale = 1.0
    if flags["rescale_timesteps"]:
        steps = check_int("diffusion_steps", options.get("diffusion_steps", 1000), minimum=1)
        scale = 1000.0 / steps
    network = dict(
        num_heads=flags["num_heads"], num_head_channels=flags["num_head_channels"],
        num_heads_upsample=flags["num_heads_upsample"],
        use_new_attention_order=flags["use_new_attention_order"], timestep_scale=scale,
        library=library,
    )  # fmt: skip
    fitting = []
    for fields_ in candidates:
        try:
            config = UnetConfig(**fields_, **network)
        except ConfigError:
            if len(candidates) == 1:
                raise
            continue
        if fits(Unet, config, weights):
            fitting.append(config)
    if len(fitting) != 1:
        # One error naming the keys: build the first candidate and let strict loading say.
        return UnetConfig(**candidates[0], **network)
    config = fitting[0]
    _check_weight_flags(config, options)
    return config


def _flag_channel_mult(value) -> tuple:
    if isinstance(value, str):
        return tuple(float(m) for m in value.split(",") if m.strip())
    return tuple(float(m) for m in value)


def _check_weight_flags(config: UnetConfig, options: dict) -> None:
    """ConfigError where a flag the weights fix says otherwise, naming both."""
    weights_say = {
        "num_channels": config.model_channels,
        "num_res_blocks": config.num_res_blocks,
        "class_cond": config.num_classes is not None,
        "learn_sigma": config.out_channels == 2 * config.in_channels,
        "use_scale_shift_norm": config.use_scale_shift_norm,
        "resblock_updown": config.resblock_updown,
    }
    for flag, value in weights_say.items():
        if flag in options and options[flag] != value:
            raise ConfigError(
                f"--{flag} {options[flag]} contradicts the weights, which say {value}"
            )
    if "channel_mult" in options and options["channel_mult"] not in ("", None):
        given = _flag_channel_mult(options["channel_mult"])
        if given != tuple(float(m) for m in config.channel_mult):
            mult = ",".join(str(m) for m in config.channel_mult)
            raise ConfigError(
                f"--channel_mult {options['channel_mult']} contradicts the weights, which say "
                f"{mult}"
            )


def attention_resolutions(config: UnetConfig, image_size: int) -> str:
    """The libraries' ``attention_resolutions`` flag of ``config`` at ``image_size`` (pixels)."""
    return ",".join(str(image_size // d) for d in sorted(config.attention_ds, reverse=True))


def check_attention_flag(config: UnetConfig, flag: str, image_size: int) -> None:
    """ConfigError where the ``attention_resolutions`` flag (pixels) contradicts the weights."""
    try:
        given = {image_size // int(r) for r in str(flag).split(",") if r.strip()}
    except ValueError:
        raise ConfigError(f"--attention_resolutions {flag!r} is not a list of sizes") from None
    if given != set(config.attention_ds):
        raise ConfigError(
            f"--attention_resolutions {flag} contradicts the weights, which have attention at "
            f"{attention_resolutions(config, image_size)} for image_size {image_size}"
        )


def library_diffusion(weights: dict, config: UnetConfig, unet_options: dict, options: dict):
    """(DiffusionConfig fields, notes) of a file read with the libraries' flags: noise_schedule
    over diffusion_steps, learn_sigma -> learned_range, sigma_small -> fixed_small else
    fixed_large, predict_xstart -> pred_x0 else pred_noise, x0 clipped, OpenAI's respacing."""
    from ..schedule import ScheduleConfig

    notes = [f"read as an OpenAI ADM UNetModel state_dict ({config.library})"]
    given = dict(unet_options)
    library, assumed_library = _library(
        {"resblock_updown": config.resblock_updown, "channel_mult": config.channel_mult}, given
    )
    if assumed_library:
        notes.append(
            "improved-diffusion's defaults assumed (the weights use nothing only guided-diffusion "
            "has); --library guided-diffusion for its defaults"
        )
    assumed = [f"{k}={v}" for k, v in LIBRARY_DEFAULTS[library].items() if k not in given]
    schedule = given.get("noise_schedule", options.get("beta_schedule"))
    steps = given.get("diffusion_steps", options.get("timesteps"))
    if schedule is None:
        assumed.append("noise_schedule=linear")
    if steps is None:
        assumed.append("diffusion_steps=1000")
    if assumed:
        notes.append(f"{', '.join(assumed)} assumed: the file cannot store them")
    if schedule not in (None, "linear", "cosine"):
        raise ConfigError(f"noise_schedule must be linear or cosine, got {schedule!r}")
    steps = check_int("diffusion_steps", 1000 if steps is None else steps, minimum=1)
    if "image_size" in options and "attention_resolutions" in given:
        check_attention_flag(config, given["attention_resolutions"], options["image_size"])
    training = sorted(k for k in given if k in TRAINING_FLAGS)
    if training:
        notes.append(f"{', '.join(training)}: training-only, sampling is the same")
    halves = sorted({str(v.dtype).removeprefix("torch.") for v in weights.values()
                     if v.dtype in (torch.float16, torch.bfloat16)})  # fmt: skip
    if halves:
        notes.append(f"{'/'.join(halves)} weights (use_fp16) read as float32")
    learned = config.out_channels == 2 * config.in_channels
    variance = "learned_range" if learned else (
        "fixed_small" if given.get("sigma_small") else "fixed_large"
    )  # fmt: skip
    fields_ = dict(
        image_size=options.get("image_size"),
        schedule=ScheduleConfig(schedule or "linear", steps),
        objective=options.get("objective", "pred_x0" if given.get("predict_xstart") else
                              "pred_noise"),
        variance=options.get("variance", variance),
        auto_normalize=options.get("auto_normalize", True),
        timestep_spacing="sections",
        clip_x0=True,
    )  # fmt: skip
    return fields_, notes


def fold(network: Unet) -> None:
    """Nothing to fold: every weight is used as stored."""
