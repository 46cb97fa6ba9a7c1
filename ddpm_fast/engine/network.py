"""The engine's U-Net: a family's reference network with its weights folded, its time
conditioning precomputed for the chain's timesteps, and its modules swapped for the fused kernels.
``FastUnet(reference, timesteps)(x, step)`` computes ``reference(x, timesteps[step])``; ``step``
is an int64 device tensor, so the forward needs no host value and captures in a CUDA graph.

Shared here: the folding and the one table of every block's time conditioning at every chain
timestep (``[steps, D]``, one gather a step for the whole network). A class-conditional network's
conditioning depends on the label through a nonlinearity (the libraries add the label embedding
to the time embedding before each block's SiLU and projection), so it cannot be tabulated per
timestep: its chain holds the time embedding of every timestep [steps, E] and the label
embedding of every class [K, E], and each step gathers the two, adds them and runs the blocks'
projections (``conditioning_from_embedding`` of the folded reference): rows per sample [B, D],
still with no host value (the labels are a device tensor). How a family's modules map
onto the shared fast modules (:mod:`ddpm_fast.engine.modules`) is its own file under
:mod:`ddpm_fast.engine.families`.

Half precision: convolutions, matmuls and activations in the engine's dtype but the last conv
(marked ``keeps_fp32`` by the family: the output the sampler amplifies); the norms' statistics
in fp32 (the kernels'); the epsilons are the fp32 reference's, since fp32 is the truth.
"""

from __future__ import annotations

import torch
from torch import nn

from ..folding import (
    class_embeddings,
    conditioning_rows,
    fold_weights,
    time_conditioning,
    time_embeddings,
)
from ..kernels.group_norm import runs_kernel
from ..models import family_of
from .families import mapping


class FastUnet(nn.Module):
    """The engine's network for one chain: ``forward(x, step, x_self_cond=None)`` equals
    ``reference(x, timesteps[step], x_self_cond)``.

    ``fuse``: the kernels' form (default: where the kernels run for tensors on ``timesteps``'
    device): convolution biases, residual sums and skip concatenations go into the fused
    kernels around them, and an attention's norms and 1x1 convs into projection kernels, each
    family as far as its mapping says (see :mod:`ddpm_fast.engine.modules`). The same sums, in
    fewer launches; on the PyTorch path (the CPU) the unfused form is as fast."""

    def __init__(self, reference: nn.Module, timesteps: torch.Tensor, fuse: bool | None = None):
        super().__init__()
        family = family_of(reference)
        fast = mapping(family.FAMILY)
        self.config = reference.config
        self.self_condition = reference.self_condition
        self.channels = reference.channels
        if fuse is None:
            fuse = runs_kernel(torch.empty(0, device=timesteps.device))
        folded = fold_weights(reference)
        self.class_conditional = reference.config.num_classes is not None
        # A class-conditional network's tables give only the layout (names and widths).
        tables = time_conditioning(
            reference, timesteps[:1] if self.class_conditional else timesteps
        )
        hook = getattr(fast, "time_tables", None)
        if self.class_conditional:  # the hook's constants, added to every step's rows
            zero = {name: torch.zeros_like(t) for name, t in tables.items()}
            offsets = hook(folded, zero) if hook else zero
            self.register_buffer("row_offset", torch.cat(list(offsets.values()), dim=1))
        elif hook:
            tables = hook(folded, tables)
        slices, start = {}, 0
        for name, table in tables.items():
            slices[name], start = (start, table.shape[1]), start + table.shape[1]
        if self.class_conditional:
            self.register_buffer("time_table", time_embeddings(reference, timesteps))
            self.register_buffer("label_table", class_embeddings(reference))
            self.conditioner = folded  # its projections run per step; build keeps their weights
        else:
            # Every block's conditioning side by side: [steps, sum of widths].
            table = torch.cat(list(tables.values()), dim=1).contiguous()
            self.register_buffer("time_table", table)
        self.body = fast.build(folded, slices, fuse)
        self.eval().requires_grad_(False)

    def time_rows(self, step: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """Every block's conditioning at chain step ``step``: [1, D], or [B, D] per label."""
        if not self.class_conditional:
            return self.time_table.index_select(0, step)  # [1, D], on the device
        emb = self.time_table.index_select(0, step) + self.label_table.index_select(0, class_labels)
        return conditioning_rows(self.conditioner, emb) + self.row_offset

    def forward(self, x, step, x_self_cond=None, class_labels=None):
        return self.body(x, self.time_rows(step, class_labels), x_self_cond)


def cast_convolutions(network: torch.nn.Module, dtype: torch.dtype) -> None:
    """Convolutions (weights and biases) in ``dtype``, but those marked ``keeps_fp32`` (the
    network's last); norms and time tables stay fp32, which the kernels take as they are and
    keep the statistics' precision."""
    for module in network.modules():
        convolution = isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
        if convolution and not getattr(module, "keeps_fp32", False):
            module.to(dtype)
