"""The engine's U-Net: a family's reference network with its weights folded, its time
conditioning precomputed for the chain's timesteps, and its modules swapped for the fused kernels.
``FastUnet(reference, timesteps)(x, step)`` computes ``reference(x, timesteps[step])``; ``step``
is an int64 device tensor, so the forward needs no host value and captures in a CUDA graph.

Shared here: the folding and the one table of every block's time conditioning at every chain
timestep (``[steps, D]``, one gather a step for the whole network). How a family's modules map
onto the shared fast modules (:mod:`ddpm_fast.engine.modules`) is its own file under
:mod:`ddpm_fast.engine.families`.

Half precision: convolutions, matmuls and activations in the engine's dtype but the last conv
(marked ``keeps_fp32`` by the family: the output the sampler amplifies); the norms' statistics
in fp32 (the kernels'); the epsilons are the fp32 reference's, since fp32 is the truth.
"""

from __future__ import annotations

import torch
from torch import nn

from ..folding import fold_weights, time_conditioning
from ..kernels.group_norm import runs_kernel
from ..models import family_of
from .families import mapping


class FastUnet(nn.Module):
    """The engine's network for one chain: ``forward(x, step, x_self_cond=None)`` equals
    ``reference(x, timesteps[step], x_self_cond)``.

    ``bias_in_norm``: convolution biases that a fused GroupNorm follows go into it as its
    pre-bias (default: where its kernel runs for tensors on ``timesteps``' device)."""

    def __init__(
        self, reference: nn.Module, timesteps: torch.Tensor, bias_in_norm: bool | None = None
    ):
        super().__init__()
        family = family_of(reference)
        fast = mapping(family.FAMILY)
        self.config = reference.config
        self.self_condition = reference.self_condition
        self.channels = reference.channels
        if bias_in_norm is None:
            bias_in_norm = runs_kernel(torch.empty(0, device=timesteps.device))
        folded = fold_weights(reference)
        tables = time_conditioning(reference, timesteps)
        if hasattr(fast, "time_tables"):
            tables = fast.time_tables(folded, tables)
        # Every block's conditioning side by side: [steps, sum of widths].
        self.register_buffer("time_table", torch.cat(list(tables.values()), dim=1).contiguous())
        slices, start = {}, 0
        for name, table in tables.items():
            slices[name], start = (start, table.shape[1]), start + table.shape[1]
        self.body = fast.build(folded, slices, bias_in_norm)
        self.eval().requires_grad_(False)

    def forward(self, x, step, x_self_cond=None):
        t = self.time_table.index_select(0, step)  # [1, D], on the device
        return self.body(x, t, x_self_cond)
