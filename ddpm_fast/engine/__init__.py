"""The fast path: ``Engine(pipeline, dtype="fp32", cuda_graph=None)`` samples like the pipeline.

See :mod:`ddpm_fast.engine.engine` for the chain, :mod:`ddpm_fast.engine.network` for the
network's transformations and :mod:`ddpm_fast.engine.graph` for the CUDA graphs.

The names below are imported on first use (PEP 562): the submodules that need no torch
(``threads``, ``table_chain``) serve the CLI's warm start, which imports none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr

if TYPE_CHECKING:
    from .engine import DTYPES, Engine
    from .network import FastUnet

_LAZY = {"DTYPES": "engine", "Engine": "engine", "FastUnet": "network"}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["DTYPES", "Engine", "FastUnet"]
