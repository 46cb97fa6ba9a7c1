"""The fused sampler step's coefficient table: one float32 row per chain step, in the column
order of ``ddpm_fast.kernels.sampler_step.COEFFICIENTS``, built from the reference's float64
``StepTables`` so that both paths use the same numbers."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..kernels.sampler_step import COEFFICIENTS
from ..samplers import OBJECTIVES, SamplerSpec, StepTables


def coefficient_table(tables: StepTables, spec: SamplerSpec, objective: str) -> torch.Tensor:
    """[steps, len(COEFFICIENTS)] float32 on the CPU.

    x0 = a x - b out: pred_noise (sqrt(1/abar), sqrt(1/abar - 1)), pred_v (sqrt(abar),
    sqrt(1 - abar)), pred_x0 (0, -1: x0 = out exactly). ``noise_on`` is 1 where the reference
    adds noise (``StepTables.adds_noise``)."""
    n = len(tables)
    if objective == "pred_noise":
        a, b = tables.x0_from_xt, tables.x0_from_eps
    elif objective == "pred_v":
        a, b = tables.x0_from_xt_v, tables.x0_from_v
    elif objective == "pred_x0":
        a, b = torch.zeros(n, dtype=torch.float64), -torch.ones(n, dtype=torch.float64)
    else:
        raise ConfigError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    noise_on = torch.tensor([float(tables.adds_noise(k, spec)) for k in range(n)])
    # Where the reference skips the eps term (c_eps == 0) the kernel adds 0 * eps: the same.
    columns = {
        "a": a,
        "b": b,
        "x0_from_xt": tables.x0_from_xt,
        "x0_from_eps": tables.x0_from_eps,
        "c_x0": tables.c_x0,
        "c_xt": tables.c_xt,
        "c_eps": tables.c_eps,
        "sigma": tables.sigma,
        "log_var_min": tables.log_var_min,
        "log_var_max": tables.log_var_max,
        "noise_on": noise_on,
    }
    return torch.stack([columns[name].to(torch.float64) for name in COEFFICIENTS], dim=1).float()
