"""denoising-diffusion-pytorch 2.x onto the fast modules.

- ``FastBlock``: conv -> one fused channel RMSNorm + scale/shift + SiLU (the channel_norm
  kernel); RMSNorm has no place for a pre-bias, so the conv keeps its bias (``bias_in_norm`` is
  1.x's GroupNorm business and is ignored here);
- ``FastResnetBlock``: its (scale, shift), a slice of the step's time row;
- ``FastLinearAttention``: RMSNorm, 1x1 conv, the linear-attention kernel with the memory
  key/values (2.x does not divide v by H * W), 1x1 conv and RMSNorm, plus the residual;
- ``FastAttention``: RMSNorm, 1x1 conv, memory key/values prepended, scaled_dot_product_attention
  (its default scale, dim_head ** -0.5, is the reference's), 1x1 conv, plus the residual;
- ``Downsample``'s pixel-unshuffle + 1x1 conv as one 2x2 stride-2 conv (the same sums).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.channel_norm import channel_rms_norm
from ...models import dd_pytorch_v2 as ref
from ..modules import TimeSlice, Upsample, linear_attention
from .dd_pytorch_v1 import unshuffle_conv


class FastBlock(nn.Module):
    """``ref.Block``: conv -> RMSNorm -> x * (1 + scale) + shift -> SiLU, the last three fused."""

    def __init__(self, block: ref.Block):
        super().__init__()
        self.proj = block.proj
        self.g = block.norm.g

    def forward(self, x, scale=None, shift=None):
        return channel_rms_norm(self.proj(x), self.g, scale=scale, shift=shift, act="silu")


class FastResnetBlock(nn.Module):
    """``ref.ResnetBlock`` with its time MLP replaced by its slice of the time row (scale, then
    shift)."""

    def __init__(self, block: ref.ResnetBlock, time: TimeSlice):
        super().__init__()
        self.block1 = FastBlock(block.block1)
        self.block2 = FastBlock(block.block2)
        self.res_conv = block.res_conv
        self.time = time

    def forward(self, x, time_row):
        scale, shift = self.time(time_row).chunk(2, dim=1)  # views
        h = self.block1(x, scale, shift)
        h = self.block2(h)
        return h + self.res_conv(x)


class FastLinearAttention(nn.Module):
    """``attn(x) + x`` for a ``ref.LinearAttention``."""

    def __init__(self, attention: ref.LinearAttention):
        super().__init__()
        self.g = attention.norm.g
        self.heads = attention.heads
        self.scale = attention.scale
        self.mem_kv = attention.mem_kv
        self.to_qkv = attention.to_qkv
        self.to_out = attention.to_out[0]
        self.out_g = attention.to_out[1].g

    def forward(self, x):
        qkv = self.to_qkv(channel_rms_norm(x, self.g))
        out = linear_attention(qkv, self.heads, mem_kv=self.mem_kv, q_scale=self.scale)
        return channel_rms_norm(self.to_out(out), self.out_g) + x


class FastAttention(nn.Module):
    """``attn(x) + x`` for a ``ref.Attention``: softmax attention over the memory slots and the
    pixels through F.scaled_dot_product_attention."""

    def __init__(self, attention: ref.Attention):
        super().__init__()
        self.g = attention.norm.g
        self.heads = attention.heads
        self.mem_kv = attention.mem_kv  # [2, heads, M, d]
        self.to_qkv = attention.to_qkv
        self.to_out = attention.to_out

    def forward(self, x):
        b, _, h, w = x.shape
        qkv = self.to_qkv(channel_rms_norm(x, self.g))
        # [B, 3 * heads * d, H, W] -> 3 x [B, heads, H * W, d]; the memory slots go in front of
        # k and v (the cat makes each head's rows contiguous in d, which SDPA's fused paths want).
        q, k, v = qkv.reshape(b, 3, self.heads, -1, h * w).transpose(-1, -2).unbind(1)
        mem_k, mem_v = (m.to(qkv.dtype).expand(b, -1, -1, -1) for m in self.mem_kv)
        k, v = torch.cat((mem_k, k), dim=2), torch.cat((mem_v, v), dim=2)
        out = F.scaled_dot_product_attention(q.contiguous(), k, v)
        out = out.transpose(-1, -2).reshape(b, -1, h, w)
        return self.to_out(out) + x


def _attention(module: nn.Module) -> nn.Module:
    if isinstance(module, ref.LinearAttention):
        return FastLinearAttention(module)
    return FastAttention(module)


def _resample(module: nn.Module) -> nn.Module:
    """The engine's version of a stage's last module (down- or upsampling, or a conv)."""
    if isinstance(module, nn.Sequential) and isinstance(module[1], nn.Conv2d):
        if isinstance(module[0], nn.Upsample):
            return Upsample(module[1])
        return unshuffle_conv(module)
    return module


class FastUnetV2(nn.Module):
    """``forward(x, time_row, x_self_cond=None)`` equals the reference's forward at the
    timestep whose row of the time table ``time_row`` is."""

    def __init__(self, folded: ref.Unet, slices: dict[str, tuple[int, int]]):
        super().__init__()
        self.self_condition = folded.self_condition

        def resnet(name: str) -> FastResnetBlock:
            return FastResnetBlock(folded.get_submodule(name), TimeSlice(*slices[name]))

        def stage(name: str, modules: nn.ModuleList) -> nn.ModuleList:
            """[block1, block2, attention, resampling] of the stage ``name`` ("downs.0", ...)."""
            return nn.ModuleList(
                [
                    resnet(f"{name}.0"),
                    resnet(f"{name}.1"),
                    _attention(modules[2]),
                    _resample(modules[3]),
                ]
            )

        self.init_conv = folded.init_conv
        self.downs = nn.ModuleList(stage(f"downs.{i}", m) for i, m in enumerate(folded.downs))
        self.mid_block1 = resnet("mid_block1")
        self.mid_attn = FastAttention(folded.mid_attn)
        self.mid_block2 = resnet("mid_block2")
        self.ups = nn.ModuleList(stage(f"ups.{i}", m) for i, m in enumerate(folded.ups))
        self.final_res_block = resnet("final_res_block")
        self.final_conv = folded.final_conv
        # Half precision: the last conv stays fp32, as 1.x's (the output the sampler amplifies).
        self.final_conv.keeps_fp32 = True

    def forward(self, x, t, x_self_cond=None):
        if self.self_condition:
            if x_self_cond is None:
                x_self_cond = torch.zeros_like(x)
            x = torch.cat((x_self_cond, x), dim=1)
        x = self.init_conv(x)
        r = x
        h = []
        for block1, block2, attn, downsample in self.downs:
            x = block1(x, t)
            h.append(x)
            x = block2(x, t)
            x = attn(x)
            h.append(x)
            x = downsample(x)
        x = self.mid_block1(x, t)
        x = self.mid_attn(x)
        x = self.mid_block2(x, t)
        for block1, block2, attn, upsample in self.ups:
            x = block1(torch.cat((x, h.pop()), dim=1), t)
            x = block2(torch.cat((x, h.pop()), dim=1), t)
            x = attn(x)
            x = upsample(x)
        x = self.final_res_block(torch.cat((x, r), dim=1), t)
        return self.final_conv(x.float())


def build(folded: ref.Unet, slices: dict[str, tuple[int, int]], bias_in_norm: bool) -> nn.Module:
    """The engine's network of a 2.x Unet (see ddpm_fast.models, the engine side); 2.x has
    nothing that ``bias_in_norm`` moves."""
    return FastUnetV2(folded, slices)
