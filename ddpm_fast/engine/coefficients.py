"""The fused sampler step's coefficient table: one float32 row per chain step, in the column
order of ``ddpm_fast.samplers.rule.ROW`` (which the kernel reads by name), built from the
reference's float64 ``StepTables`` so that both paths use the same numbers."""

from __future__ import annotations

import torch

from ..samplers import ROW, StepTables


def coefficient_table(tables: StepTables, spec, objective: str) -> torch.Tensor:
    """[steps, len(ROW)] float32 on the CPU (``spec`` is unused: the tables say it all)."""
    rows = tables.rows(objective)
    return torch.stack([rows[name].to(torch.float64) for name in ROW], dim=1).float()
