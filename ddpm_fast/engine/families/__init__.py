"""Each family's mapping onto the shared fast modules, one module per family (see
ddpm_fast.models for the contract):

- ``build(folded, slices, fuse) -> nn.Module``, whose forward is
  ``(x, time_row [1, D], x_self_cond=None)``; ``slices[name] = (start, width)`` of each
  conditioning in the time row;
- optionally ``time_tables(folded, tables) -> tables``: the family's own change to the per-step
  conditioning tables before they are laid side by side (e.g. a conv bias added to the time bias
  that follows it), so that it costs nothing per step; it adds a constant row per block (the
  engine adds the same constants to a class-conditional network's per-step rows);
- optionally ``onnx_form(folded)``: swap in place the blocks of the folded network that ONNX
  Runtime runs faster in another form (the engine's CPU executor file is traced from it), and with
  it ``onnx_time_rows(reference, conditioning) -> conditioning`` where those blocks read their
  time rows in another form.

A family's ONNX Runtime form is its own file beside its mapping, ``<family>_onnx.py`` (the
CUDA-side fast modules and the ONNX Runtime forms of the same blocks are different code, read and
changed apart); the mapping names the two functions from it (one import line), so that
``mapping(family)`` is the one place the engine and the CPU executor ask. What several mappings
share is in :mod:`ddpm_fast.engine.modules`, never imported from another family's file.
"""

from __future__ import annotations

from types import ModuleType

from . import adm, dd_pytorch_v1, dd_pytorch_v2, diffusers_unet2d

MAPPINGS: dict[str, ModuleType] = {
    m.ref.FAMILY: m for m in (dd_pytorch_v1, dd_pytorch_v2, diffusers_unet2d, adm)
}


def mapping(family: str) -> ModuleType:
    """The engine mapping of ``family``; TypeError where the family has none."""
    if family not in MAPPINGS:
        raise TypeError(f"the engine has no mapping for the {family} family")
    return MAPPINGS[family]
