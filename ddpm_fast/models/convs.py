"""A conv built around weights computed elsewhere (folded, reshaped, stacked)."""

from __future__ import annotations

import torch
from torch import nn


def conv_holding(weight: torch.Tensor, bias: torch.Tensor | None, **options) -> nn.Conv2d:
    """An ``nn.Conv2d`` whose (frozen) parameters are copies of ``weight`` [out, in/groups, kh,
    kw] and ``bias``; ``options`` are Conv2d's (stride, padding, dilation, groups). It is built
    on the meta device, so no random initialisation runs: ``torch.nn.utils.skip_init`` would do
    the same, but its first call imports torch's symbolic-shape machinery (half a second of a
    cold start)."""
    out_channels, per_group, *kernel = weight.shape
    conv = nn.Conv2d(
        per_group * options.get("groups", 1),
        out_channels,
        tuple(kernel),
        bias=bias is not None,
        device="meta",
        **options,
    )
    conv.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
    return conv
