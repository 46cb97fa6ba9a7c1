"""denoising-diffusion-pytorch 2.x in the form ONNX Runtime runs fastest (``onnx_form``, fed
``onnx_time_rows``), as 1.x's (:mod:`.dd_pytorch_v1_onnx`) with RMSNorm and the memory slots; the
CUDA mapping is :mod:`.dd_pytorch_v2`, beside it.

- ``RmsBlock``: the norm's sum of squares as a 1x1 conv and its gain and the time scale/shift as
  one multiply-add;
- ``TokenLinearAttention`` and ``TokenAttention``: both attentions on the [B, H * W, C] token
  view;
- the downsamplings' pixel-unshuffle + 1x1 conv as one strided conv (``swap_stage_blocks``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.channel_norm import RMS_EPS
from ...models import dd_pytorch_v2 as ref
from ..modules import frozen, image_view, swap_stage_blocks, token_view


class RmsBlock(nn.Module):
    """``ref.Block`` for ONNX Runtime: the RMSNorm's sum of squares over the channels as a 1x1
    conv of x * x with one output channel (ONNX Runtime's blocked-layout conv, not a strided
    reduction), and its gain g * sqrt(C) and the time scale/shift as one multiply-add,
    ``x_hat * A + B`` with ``A = g * sqrt(C) * (1 + scale)`` and ``B = shift`` carried by the
    time rows (``onnx_time_rows``)."""

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
