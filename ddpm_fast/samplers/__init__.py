"""The samplers: one module per sampler (ddpm, ddim, dpm_solver), each turning the schedule and a
``SamplerSpec`` into named per-step coefficient columns; ``rule`` holds the one update rule over
them, ``reference`` runs it in PyTorch (the truth every fast path is tested against).

Torch-free at import: the registry and SamplerSpec serve the CLI and OnnxSampler; the PyTorch
names load on first use.
"""

from __future__ import annotations

from ..lazy import lazy_getattr
from .registry import SAMPLERS, check_chain, sampler_module
from .rule import ROW, TABLE, Chain
from .spacing import SPACINGS

_LAZY = {
    "SamplerSpec": "spec",
    "StepTables": "reference",
    "NoiseFn": "reference",
    "chain_tables": "reference",
    "step_tables": "reference",
    "predict_x0": "reference",
    "denoise_step": "reference",
    "sample_loop": "reference",
    "OBJECTIVES": "reference",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


__all__ = ["ROW", "SAMPLERS", "SPACINGS", "TABLE", "Chain", "check_chain", "sampler_module", *_LAZY]
