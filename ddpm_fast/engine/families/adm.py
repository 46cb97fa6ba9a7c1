"""OpenAI's ADM UNetModel (guided- and improved-diffusion) onto the fast modules.

- ``FastResBlock``: GroupNorm32 + SiLU (one fused launch), with resblock_updown the resampling of
  h and x after it (nearest x2 or a 2 x 2 average), conv; then the second GroupNorm fused with
  the time conditioning and SiLU: with use_scale_shift_norm the step's (scale, shift) are the
  kernel's; without it the block's time projection plus the first conv's bias, one precomputed
  row per chain step (``time_tables``), is the kernel's pre-bias; conv; + skip;
- ``FastAttentionBlock``: GroupNorm32 (fused kernel, no activation), qkv as one 1x1 conv with
  its rows laid out q, k, v, each head-major (QKVAttentionLegacy's rows, head by head, are
  reordered once at build), scaled_dot_product_attention (the libraries' q ch**-0.25, k
  ch**-0.25 is SDPA's ch**-0.5), proj_out as a 1x1 conv, + residual;
- the output GroupNorm + SiLU fused; the last conv in fp32 (see the 1.x mapping for why).
"""

from __future__ import annotations

import torch
from torch import nn

from ...models import adm as ref
from ..modules import GroupNormAct, TimedNorm, TimeSlice, Upsample, pointwise_conv, sdpa


def _conv1d_as_2d(conv: nn.Conv1d, rows: torch.Tensor | None = None) -> nn.Conv2d:
    """A 1x1 Conv1d as a 1x1 Conv2d, its output rows taken in the order ``rows``."""
    weight, bias = conv.weight[:, :, 0], conv.bias
    if rows is not None:
        weight, bias = weight[rows], bias[rows]
    return pointwise_conv(weight, bias)


def _legacy_rows(heads: int, channels: int) -> torch.Tensor:
    """QKVAttentionLegacy's qkv rows (head h: q, k, v of ``channels // heads`` each) in
    QKVAttention's order (q of every head, then k, then v)."""
    d = channels // heads
    order = torch.arange(3 * channels).reshape(heads, 3, d)  # [head, q/k/v, d]
    return order.transpose(0, 1).reshape(-1)


class FastResBlock(nn.Module):
    def __init__(self, block: ref.ResBlock, time: TimeSlice, fuse: bool):
        super().__init__()
        self.norm1 = GroupNormAct(block.in_layers[0], "silu")
        self.h_upd, self.x_upd = block.h_upd, block.x_upd
        self.conv1 = block.in_layers[2]
        self.norm2 = TimedNorm(block.out_layers[0], self.conv1, block.use_scale_shift_norm, fuse)
        self.conv2 = block.out_layers[3]
        self.skip = block.skip_connection
        self.time = time

    def forward(self, x, time_row):
        h = self.h_upd(self.norm1(x))
        x = self.x_upd(x)
        h = self.norm2(self.conv1(h), self.time(time_row))
        return self.skip(x) + self.conv2(h)


class FastAttentionBlock(nn.Module):
    def __init__(self, block: ref.AttentionBlock):
        super().__init__()
        self.heads = block.num_heads
        self.norm = GroupNormAct(block.norm, None)
        legacy = isinstance(block.attention, ref.QKVAttentionLegacy)
        rows = _legacy_rows(self.heads, block.channels) if legacy else None
        self.qkv = _conv1d_as_2d(block.qkv, rows)
        self.proj_out = _conv1d_as_2d(block.proj_out)

    def forward(self, x):
        return x + self.proj_out(sdpa(self.qkv(self.norm(x)), self.heads))


def _fast_layer(layer: nn.Module, name: str, slices, fuse: bool) -> nn.Module:
    if isinstance(layer, ref.ResBlock):
        return FastResBlock(layer, TimeSlice(*slices[name]), fuse)
    if isinstance(layer, ref.AttentionBlock):
        return FastAttentionBlock(layer)
    if isinstance(layer, ref.Upsample):
        return Upsample(layer.conv) if layer.use_conv else layer
    if isinstance(layer, ref.Downsample):
        return layer.op
    return layer  # the first conv


class FastBlock(nn.Module):
    """A TimestepEmbedSequential's layers; the ResBlocks read the time row."""

    def __init__(self, block: nn.Sequential, prefix: str, slices, fuse: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            _fast_layer(layer, f"{prefix}.{i}", slices, fuse) for i, layer in enumerate(block)
        )
        self.timed = [isinstance(layer, FastResBlock) for layer in self.layers]

    def forward(self, x, time_row):
        for layer, timed in zip(self.layers, self.timed, strict=True):
            x = layer(x, time_row) if timed else layer(x)
        return x


class FastADMUnet(nn.Module):
    def __init__(self, folded: ref.Unet, slices: dict[str, tuple[int, int]], fuse: bool):
        super().__init__()

        def blocks(modules, prefix: str) -> nn.ModuleList:
            return nn.ModuleList(
                FastBlock(b, f"{prefix}.{i}", slices, fuse) for i, b in enumerate(modules)
            )

        self.input_blocks = blocks(folded.input_blocks, "input_blocks")
        self.middle_block = FastBlock(folded.middle_block, "middle_block", slices, fuse)
        self.output_blocks = blocks(folded.output_blocks, "output_blocks")
        self.norm_out = GroupNormAct(folded.out[0], "silu")
        self.conv_out = folded.out[2]
        self.conv_out.keeps_fp32 = True

    def forward(self, x, t, x_self_cond=None):
        hs = []
        for block in self.input_blocks:
            x = block(x, t)
            hs.append(x)
        x = self.middle_block(x, t)
        for block in self.output_blocks:
            x = block(torch.cat([x, hs.pop()], dim=1), t)
        return self.conv_out(self.norm_out(x).float())


def time_tables(folded: ref.Unet, tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without scale-shift norm, each block's time projection plus its first conv's bias (their
    sum is the second GroupNorm's pre-bias): one table, no add per step."""
    if folded.config.use_scale_shift_norm:
        return tables
    out = dict(tables)
    for name, module in folded.named_modules():
        if isinstance(module, ref.ResBlock):
            out[name] = tables[name] + module.in_layers[2].bias.detach().float()
    return out


def build(folded: ref.Unet, slices: dict[str, tuple[int, int]], fuse: bool) -> nn.Module:
    """The engine's network of an ADM reference (see ddpm_fast.models, the engine side)."""
    return FastADMUnet(folded, slices, fuse)
