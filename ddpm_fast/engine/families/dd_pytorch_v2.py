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

For ONNX Runtime (``onnx_form``, fed ``onnx_time_rows``): ``RmsBlock``, the norm's sum of squares
as a 1x1 conv and its gain and the time scale/shift as one multiply-add; ``TokenLinearAttention``
and ``TokenAttention``, both attentions on the [B, H * W, C] token view, as 1.x's
(``dd_pytorch_v1``), with RMSNorm and the memory slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.channel_norm import RMS_EPS, channel_rms_norm
from ...models import dd_pytorch_v2 as ref
from ..modules import TimeSlice, Upsample, frozen, image_view, linear_attention, token_view
from .dd_pytorch_v1 import swap_stage_blocks, unshuffle_conv


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


class RmsBlock(nn.Module):
    """``ref.Block`` for ONNX Runtime: the RMSNorm's sum of squares over the channels as a 1x1
    conv of x * x with one output channel (ONNX Runtime's blocked-layout conv, not a strided
    reduction), and its gain g * sqrt(C) and the time scale/shift as one multiply-add,
    ``x_hat * A + B`` with ``A = g * sqrt(C) * (1 + scale)`` and ``B = shift`` carried by the
    time rows (``onnx_time_rows``). On the dd2-cifar10 U-Net's 32x32 block: 0.94 -> 0.76 ms."""

    def __init__(self, block: ref.Block):
        super().__init__()
        self.proj = block.proj
        channels = block.norm.g.shape[1]
        self.gain = frozen(block.norm.g * block.norm.scale)  # [1, C, 1, 1]
        self.sum_over_channels = frozen(torch.ones(1, channels, 1, 1))

    def forward(self, x, scale_shift=None):
        """``scale_shift``: (A, B) of ``onnx_time_rows``, or None (the norm's own gain)."""
        x = self.proj(x)
        norm = F.conv2d(x * x, self.sum_over_channels).sqrt()  # [B, 1, H, W]
        x = x / norm.clamp_min(RMS_EPS)
        if scale_shift is None:
            return F.silu(x * self.gain)
        a, b = scale_shift
        return F.silu(x * a + b)


