"""Reference networks, one module per family of checkpoints, and the registry that finds them.

A family is one module ``ddpm_fast/models/<family>.py`` (its reference network, in plain PyTorch)
plus one engine mapping ``ddpm_fast/engine/families/<family>.py`` (how that network maps onto the
shared fast modules). Shared code (checkpoints, folding, engine, exporter) only ever talks to a
family through the contract below; it never tests ``isinstance`` against a family's classes or
spells its module paths.

The module contract of ``ddpm_fast.models.<family>`` (see :class:`Family`):

``FAMILY``
    The family's name ("dd-pytorch-v1"), stored in every config and file ddpm-fast writes.
``UnetConfig``
    A dataclass: the network's constructor arguments. It has ``family`` (a non-init field equal to
    ``FAMILY``), ``channels``, ``self_condition``, ``num_classes`` (None, or the class count of a
    class-conditional network), the properties ``output_channels`` and
    ``downsample_factor``, and ``to_dict()`` / ``from_dict(d)`` that round-trip through JSON.
``Unet``
    The reference network, ``Unet(config)``, whose state_dict keys are the library's (so the
    library's files load with strict matching). Its forward is split in two, so that every
    consumer can precompute what depends on the timestep only:

    - ``time_conditioning(t [n]) -> {name: Tensor [n, d]}``: every quantity of the forward that
      depends on t alone (the time embedding through each block's own projection: a ResnetBlock's
      scale and shift, an added time bias, a per-sample output scale), float32, in module order;
    - ``forward_conditioned(x, cond, x_self_cond=None)``: the rest of the forward, given ``cond``
      (the same dict, rows for the batch, or a single row broadcast over it);
    - ``forward(x, t, x_self_cond=None)`` is
      ``forward_conditioned(x, time_conditioning(t), x_self_cond)``.

    ``network.config`` is its UnetConfig; ``network.channels`` and ``network.self_condition``.

    A class-conditional network (``num_classes`` set) takes ``class_labels`` [n] (int64):
    ``forward(x, t, x_self_cond=None, class_labels=None)`` and ``time_conditioning(t,
    class_labels)`` (rows per sample), and splits the conditioning for the engine, which
    tabulates the time part per chain step and gathers the label part per sample:
    ``embed_timesteps(t) -> [n, E]``, ``embed_labels(class_labels) -> [n, E]`` and
    ``conditioning_from_embedding(emb) -> {name: [n, d]}``, with ``time_conditioning(t, y) ==
    conditioning_from_embedding(embed_timesteps(t) + embed_labels(y))``.
``OPTIONS``
    The names of the network options a user may give (CLI/``load``) where the file cannot tell
    them; ``UNSTORED_DEFAULTS`` the values assumed for those when not given (``info`` lists them).
``matches(weights) -> bool``
    Whether a state_dict (after the file's wrapper is taken off: no ``model.`` prefix) is one of
    this family's networks. At most one family may match a state_dict; families whose files
    cannot be told apart by their weights alone say so through ``infer_config`` notes.
``remap_keys(weights) -> weights``
    The state_dict in this reference's key names (old names of the library renamed); the
    identity where there is nothing to rename.
``infer_config(weights, **options) -> UnetConfig``
    The config the weight shapes determine, ``options`` (names in ``OPTIONS``) settling the rest;
    ConfigError/CheckpointError naming the key or option when they do not fit.
``fold(network) -> None``
    Folds, in place (on a copy that the caller made), what is constant at inference into plain
    modules (e.g. weight-standardised convs into convs holding the standardised weight); the
    function computed is unchanged. A no-op where there is nothing to fold.
``HALF_PRECISION_FP32``
    A tuple of the module classes (norms) that a half-precision graph computes in float32 with
    the fp32 reference's epsilon.
``library_diffusion(weights, config, unet_options, options) -> (fields, notes)`` (optional)
    For a family whose files are bare state_dicts read with their library's own flags (ADM):
    the DiffusionConfig fields (schedule, objective, variance, chain defaults) from those flags
    (``unet_options``: the family's OPTIONS given) and the generic ``options``, and the notes
    that ``info`` shows (every assumed value). Absent: the denoising-diffusion-pytorch reading
    (schedule from the stored buffers, objective from the library version).
``gaussian_diffusion_refuses(config) -> str | None`` (optional; absent: never)
    Why the library's GaussianDiffusion would not hold this network (so a GaussianDiffusion
    state_dict or Trainer checkpoint holding it came from another class), or None. The loader
    refuses such a file with that reason.

How a file's wrapper is taken off (a GaussianDiffusion or Trainer checkpoint, ddpm-fast's own
safetensors) is :mod:`ddpm_fast.checkpoints`'; a folder format (diffusers' pipeline and UNet
folders, with their scheduler configs) is its own reader, :mod:`ddpm_fast.diffusers_folder`,
which hands the family the weights and the folder's ``config.json`` (``infer_config(weights,
unet_config=...)``).

The tests written once for every family (tests/test_families.py, tests/export/test_families.py)
take each family's tiny test networks from tests/families.py; a registered family without them,
or without an engine mapping, fails ``test_every_family_has_test_networks_and_an_engine_mapping``.

Engine side, ``ddpm_fast.engine.families.<family>`` has ``build(folded, slices, fuse)
-> nn.Module``: the fast network, built from the folded reference and the column range
``slices[name] = (start, width)`` of each conditioning in the engine's per-step time row; its
forward is ``(x, time_row [1, D], x_self_cond=None) -> output`` (see
:mod:`ddpm_fast.engine.network`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Protocol

import torch
from torch import nn

from ..errors import CheckpointError
from . import adm, dd_pytorch_v1, dd_pytorch_v2, diffusers_unet2d


class Family(Protocol):
    """The module contract of a family (documented above); a module satisfies it by having
    these names."""

    FAMILY: str
    UnetConfig: type
    Unet: type[nn.Module]
    OPTIONS: tuple[str, ...]
    UNSTORED_DEFAULTS: dict
    HALF_PRECISION_FP32: tuple[type[nn.Module], ...]

    def matches(self, weights: dict[str, torch.Tensor]) -> bool: ...
    def remap_keys(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def infer_config(self, weights: dict[str, torch.Tensor], **options): ...
    def fold(self, network: nn.Module) -> None: ...


FAMILIES: dict[str, ModuleType] = {
    m.FAMILY: m for m in (dd_pytorch_v1, dd_pytorch_v2, diffusers_unet2d, adm)
}


def register(module: ModuleType) -> None:
    """Add a family module to the registry (its ``FAMILY`` must be new)."""
    if module.FAMILY in FAMILIES and FAMILIES[module.FAMILY] is not module:
        raise ValueError(f"family {module.FAMILY!r} is registered twice")
    FAMILIES[module.FAMILY] = module


def family(name: str) -> ModuleType:
    """The family module named ``name``; CheckpointError for an unknown name."""
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(network: nn.Module) -> ModuleType:
    """The family of a reference network, by its config's ``family``."""
    config = getattr(network, "config", None)
    name = getattr(config, "family", None)
    if name not in FAMILIES:
        raise TypeError(
            f"{type(network).__name__} is not a reference network of a known family "
            f"({', '.join(FAMILIES)})"
        )
    return FAMILIES[name]


def detect(weights: dict[str, torch.Tensor], where: str) -> ModuleType:
    """The one family whose ``matches`` accepts ``weights``; CheckpointError (naming ``where``)
    when none or several do."""
    found = [m for m in FAMILIES.values() if m.matches(weights)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(
            f"{where}: its weights are not a network of any known family ({', '.join(FAMILIES)})"
        )
    names = ", ".join(m.FAMILY for m in found)
    raise CheckpointError(f"{where}: its weights fit several families ({names})")


__all__ = [
    "FAMILIES",
    "Family",
    "adm",
    "dd_pytorch_v1",
    "dd_pytorch_v2",
    "detect",
    "diffusers_unet2d",
    "family",
    "family_of",
    "register",
]
