"""denoising-diffusion-pytorch 1.x in the form ONNX Runtime runs fastest: the engine's CPU
executor (:mod:`ddpm_fast.engine.onnx_executor`) traces its cached file from the folded reference
with these blocks swapped in (``onnx_form``), fed the time rows ``onnx_time_rows`` makes. The same
function as the reference, in other ops; the CUDA mapping is :mod:`.dd_pytorch_v1`, beside it.

- ``AffineBlock``: the norm's affine and the time scale/shift as one multiply-add;
- ``TokenLinearAttention`` and ``TokenAttention``: the attention blocks on the [B, H * W, C]
  token view;
- the downsamplings' pixel-unshuffle + 1x1 conv as one strided conv (``swap_stage_blocks``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...models import dd_pytorch_v1 as ref
from ..modules import frozen, image_view, swap_stage_blocks, token_view


class AffineBlock(nn.Module):
    """``ref.Block`` for ONNX Runtime: GroupNorm's affine and the time scale/shift as one
    per-channel multiply-add, ``(x * w + b) * (1 + scale) + shift = x * A + B``. The time rows
    carry ``A = w * (1 + scale)`` and ``B = b * (1 + scale) + shift`` (``onnx_time_rows``, made
    once per chain): two passes over the feature map and six small ops per block fewer."""

    def __init__(self, block: ref.Block):
        super().__init__()
        self.proj = block.proj
        self.groups, self.eps = block.norm.num_groups, block.norm.eps
        self.weight = frozen(block.norm.weight.reshape(1, -1, 1, 1))
        self.bias = frozen(block.norm.bias.reshape(1, -1, 1, 1))

    def forward(self, x, scale_shift=None):
        """``scale_shift``: (A, B) of ``onnx_time_rows``, or None (the norm's own affine)."""
        a, b = (self.weight, self.bias) if scale_shift is None else scale_shift
        return F.silu(F.group_norm(self.proj(x), self.groups, None, None, self.eps) * a + b)


def onnx_time_rows(
    reference: ref.Unet, conditioning: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The time rows ``onnx_form``'s network reads: each ResnetBlock's (scale, shift) rows
    [n, 2C] of ``reference.time_conditioning`` as its ``AffineBlock``'s (A, B)."""
    rows = {}
    for name, row in conditioning.items():
        norm = reference.get_submodule(name).block1.norm
        scale, shift = row.float().chunk(2, dim=1)
        weight, bias = norm.weight.detach().float(), norm.bias.detach().float()
        rows[name] = torch.cat((weight * (1 + scale), bias * (1 + scale) + shift), dim=1)
    return rows


class TokenLinearAttention(nn.Module):
    """``Residual(PreNorm(LayerNorm, LinearAttention))`` on the [B, N, C] token view (N = H * W):
    the same function in the ops ONNX Runtime runs fastest.

    - Both channel LayerNorms are one fused LayerNormalization each (the reference's form
      traces to eight ops over the channel axis); the PreNorm gain is folded into the
      projections.
    - q is projected onto the tokens ([B, N, h * d], its softmax over d on the last axis), k and
      v onto the channels ([B, h, d, N], k's softmax over N on the last axis): no transposes
      but the view's two.
    - The output contraction and to_out's 1x1 conv are one product: ``q @ M`` with
      ``M[h * d, C] = context @ W_out`` (per head), made per step from the d x d contexts;
      both scales (q's and v's 1 / N) are folded into W_out."""

    def __init__(self, residual: ref.Residual):
        super().__init__()
        attention = residual.fn.fn
        qkv, hidden = _take_projection(self, residual)
        self.q = frozen(qkv[:hidden].t())  # [C, h * d]
        self.kv = frozen(qkv[hidden:])  # [2 * h * d, C]
        out_conv, out_norm = attention.to_out
        out = out_conv.weight[:, :, 0, 0].t() * attention.scale  # [h * e, C]
        self.out = frozen(out.reshape(self.heads, self.dim_head, self.channels))
        self.out_bias = frozen(out_conv.bias)
        self.out_gain = frozen(out_norm.g.reshape(-1))

    def forward(self, x):
        b, c, h, d = x.shape[0], self.channels, self.heads, self.dim_head
        n = x.shape[2] * x.shape[3]
        normed = _normed_tokens(x, c)
        q = (normed @ self.q).reshape(b, n, h, d).softmax(dim=-1).reshape(b, n, h * d)
        k, v = (self.kv @ normed.transpose(1, 2)).reshape(b, 2, h, d, n).unbind(1)
        context = k.softmax(dim=-1) @ v.transpose(-1, -2)  # [B, h, d, e]
        m = (context @ (self.out * (1.0 / n))).reshape(b, h * d, c)  # v's 1 / N, folded
        eps = ref.dtype_eps(x.dtype)
        return _add_to_image(F.layer_norm(q @ m + self.out_bias, (c,), self.out_gain, None, eps), x)


class TokenAttention(nn.Module):
    """``Residual(PreNorm(LayerNorm, Attention))``, the middle's full attention, on the token view
    for ONNX Runtime: one fused LayerNormalization, the PreNorm gain and q's scale folded into the
    projection, softmax along the last axis, MatMuls instead of Einsums."""

    def __init__(self, residual: ref.Residual):
        super().__init__()
        attention = residual.fn.fn
        qkv, hidden = _take_projection(self, residual)
        qkv = torch.cat((qkv[:hidden] * attention.scale, qkv[hidden:]))
        self.qkv = frozen(qkv.t())  # [C, 3 * h * d]
        self.out = frozen(attention.to_out.weight[:, :, 0, 0].t())  # [h * d, C]
        self.out_bias = frozen(attention.to_out.bias)

    def forward(self, x):
        b, h, d = x.shape[0], self.heads, self.dim_head
        n = x.shape[2] * x.shape[3]
        qkv = _normed_tokens(x, self.channels) @ self.qkv
        q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, N, d]
        out = (q @ k.transpose(-1, -2)).softmax(dim=-1) @ v  # [B, h, N, d]
        return _add_to_image(out.transpose(1, 2).reshape(b, n, h * d) @ self.out + self.out_bias, x)


def _take_projection(block: nn.Module, residual: ref.Residual) -> tuple[torch.Tensor, int]:
    """Set ``block``'s heads, channels and dim_head from ``Residual(PreNorm(LayerNorm,
    attention))``; return its qkv projection [3 * h * d, C] with the LayerNorm's gain folded in
    (it scales the channels the projection sums: (W * g) x = W (g x)), and h * d."""
    attention = residual.fn.fn
    qkv = attention.to_qkv.weight[:, :, 0, 0] * residual.fn.norm.g.reshape(1, -1)
    hidden = qkv.shape[0] // 3
    block.heads, block.channels = attention.heads, qkv.shape[1]
    block.dim_head = hidden // attention.heads
    return qkv, hidden


def _normed_tokens(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The channel LayerNorm (no gain) of x [B, C, H, W] on its token view [B, H * W, C]."""
    return F.layer_norm(token_view(x, channels), (channels,), None, None, ref.dtype_eps(x.dtype))


def _add_to_image(tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``tokens`` [B, H * W, C] back on x's layout, plus x (the residual)."""
    return image_view(tokens, x) + x


def onnx_form(folded: ref.Unet) -> None:
    """Swap, in the folded network ``folded``, the blocks that ONNX Runtime runs faster in
    another form (the same function, given ``onnx_time_rows``' time rows): the blocks' norms,
    every stage's linear attention, the middle's attention, and the downsamplings'
    pixel-unshuffle + 1x1 conv as one strided conv (the unshuffle traces to a Transpose that took
    2% of the default model's step)."""
    for block in [m for m in folded.modules() if isinstance(m, ref.ResnetBlock)]:
        block.block1, block.block2 = AffineBlock(block.block1), AffineBlock(block.block2)
    swap_stage_blocks(folded, TokenLinearAttention, TokenAttention)
