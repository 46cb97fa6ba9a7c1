"""The fast modules every family's engine mapping is built from (``engine/families/``).

- ``GroupNormAct``: GroupNorm (+ a pre-bias added first) + ``x * (1 + scale) + shift`` + SiLU in
  one launch of the group_norm kernel (PyTorch where it does not run);
- ``channel_layer_norm`` / ``linear_attention``: the kernels, re-exported;
- ``sdpa``: full attention of a [B, 3 * heads * d, H, W] qkv map through
  ``F.scaled_dot_product_attention``;
- ``TimeSlice``: columns ``[start, start + width)`` of the engine's per-step time row;
- ``Upsample``: nearest-neighbour x2 + conv;
- ``frozen``, ``token_view``, ``image_view``: what the families' ONNX Runtime forms
  (``onnx_form``) share: weights as frozen parameters, and a [B, C, H, W] map as [B, H * W, C]
  tokens and back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.channel_norm import channel_layer_norm
from ..kernels.group_norm import group_norm
from ..kernels.linear_attention import linear_attention

__all__ = [
    "GroupNormAct",
    "TimeSlice",
    "Upsample",
    "channel_layer_norm",
    "frozen",
    "image_view",
    "linear_attention",
    "sdpa",
    "token_view",
]


class GroupNormAct(nn.Module):
    """``act(GroupNorm(x + pre_bias) * (1 + scale) + shift)`` from a reference ``nn.GroupNorm``;
    ``act`` "silu" or None. ``pre_bias`` [1, C] (a conv's bias moved here, or a per-step time
    bias passed at the call) is added before the statistics, as the kernel does."""

    def __init__(self, norm: nn.GroupNorm, act: str | None = "silu", pre_bias=None):
        super().__init__()
        self.groups = norm.num_groups
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias
        self.act = act
        self.pre_bias = None
        if pre_bias is not None:
            self.pre_bias = nn.Parameter(pre_bias.detach().reshape(1, -1).clone(), False)

    def forward(self, x, scale=None, shift=None, pre_bias=None):
        if pre_bias is None:
            pre_bias = self.pre_bias
        return group_norm(
            x, self.groups, self.weight, self.bias, pre_bias=pre_bias,
            scale=scale, shift=shift, eps=self.eps, act=self.act,
        )  # fmt: skip


def take_conv_bias(conv: nn.Conv2d) -> torch.Tensor | None:
    """``conv``'s bias, removed from it (the next fused norm adds it as its pre-bias)."""
    bias = conv.bias
    if bias is None:
        return None
    conv.bias = None
    return bias.detach()


def sdpa(qkv: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor:
    """Full attention of ``qkv`` [B, 3 * heads * d, H, W] (q, k, v blocks, each heads x d, head
    major) -> [B, heads * d, H, W]. ``scale`` None: SDPA's default, d ** -0.5."""
    b, _, h, w = qkv.shape
    # [B, 3 * heads * d, H, W] -> 3 x [B, heads, H * W, d]. In NCHW the d axis is strided
    # (H * W apart), which sends SDPA to its math path: one copy makes each head's [H * W, d]
    # contiguous (channels_last already is).
    qkv = qkv.reshape(b, 3, heads, -1, h * w).transpose(-1, -2)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q, k, v = qkv.unbind(1)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(-1, -2).reshape(b, -1, h, w)


class TimeSlice(nn.Module):
    """Columns ``[start, start + width)`` of the time row [1, D] (a view)."""

    def __init__(self, start: int, width: int):
        super().__init__()
        self.start, self.width = start, width

    def forward(self, time_row: torch.Tensor) -> torch.Tensor:
        return time_row[:, self.start : self.start + self.width]


class Upsample(nn.Module):
    """Nearest-neighbour x2, then ``conv``."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """A contiguous copy of ``tensor`` as a parameter without grad."""
    return nn.Parameter(tensor.detach().contiguous().clone(), requires_grad=False)


def token_view(x: torch.Tensor, channels: int) -> torch.Tensor:
    """x [B, C, H, W] as tokens [B, H * W, C] (``channels`` a Python int: traced graphs keep
    the norms' shapes constant)."""
    return x.reshape(x.shape[0], channels, -1).transpose(1, 2)


def image_view(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Tokens [B, H * W, C] back on the [B, C, H, W] layout of ``like``."""
    return tokens.transpose(1, 2).reshape(like.shape)
