"""Convolutions on the CPU: PyTorch's ``F.conv2d`` or oneDNN with the weight packed ahead of time,
whichever is faster for the input shape, measured once at the first call with that shape.

``F.conv2d`` re-lays the weight out for oneDNN at every call, or takes its native path for small
inputs (batch 1 at the U-Net's 4 x 4 and 8 x 8 stages); a weight packed once for the shape runs
those up to 3x faster. At large spatial sizes with few channels the packed path can be slower,
hence the measurement rather than a rule. Both compute the same convolution (the summation order
differs: a few fp32 ulps). Anything but a float32 CPU input runs ``F.conv2d``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("ddpm_fast.engine")

TRIALS = 3  # calls timed per candidate; the minimum counts


def _packed_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


def _fastest(candidates: dict[str, Callable], x: torch.Tensor) -> str:
    best, best_time = None, float("inf")
    for name, fn in candidates.items():
        fn(x)  # warm-up
        for _ in range(TRIALS):
            start = time.perf_counter()
            fn(x)
            elapsed = time.perf_counter() - start
            if elapsed < best_time:
                best, best_time = name, elapsed
    return best


class CpuConv2d(nn.Module):
    """``conv`` (an ``nn.Conv2d``) with a per-input-shape choice of implementation on the CPU."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self._plans: dict[tuple[int, ...], Callable] = {}

    def _packed(self, x: torch.Tensor) -> Callable:
        conv = self.conv
        args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        weight = torch.ops.mkldnn._reorder_convolution_weight(conv.weight, *args, list(x.shape))

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, conv.bias, *args, "none", [], ""
            )

        return run

    def _plan(self, x: torch.Tensor) -> Callable:
        plan = self.conv.forward
        if _packed_available():
            try:
                candidates = {"torch": self.conv.forward, "packed": self._packed(x)}
                plan = candidates[_fastest(candidates, x)]
            except RuntimeError as error:  # an op this torch build lacks: F.conv2d it is
                log.debug("no packed oneDNN convolution for %s: %s", tuple(x.shape), error)
        self._plans[tuple(x.shape)] = plan
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.conv.weight.requires_grad:
            return F.conv2d(
                x, self.conv.weight, self.conv.bias, self.conv.stride, self.conv.padding,
                self.conv.dilation, self.conv.groups,
            )  # fmt: skip
        plan = self._plans.get(tuple(x.shape))
        return (plan or self._plan(x))(x)


def use_cpu_convolutions(network: nn.Module) -> None:
    """Wrap every ``nn.Conv2d`` of ``network`` in :class:`CpuConv2d`, in place."""
    for module in list(network.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Conv2d:
                setattr(module, name, CpuConv2d(child))
