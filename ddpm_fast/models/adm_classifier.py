"""guided-diffusion's noisy-image classifier (``EncoderUNetModel``, released as
``64x64_classifier.pt`` ... ``512x512_classifier.pt``), the network of classifier guidance.

It is the down half of an ADM U-Net (the same ResBlocks and attention, from ``models.adm``) and a
head: ``adaptive`` (GroupNorm, SiLU, global average pool, 1x1 conv) or ``attention`` (CLIP's
attention pooling, the released classifiers'). Not a diffusion family: it is loaded by
``ddpm_fast.load_classifier`` and only ever differentiated, in ``ddpm_fast.guidance``.

The weights fix everything but the heads (``num_head_channels``: 64 in guided-diffusion's
``create_classifier``) and, for adaptive pooling, the image size; the library's
CLASSIFIER_FLAGS (``classifier_width``, ``classifier_depth``, ``classifier_attention_resolutions``,
``classifier_use_scale_shift_norm``, ``classifier_resblock_updown``, ``classifier_pool``,
``image_size``) are checked against them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..options import check_int
from .adm import (
    AttentionBlock,
    Downsample,
    QKVAttention,
    ResBlock,
    TimestepEmbedSequential,
    count_blocks,
    encoder_layouts,
    fits,
    normalization,
    timestep_embedding,
)

POOLS = ("adaptive", "attention")
# create_classifier's head width: its AttentionBlocks and AttentionPool2d split by it.
DEFAULT_HEAD_CHANNELS = 64
FLAGS = {  # CLASSIFIER_FLAGS name -> type
    "image_size": int,
    "classifier_width": int,
    "classifier_depth": int,
    "classifier_attention_resolutions": str,
    "classifier_use_scale_shift_norm": bool,
    "classifier_resblock_updown": bool,
    "classifier_pool": str,
    "classifier_use_fp16": bool,
    "classifier_scale": float,  # SAMPLE_FLAGS' (the scale, not the network's): accepted
}


@dataclass
class ClassifierConfig:
    in_channels: int
    model_channels: int
    num_classes: int
    num_res_blocks: int
    attention_ds: tuple[int, ...]
    channel_mult: tuple
    conv_resample: bool
    use_scale_shift_norm: bool
    resblock_updown: bool
    pool: str
    pool_size: int  # the attention pool's side (image_size // downsampling); 0 for adaptive
    num_head_channels: int = DEFAULT_HEAD_CHANNELS
    kind: str = field(default="adm-classifier", init=False)

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ConfigError(
                f"classifier pool must be one of {', '.join(POOLS)}, not {self.pool!r}"
            )
        self.attention_ds = tuple(self.attention_ds)
        self.channel_mult = tuple(self.channel_mult)
        for level in range(len(self.channel_mult)):
            width = self.width(level)
            if width % self.num_head_channels:
                raise ConfigError(
                    f"num_head_channels {self.num_head_channels} does not divide the "
                    f"classifier's width {width}"
                )

    @property
    def time_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def width(self, level: int) -> int:
        return int(self.channel_mult[level] * self.model_channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("kind")
        return d


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling, as guided-diffusion's: the mean token attends to all."""

    def __init__(self, spatial: int, channels: int, head_channels: int, out_channels: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(channels, spatial**2 + 1))
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)
        self.attention = QKVAttention(channels // head_channels)

    def forward(self, x):
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


class EncoderUNet(nn.Module):
    """``forward(x, timesteps) -> logits [B, num_classes]``, guided-diffusion's
    EncoderUNetModel with its state_dict keys."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        emb_dim = c.time_dim
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))  # fmt: skip

        def resblock(ch, out=None, down=False):
            return ResBlock(ch, emb_dim, out, c.use_scale_shift_norm, down=down)

        def attention(ch):
            return AttentionBlock(ch, 1, c.num_head_channels, False)

        ch = c.width(0)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(c.in_channels, ch, 3, padding=1))]
        )
        ds = 1
        for level in range(len(c.channel_mult)):
            for _ in range(c.num_res_blocks):
                layers = [resblock(ch, c.width(level))]
                ch = c.width(level)
                if ds in c.attention_ds:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
            if level != len(c.channel_mult) - 1:
                down = (resblock(ch, ch, down=True) if c.resblock_updown
                        else Downsample(ch, c.conv_resample, ch))  # fmt: skip
                self.input_blocks.append(TimestepEmbedSequential(down))
                ds *= 2
        self.middle_block = TimestepEmbedSequential(resblock(ch), attention(ch), resblock(ch))
        if c.pool == "attention":
            head = AttentionPool2d(c.pool_size, ch, c.num_head_channels, c.num_classes)
            self.out = nn.Sequential(normalization(ch), nn.SiLU(), head)
        else:
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                nn.Conv2d(ch, c.num_classes, 1), nn.Flatten(),
            )  # fmt: skip
        self.timed_blocks = [(n, m) for n, m in self.named_modules() if isinstance(m, ResBlock)]

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels))
        cond = {name: m.project(emb) for name, m in self.timed_blocks}
        h = x
        for i, module in enumerate(self.input_blocks):
            h = module(h, cond, f"input_blocks.{i}")
        h = self.middle_block(h, cond, "middle_block")
        return self.out(h)


def is_classifier(weights: dict[str, torch.Tensor]) -> bool:
    """An EncoderUNetModel state_dict: an ADM U-Net's start, no output blocks."""
    return (
        "time_embed.0.weight" in weights
        and "input_blocks.0.0.weight" in weights
        and not any(k.startswith("output_blocks.") for k in weights)
    )


def _pool(weights: dict[str, torch.Tensor]) -> str:
    if "out.2.positional_embedding" in weights:
        return "attention"
    if "out.3.weight" in weights:
        return "adaptive"
    if "out.0.weight" in weights and weights["out.0.weight"].ndim == 2:
        raise CheckpointError("a classifier with spatial pooling: not supported (only "
                              "adaptive and attention pooling, the released ones)")  # fmt: skip
    raise CheckpointError("a classifier whose head is none of guided-diffusion's")


def _candidates(weights: dict[str, torch.Tensor], pool: str, head_channels: int) -> list:
    """The configs whose layout fits every key: the ADM down half's (``adm.encoder_layouts``)
    with this head."""
    classes_key = "out.2.c_proj.weight" if pool == "attention" else "out.3.weight"
    pool_size = 0
    if pool == "attention":
        pool_size = math.isqrt(weights["out.2.positional_embedding"].shape[1] - 1)
    head = dict(num_classes=weights[classes_key].shape[0], pool=pool, pool_size=pool_size,
                num_head_channels=head_channels)  # fmt: skip
    found = []
    for fields_ in encoder_layouts(weights, count_blocks(weights, "input_blocks")):
        try:
            config = ClassifierConfig(**fields_, **head)
        except ConfigError:
            continue
        if fits(EncoderUNet, config, weights):
            found.append(config)
    return found


def infer_config(weights: dict[str, torch.Tensor], **flags) -> tuple[ClassifierConfig, int]:
    """(config, image size) of a classifier state_dict; ``flags``: CLASSIFIER_FLAGS names (and
    ``num_head_channels``), those the weights fix checked against them (a ConfigError naming
    both)."""
    unknown = sorted(set(flags) - set(FLAGS) - {"num_head_channels"})
    if unknown:
        raise ConfigError(f"unknown classifier flags {unknown}; known: {', '.join(FLAGS)}")
    head_channels = check_int(
        "num_head_channels", flags.get("num_head_channels", DEFAULT_HEAD_CHANNELS), minimum=1
    )
    pool = _pool(weights)
    found = _candidates(weights, pool, head_channels)
    if len(found) != 1:
        raise CheckpointError(
            "a classifier whose blocks do not follow guided-diffusion's EncoderUNetModel "
            f"layout (num_head_channels {head_channels}: give the one it was made with)"
        )
    config = found[0]
    image_size = flags.get("image_size")
    if pool == "attention":
        fixed = config.pool_size * config.downsample_factor
        if image_size is not None and image_size != fixed:
            raise ConfigError(
                f"image_size {image_size}, but the classifier's weights are for {fixed}"
            )
        image_size = fixed
    if image_size is None:
        raise ConfigError(
            "an adaptive-pool classifier does not say its image size: give image_size"
        )
    image_size = check_int("image_size", image_size, minimum=1)
    attention = flags.get("classifier_attention_resolutions")
    weights_say = {
        "classifier_width": config.model_channels,
        "classifier_depth": config.num_res_blocks,
        "classifier_use_scale_shift_norm": config.use_scale_shift_norm,
        "classifier_resblock_updown": config.resblock_updown,
        "classifier_pool": config.pool,
    }
    for name, value in weights_say.items():
        if name in flags and flags[name] != value:
            raise ConfigError(f"{name} {flags[name]!r}, but the classifier's weights say {value!r}")
    if attention is not None:
        given = sorted(image_size // int(r) for r in str(attention).split(",") if r.strip())
        if tuple(given) != tuple(sorted(config.attention_ds)):
            say = ",".join(str(image_size // ds) for ds in config.attention_ds)
            raise ConfigError(
                f"classifier_attention_resolutions {attention!r}, but the classifier's weights "
                f"have attention at {say or 'no resolution'}"
            )
    return config, image_size


def parse_classifier_flags(text: str) -> dict:
    """CLASSIFIER_FLAGS as guided-diffusion's README spells them ("--image_size 64
    --classifier_depth 2 ..."): {name: typed value}."""
    words = text.split()
    if len(words) % 2:
        raise ConfigError(f"classifier flags come in --name value pairs, got {text!r}")
    flags = {}
    for key, value in zip(words[::2], words[1::2], strict=True):
        name = key.removeprefix("--")
        if not key.startswith("--") or name not in FLAGS:
            raise ConfigError(f"unknown classifier flag {key!r}; known: {', '.join(FLAGS)}")
        kind = FLAGS[name]
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                flags[name] = value.lower() in ("true", "1", "yes")
            else:
                flags[name] = kind(value)
        except ValueError:
            raise ConfigError(f"classifier flag {key} {value!r} is not a {kind.__name__}") from None
    return flags
