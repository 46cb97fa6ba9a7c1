"""FLOPs of one network forward, counted on the meta device (shapes only, no data)."""

from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def forward_flops(network: nn.Module, image_shape: tuple[int, ...], batch: int = 1) -> int:
    """FLOPs of ``network(x, t)`` for ``batch`` images of ``image_shape`` (``torch.utils.
    flop_counter``). The forward runs with meta copies of the weights, so ``network`` is never
    moved (compiled backends and captured graphs keep their parameters' addresses); where a
    forward cannot run on meta, a CPU deepcopy is counted."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = (batch, *image_shape)
    named = {**dict(network.named_parameters()), **dict(network.named_buffers())}
    try:
        tensors = {name: torch.empty_like(v, device="meta") for name, v in named.items()}
        x = torch.zeros(shape, device="meta")
        t = torch.zeros(batch, dtype=torch.long, device="meta")
        with FlopCounterMode(display=False) as counter:
            torch.func.functional_call(network, tensors, (x, t), _labels(network, batch, "meta"))
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel
        network = copy.deepcopy(network).cpu()
        with FlopCounterMode(display=False) as counter:
            network(
                torch.zeros(shape), torch.zeros(batch, dtype=torch.long),
                **_labels(network, batch, "cpu"),
            )  # fmt: skip
    return counter.get_total_flops()


def _labels(network: nn.Module, batch: int, device: str) -> dict:
    """A class-conditional network's label argument (class 0 for every image), else none."""
    if getattr(network.config, "num_classes", None) is None:
        return {}
    return {"class_labels": torch.zeros(batch, dtype=torch.long, device=device)}
