"""diffusers' UNet2DModel onto the fast modules.

- ``FastResnetBlock2D``: GroupNorm + SiLU (one fused launch), conv, then the second GroupNorm
  fused with the time conditioning and SiLU: in "default" mode the block's time bias plus conv1's
  bias, precomputed per chain step (``time_tables``), is the kernel's pre-bias; in "scale_shift"
  mode the step's (scale, shift) are the kernel's; conv, + shortcut;
- ``FastAttention2D``: GroupNorm (fused kernel, no activation), q/k/v as one 1x1 conv, SDPA, the
  out projection as a 1x1 conv, + residual;
- the output GroupNorm + SiLU fused; the last conv in fp32 (see the 1.x mapping for why).
"""

from __future__ import annotations

import torch
from torch import nn

from ...models import diffusers_unet2d as ref
from ..modules import GroupNormAct, TimedNorm, TimeSlice, Upsample, pointwise_conv, sdpa


def _linear_as_conv(*linears: nn.Linear) -> nn.Conv2d:
    """``linears`` (same input) stacked as one 1x1 conv over channels."""
    return pointwise_conv(
        torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears])
    )


class FastResnetBlock2D(nn.Module):
    def __init__(self, block: ref.ResnetBlock2D, time: TimeSlice, fuse: bool):
        super().__init__()
        self.norm1 = GroupNormAct(block.norm1, "silu")
        self.conv1 = block.conv1
        self.norm2 = TimedNorm(block.norm2, self.conv1, block.scale_shift, fuse)
        self.conv2 = block.conv2
        self.conv_shortcut = block.conv_shortcut
        self.factor = block.output_scale_factor
        self.time = time

    def forward(self, x, time_row):
        h = self.norm2(self.conv1(self.norm1(x)), self.time(time_row))
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.factor == 1 else out / self.factor


class FastAttention2D(nn.Module):
    def __init__(self, attention: ref.Attention):
        super().__init__()
        self.heads = attention.heads
        self.factor = attention.rescale_output_factor
        norm = attention.group_norm
        self.norm = GroupNormAct(norm, None) if norm is not None else None
        self.to_qkv = _linear_as_conv(attention.to_q, attention.to_k, attention.to_v)
        self.to_out = _linear_as_conv(attention.to_out[0])

    def forward(self, x):
        h = self.norm(x) if self.norm is not None else x
        out = self.to_out(sdpa(self.to_qkv(h), self.heads)) + x
        return out if self.factor == 1 else out / self.factor


class FastUnet2D(nn.Module):
    def __init__(self, folded: ref.Unet, slices: dict[str, tuple[int, int]], fuse: bool):
        super().__init__()
        self.center_input_sample = folded.config.center_input_sample

        def resnet(name: str) -> FastResnetBlock2D:
            block = folded.get_submodule(name)
            return FastResnetBlock2D(block, TimeSlice(*slices[name]), fuse)

        def attentions(block) -> nn.ModuleList:
            return nn.ModuleList(FastAttention2D(a) for a in block.attentions)

        self.conv_in = folded.conv_in
        self.downs = nn.ModuleList()
        for i, block in enumerate(folded.down_blocks):
            resnets = [resnet(f"down_blocks.{i}.resnets.{j}") for j in range(len(block.resnets))]
            down = block.downsamplers[0] if block.downsamplers is not None else None
            self.downs.append(nn.ModuleList([nn.ModuleList(resnets), attentions(block), down]))
        mid = folded.mid_block
        self.mid_resnets = nn.ModuleList(resnet(f"mid_block.resnets.{j}") for j in range(2))
        self.mid_attentions = attentions(mid)
        self.ups = nn.ModuleList()
        for i, block in enumerate(folded.up_blocks):
            resnets = [resnet(f"up_blocks.{i}.resnets.{j}") for j in range(len(block.resnets))]
            up = Upsample(block.upsamplers[0].conv) if block.upsamplers is not None else None
            self.ups.append(nn.ModuleList([nn.ModuleList(resnets), attentions(block), up]))
        self.norm_out = GroupNormAct(folded.conv_norm_out, "silu")
        self.conv_out = folded.conv_out
        self.conv_out.keeps_fp32 = True
        self.divisor = TimeSlice(*slices["output_divisor"]) if "output_divisor" in slices else None

    def forward(self, x, t, x_self_cond=None):
        if self.center_input_sample:
            x = 2 * x - 1.0
        x = self.conv_in(x)
        skips = [x]
        for resnets, attns, down in self.downs:
            for j, resnet in enumerate(resnets):
                x = resnet(x, t)
                if len(attns):
                    x = attns[j](x)
                skips.append(x)
            if down is not None:
                x = down(x)
                skips.append(x)
        x = self.mid_resnets[0](x, t)
        if len(self.mid_attentions):
            x = self.mid_attentions[0](x)
        x = self.mid_resnets[1](x, t)
        for resnets, attns, up in self.ups:
            for j, resnet in enumerate(resnets):
                x = resnet(torch.cat([x, skips.pop()], dim=1), t)
                if len(attns):
                    x = attns[j](x)
            if up is not None:
                x = up(x)
        x = self.conv_out(self.norm_out(x).float())
        if self.divisor is not None:
            x = x / self.divisor(t).reshape(-1, 1, 1, 1)
        return x


def time_tables(folded: ref.Unet, tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In "default" mode each block's time bias plus its conv1's bias (their sum is the second
    GroupNorm's pre-bias): one table, no add per step."""
    if folded.config.resnet_time_scale_shift != "default":
        return tables
    out = dict(tables)
    for name, module in folded.named_modules():
        if isinstance(module, ref.ResnetBlock2D):
            out[name] = tables[name] + module.conv1.bias.detach().float()
    return out


def build(folded: ref.Unet, slices: dict[str, tuple[int, int]], fuse: bool) -> nn.Module:
    """The engine's network of a UNet2DModel reference (see ddpm_fast.models, the engine side)."""
    return FastUnet2D(folded, slices, fuse)
