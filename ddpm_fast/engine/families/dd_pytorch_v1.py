"""denoising-diffusion-pytorch 1.x onto the fast modules.

- ``FastBlock``: weight-standardised conv (folded) -> one fused GroupNorm + scale/shift + SiLU;
  where the GroupNorm kernel runs (CUDA), the conv's bias is the kernel's pre-bias instead of an
  add of its own after the conv;
- ``FastResnetBlock`` (:mod:`ddpm_fast.engine.modules`): its (scale, shift), a slice of the
  step's time row, for its two ``FastBlock``;
- ``FastLinearAttention``: PreNorm channel LayerNorm, 1x1 conv, the linear-attention kernel,
  1x1 conv and LayerNorm, plus the residual;
- ``FastAttention``: the middle's full attention through ``F.scaled_dot_product_attention``;
- ``Downsample``'s pixel-unshuffle + 1x1 conv as one 2x2 stride-2 conv (the same sums);
- the U-Net walk, ``StagedUnet``, which 2.x's mapping shares (:mod:`ddpm_fast.engine.modules`).

The ONNX Runtime form (``onnx_form``, ``onnx_time_rows``) is its own file beside this one,
:mod:`.dd_pytorch_v1_onnx`, named here so that the family's mapping has it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ...models import dd_pytorch_v1 as ref
from ..modules import (
    FastResnetBlock,
    GroupNormAct,
    StagedUnet,
    TimeSlice,
    channel_layer_norm,
    linear_attention,
    projection,
    sdpa,
    sdpa_heads,
    take_conv_bias,
)
from .dd_pytorch_v1_onnx import onnx_form, onnx_time_rows  # noqa: F401 (the mapping's)

# The fp32 reference's epsilon for its LayerNorms (the library's dtype_eps).
LAYER_NORM_EPS = ref.dtype_eps(torch.float32)


class FastBlock(nn.Module):
    """``ref.Block``: conv -> GroupNorm -> x * (1 + scale) + shift -> SiLU, the last three fused.

    ``fuse``: the conv runs without its bias, which the fused GroupNorm adds as its
    pre-bias (the same sum, one launch fewer where the kernel runs; on the PyTorch path the conv
    adds it for free)."""

    def __init__(self, block: ref.Block, fuse: bool = False):
        super().__init__()
        self.proj = block.proj  # already a plain conv holding the standardised weight
        pre_bias = take_conv_bias(self.proj) if fuse else None
        self.norm = GroupNormAct(block.norm, "silu", pre_bias)

    takes_edge_bias = True  # its GroupNorm kernel does (StagedUnet moves conv biases into it)

    @property
    def pre_bias(self):
        return self.norm.pre_bias

    def add_edge_bias(self, edge_bias: torch.Tensor) -> None:
        self.norm.add_edge_bias(edge_bias)

    def forward(self, x, scale=None, shift=None, **epilogue):
        return self.norm(self.proj(x), scale, shift, **epilogue)


def _layer_norm(x: torch.Tensor, norm: ref.LayerNorm) -> torch.Tensor:
    return channel_layer_norm(x, norm.g, eps=LAYER_NORM_EPS)


class FastLinearAttention(nn.Module):
    """``Residual(PreNorm(LayerNorm, LinearAttention))``. ``fuse``: the to_out conv's bias,
    the residual and the output's second copy (``also_out``) in the last LayerNorm's kernel."""

    def __init__(self, residual: ref.Residual, fuse: bool = False):
        super().__init__()
        prenorm = residual.fn
        attention = prenorm.fn
        self.norm = prenorm.norm
        self.heads = attention.heads
        self.scale = attention.scale
        self.to_qkv = attention.to_qkv
        self.to_out = attention.to_out[0]
        self.out_norm = attention.to_out[1]
        self.writes_out = fuse
        self.out_bias = take_conv_bias(self.to_out) if fuse else None

    def forward(self, x, out=None, also_out=None):
        h, w = x.shape[-2:]
        if not self.writes_out:
            qkv = self.to_qkv(_layer_norm(x, self.norm))
            y = linear_attention(qkv, self.heads, q_scale=self.scale, v_scale=1.0 / (h * w))
            return _layer_norm(self.to_out(y), self.out_norm) + x
        qkv = _normed_qkv(x, self.norm, self.to_qkv)
        y = linear_attention(qkv, self.heads, q_scale=self.scale, v_scale=1.0 / (h * w))
        return projection(
            y, self.to_out.weight, self.out_bias, norm_out="layer", g_out=self.out_norm.g,
            eps_out=LAYER_NORM_EPS, residual=x, out=torch.empty_like(x) if out is None else out,
            also_out=also_out,
        )  # fmt: skip


def _normed_qkv(x: torch.Tensor, norm: ref.LayerNorm, to_qkv: nn.Conv2d) -> torch.Tensor:
    """``to_qkv(LayerNorm(x))`` in one projection kernel, channels_last (each head's [H * W, d]
    contiguous in d, as scaled_dot_product_attention wants it)."""
    return projection(
        x, to_qkv.weight, to_qkv.bias, norm_in="layer", g_in=norm.g, eps_in=LAYER_NORM_EPS
    )


class FastAttention(nn.Module):
    """``Residual(PreNorm(LayerNorm, Attention))`` through scaled_dot_product_attention.
    ``fuse``: the norm and the qkv conv in one projection kernel, and the to_out conv with its
    bias and the residual in another, which reads SDPA's output in place."""

    def __init__(self, residual: ref.Residual, fuse: bool = False):
        super().__init__()
        prenorm = residual.fn
        attention = prenorm.fn
        self.norm = prenorm.norm
        self.heads = attention.heads
        self.scale = attention.scale
        self.to_qkv = attention.to_qkv
        self.to_out = attention.to_out
        self.fuse = fuse

    def forward(self, x):
        if not self.fuse:
            qkv = self.to_qkv(_layer_norm(x, self.norm))
            return self.to_out(sdpa(qkv, self.heads, self.scale)) + x
        heads = sdpa_heads(_normed_qkv(x, self.norm, self.to_qkv), self.heads, self.scale)
        return projection(
            heads, self.to_out.weight, self.to_out.bias, residual=x, x_heads=True,
            spatial=tuple(x.shape[2:]), out=torch.empty_like(x),
        )  # fmt: skip


class FastUnetV1(StagedUnet):
    """``forward(x, time_row, x_self_cond=None)`` equals the reference's forward at the
    timestep whose row of the time table ``time_row`` is."""

    def __init__(self, folded: ref.Unet, slices: dict[str, tuple[int, int]], fuse: bool):
        def resnet(name: str) -> FastResnetBlock:
            fast_block = partial(FastBlock, fuse=fuse)
            block = folded.get_submodule(name)
            return FastResnetBlock(block, TimeSlice(*slices[name]), fast_block, fuse)

        attention = partial(FastLinearAttention, fuse=fuse)
        mid_attention = partial(FastAttention, fuse=fuse)
        super().__init__(folded, resnet, attention, mid_attention, fuse)


def build(folded: ref.Unet, slices: dict[str, tuple[int, int]], fuse: bool) -> nn.Module:
    """The engine's network of a folded 1.x Unet (see ddpm_fast.models, the engine side)."""
    return FastUnetV1(folded, slices, fuse)
