"""What is constant at inference, computed once: the same function with less work per forward.

- ``fold_weights``: a copy of a network with what its family folds made plain (1.x: its
  weight-standardised convs become plain convs holding the standardised weight, which the
  reference recomputes at every forward);
- ``time_conditioning``: every quantity of the forward that depends on the timestep alone (each
  block's time projection) for a list of timesteps, so that a sampler that knows its timesteps
  never runs the time MLPs again; for a class-conditional network, ``time_embeddings`` and
  ``class_embeddings``, the two parts its conditioning is made from.

Both ask the network's family (``ddpm_fast.models``); the engine and the ONNX exporter start
from them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .models import family_of


def fold_weights(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` (in eval mode) with its family's ``fold`` applied; ``network``
    itself is left as it is."""
    family = family_of(network)
    folded = copy.deepcopy(network).eval().requires_grad_(False)
    family.fold(folded)
    return folded


@torch.no_grad()
def time_conditioning(
    network: nn.Module, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """For timesteps [n]: {name: [n, d]}, the network's ``time_conditioning`` (float32, computed
    as the reference computes it for a batch at time t); ``class_labels`` [n] for a
    class-conditional network (ignored for others)."""
    family_of(network)  # a TypeError for anything but a registered family's network
    device = next(network.parameters()).device
    t = torch.as_tensor(timesteps, device=device)
    labels = {}
    if network.config.num_classes is not None:  # class 0 where none are given (a layout)
        given = torch.zeros(len(t), dtype=torch.long) if class_labels is None else class_labels
        labels = {"class_labels": torch.as_tensor(given, device=device)}
    return {name: c.float() for name, c in network.time_conditioning(t, **labels).items()}


@torch.no_grad()
def time_embeddings(network: nn.Module, timesteps: torch.Tensor) -> torch.Tensor:
    """A class-conditional network's time embedding at each of ``timesteps``: [n, E] float32."""
    device = next(network.parameters()).device
    return network.embed_timesteps(torch.as_tensor(timesteps, device=device)).float().contiguous()


def conditioning_rows(network: nn.Module, emb: torch.Tensor) -> torch.Tensor:
    """A class-conditional network's conditioning from its embedding ``emb`` [B, E] (time plus
    label): every block's projection side by side, [B, D] in ``time_conditioning``'s order."""
    return torch.cat(list(network.conditioning_from_embedding(emb).values()), dim=1)


@torch.no_grad()
def class_embeddings(network: nn.Module) -> torch.Tensor:
    """A class-conditional network's label embedding of every class: [K, E] float32."""
    device = next(network.parameters()).device
    labels = torch.arange(network.config.num_classes, device=device)
    return network.embed_labels(labels).float().contiguous()