def onnx_time_rows(
    reference: ref.Unet, conditioning: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The time rows ``onnx_form``'s network reads: each ResnetBlock's (scale, shift) rows
    [n, 2C] as its ``RmsBlock``'s (A, B)."""
    rows = {}
    for name, row in conditioning.items():
        norm = reference.get_submodule(name).block1.norm
        scale, shift = row.float().chunk(2, dim=1)
        gain = (norm.g.detach().float() * norm.scale).reshape(1, -1)
        rows[name] = torch.cat((gain * (1 + scale), shift), dim=1)
    return rows


class TokenLinearAttention(nn.Module):
    """``ref.LinearAttention`` (no residual: the Unet adds it) on the token view for ONNX
    Runtime: the RMSNorms along the last axis with their gains folded into the projections (the
    first) or applied after (the second), q projected onto the tokens and k, v onto the channels
    with the memory slots in front, both softmaxes along the last axis, and the output
    contraction and to_out's 1x1 conv as one product ``q @ M`` (see 1.x's)."""

    def __init__(self, attention: ref.LinearAttention):
        super().__init__()
        qkv, hidden = _take_projection(self, attention)
        self.q = frozen(qkv[:hidden].t())  # [C, h * d]
        self.kv = frozen(qkv[hidden:])  # [2 * h * d, C]
        self.mem_kv = frozen(attention.mem_kv)  # [2, h, d, M]
        out_conv, out_norm = attention.to_out
        out = out_conv.weight[:, :, 0, 0].t() * attention.scale  # [h * e, C]
        self.out = frozen(out.reshape(self.heads, self.dim_head, self.channels))
        self.out_bias = frozen(out_conv.bias)
        self.out_gain = frozen(out_norm.g.reshape(-1) * out_norm.scale)

    def forward(self, x):
        b, c, h, d = x.shape[0], self.channels, self.heads, self.dim_head
        n = x.shape[2] * x.shape[3]
        normed = F.normalize(token_view(x, c), dim=-1)
        q = (normed @ self.q).reshape(b, n, h, d).softmax(dim=-1).reshape(b, n, h * d)
        k, v = (self.kv @ normed.transpose(1, 2)).reshape(b, 2, h, d, n).unbind(1)
        mem_k, mem_v = (m.expand(b, -1, -1, -1) for m in self.mem_kv)
        k, v = torch.cat((mem_k, k), dim=-1), torch.cat((mem_v, v), dim=-1)
        context = k.softmax(dim=-1) @ v.transpose(-1, -2)  # [B, h, d, e]
        out = q @ (context @ self.out).reshape(b, h * d, c) + self.out_bias
        return image_view(F.normalize(out, dim=-1) * self.out_gain, x)


class TokenAttention(nn.Module):
    """``ref.Attention`` (no residual) on the token view for ONNX Runtime: the RMSNorm along the
    last axis with its gain and q's scale folded into the projection, the memory slots in front
    of k and v, softmax along the last axis, MatMuls instead of Einsums."""

    def __init__(self, attention: ref.Attention):
        super().__init__()
        qkv, hidden = _take_projection(self, attention)
        qkv = torch.cat((qkv[:hidden] * self.dim_head**-0.5, qkv[hidden:]))
        self.qkv = frozen(qkv.t())  # [C, 3 * h * d]
        self.mem_kv = frozen(attention.mem_kv)  # [2, h, M, d]
        self.out = frozen(attention.to_out.weight[:, :, 0, 0].t())  # [h * d, C]
        self.out_bias = frozen(attention.to_out.bias)

    def forward(self, x):
        b, h, d = x.shape[0], self.heads, self.dim_head
        n = x.shape[2] * x.shape[3]
        qkv = F.normalize(token_view(x, self.channels), dim=-1) @ self.qkv
        q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, N, d]
        mem_k, mem_v = (m.expand(b, -1, -1, -1) for m in self.mem_kv)
        k, v = torch.cat((mem_k, k), dim=2), torch.cat((mem_v, v), dim=2)
        out = (q @ k.transpose(-1, -2)).softmax(dim=-1) @ v  # [B, h, N, d]
        out = out.transpose(1, 2).reshape(b, n, h * d) @ self.out + self.out_bias
        return image_view(out, x)


def _take_projection(block: nn.Module, attention: nn.Module) -> tuple[torch.Tensor, int]:
    """Set ``block``'s heads, channels and dim_head from ``attention``; return its qkv projection
    [3 * h * d, C] with its RMSNorm's gain g * sqrt(C) folded in, and h * d."""
    qkv = attention.to_qkv.weight[:, :, 0, 0] * (
        attention.norm.g.reshape(1, -1) * attention.norm.scale
    )
    hidden = qkv.shape[0] // 3
    block.heads, block.channels = attention.heads, qkv.shape[1]
    block.dim_head = hidden // attention.heads
    return qkv, hidden


def onnx_form(folded: ref.Unet) -> None:
    """Swap, in the folded network ``folded``, the blocks that ONNX Runtime runs faster in
    another form (the same function, given ``onnx_time_rows``' time rows): the blocks' norms,
    every attention, and the downsamplings' pixel-unshuffle + 1x1 conv as one strided conv."""
    for block in [m for m in folded.modules() if isinstance(m, ref.ResnetBlock)]:
        block.block1, block.block2 = RmsBlock(block.block1), RmsBlock(block.block2)
    swap_stage_blocks(folded, _token_form, _token_form)


def _token_form(module: nn.Module) -> nn.Module:
    if isinstance(module, ref.LinearAttention):
        return TokenLinearAttention(module)
    return TokenAttention(module)


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
