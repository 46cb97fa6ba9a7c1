"""What is constant at inference, computed once: the same function with less work per forward.

- ``fold_weights``: a copy of a network whose weight-standardised convs are plain convs holding
  the standardised weight (the reference standardises every weight at every forward).
- ``time_conditioning``: the time embedding and every ResnetBlock's (scale, shift) for a list of
  timesteps, so that a sampler that knows its timesteps never runs the time MLPs again.

The engine and the ONNX exporter both start from these.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .models.dd_pytorch_v1 import ResnetBlock, Unet, WeightStandardizedConv2d


def standardized_conv(conv: WeightStandardizedConv2d) -> nn.Conv2d:
    """A plain conv with ``conv``'s weight standardised in float32 (the library's fp32 eps):
    a half-precision engine casts the fp32 reference's weights, it does not re-standardise
    with the library's looser half-precision eps."""
    folded = torch.nn.utils.skip_init(  # no random initialisation of what is overwritten
        nn.Conv2d,
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=torch.float32,
    )
    with torch.no_grad():
        folded.weight.copy_(conv.standardized_weight(torch.float32))
        if conv.bias is not None:
            folded.bias.copy_(conv.bias)
    return folded.to(conv.weight.dtype).requires_grad_(False)


def fold_weights(network: Unet) -> Unet:
    """A deep copy of ``network`` (in eval mode) with every WeightStandardizedConv2d replaced by
    :func:`standardized_conv`; ``network`` itself is left as it is."""
    folded = copy.deepcopy(network).eval().requires_grad_(False)
    for module in list(folded.modules()):
        for name, child in module.named_children():
            if isinstance(child, WeightStandardizedConv2d):
                setattr(module, name, standardized_conv(child))
    return folded


def resnet_blocks(network: Unet) -> list[tuple[str, ResnetBlock]]:
    """Every ResnetBlock of ``network`` with a time MLP, by qualified name, in module order."""
    return [
        (name, m)
        for name, m in network.named_modules()
        if isinstance(m, ResnetBlock) and m.mlp is not None
    ]


@torch.no_grad()
def time_conditioning(network: Unet, timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
    """For timesteps [n]: {block name: [n, 2 * dim_out]} (scale then shift, as the block chunks
    them), computed in float32 as the reference computes them for a batch at time t."""
    device = next(network.parameters()).device
    t = torch.as_tensor(timesteps, device=device)
    emb = network.time_mlp(t)
    return {name: block.mlp(emb).float() for name, block in resnet_blocks(network)}
