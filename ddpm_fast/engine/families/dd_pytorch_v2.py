"""denoising-diffusion-pytorch 2.x onto the fast modules.

- ``FastBlock``: conv -> one fused channel RMSNorm + scale/shift + SiLU (the channel_norm
  kernel); ``fuse`` (where the kernels run): the conv's bias is the kernel's pre-bias, and the
  second Block's kernel adds the ResnetBlock's residual;
- ``FastResnetBlock`` (:mod:`ddpm_fast.engine.modules`): its (scale, shift), a slice of the
  step's time row, for its two ``FastBlock``;
- ``FastLinearAttention``: RMSNorm, 1x1 conv, the linear-attention kernel with the memory
  key/values (2.x does not divide v by H * W), 1x1 conv and RMSNorm, plus the residual (with
  ``fuse``, the conv's bias and the residual in the last RMSNorm's kernel);
- ``FastAttention``: RMSNorm, 1x1 conv, memory key/values prepended, scaled_dot_product_attention
  (its default scale, dim_head ** -0.5, is the reference's), 1x1 conv, plus the residual;
- ``Downsample``'s pixel-unshuffle + 1x1 conv as one 2x2 stride-2 conv (the same sums), and the
  U-Net walk (``StagedUnet``), shared with 1.x's mapping (:mod:`ddpm_fast.engine.modules`).

The ONNX Runtime form (``onnx_form``, ``onnx_time_rows``) is its own file beside this one,
:mod:`.dd_pytorch_v2_onnx`, named here so that the family's mapping has it.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.channel_norm import channel_rms_norm
from ...models import dd_pytorch_v2 as ref
from ..modules import FastResnetBlock, StagedUnet, TimeSlice, linear_attention, take_conv_bias
from .dd_pytorch_v2_onnx import onnx_form, onnx_time_rows  # noqa: F401 (the mapping's)


class FastBlock(nn.Module):
    """``ref.Block``: conv -> RMSNorm -> x * (1 + scale) + shift -> SiLU, the last three fused.
    ``fuse``: the conv's bias is the norm kernel's pre-bias."""

    def __init__(self, block: ref.Block, fuse: bool = False):
        super().__init__()
        self.proj = block.proj
        self.g = block.norm.g
        self.pre_bias = take_conv_bias(self.proj) if fuse else None

    def forward(self, x, scale=None, shift=None, **epilogue):
        return channel_rms_norm(
            self.proj(x), self.g, scale=scale, shift=shift, act="silu", pre_bias=self.pre_bias,
            **epilogue,
        )  # fmt: skip


class FastLinearAttention(nn.Module):
    """``attn(x) + x`` for a ``ref.LinearAttention``. ``fuse``: the to_out conv's bias, the
    residual and a second copy of the output (``also_out``) in the last RMSNorm's kernel."""

    def __init__(self, attention: ref.LinearAttention, fuse: bool = False):
        super().__init__()
        self.g = attention.norm.g
        self.heads = attention.heads
        self.scale = attention.scale
        self.mem_kv = attention.mem_kv
        self.to_qkv = attention.to_qkv
        self.to_out = attention.to_out[0]
        self.out_g = attention.to_out[1].g
        self.writes_out = fuse
        self.out_bias = take_conv_bias(self.to_out) if fuse else None

    def forward(self, x, out=None, also_out=None):
        qkv = self.to_qkv(channel_rms_norm(x, self.g))
        y = linear_attention(qkv, self.heads, mem_kv=self.mem_kv, q_scale=self.scale)
        if not self.writes_out:
            return channel_rms_norm(self.to_out(y), self.out_g) + x
        return channel_rms_norm(
            self.to_out(y), self.out_g, pre_bias=self.out_bias, residual=x, out=out,
            also_out=also_out,
        )  # fmt: skip


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


class FastUnetV2(StagedUnet):
    """``forward(x, time_row, x_self_cond=None)`` equals the reference's forward at the
    timestep whose row of the time table ``time_row`` is."""

    def __init__(self, folded: ref.Unet, slices: dict[str, tuple[int, int]], fuse: bool):
        def resnet(name: str) -> FastResnetBlock:
            block = folded.get_submodule(name)
            fast_block = partial(FastBlock, fuse=fuse)
            return FastResnetBlock(block, TimeSlice(*slices[name]), fast_block, fuse)

        def attention(module: nn.Module) -> nn.Module:
            if isinstance(module, ref.LinearAttention):
                return FastLinearAttention(module, fuse)
            return FastAttention(module)

        super().__init__(folded, resnet, attention, FastAttention, fuse)


def build(folded: ref.Unet, slices: dict[str, tuple[int, int]], fuse: bool) -> nn.Module:
    """The engine's network of a 2.x Unet (see ddpm_fast.models, the engine side)."""
    return FastUnetV2(folded, slices, fuse)
