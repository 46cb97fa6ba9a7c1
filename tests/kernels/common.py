"""Inputs and the tolerance rule shared by the kernel tests.

Tolerance, with ``err(a) = max|a - ref| / max|ref|`` against a float64 reference computed from
the very same (already rounded) inputs:

- float32: ``err(kernel) <= 1e-5``;
- float16 / bfloat16 (flash-attention's rule): ``err(kernel) <= 2 * err(torch) + 1e-5``, where
  ``torch`` is PyTorch's own computation of the reference in that dtype (the unfused sequence
  that the kernel replaces).
"""

from __future__ import annotations

import re

import pytest
import torch

from ddpm_fast.kernels import HAS_TRITON as HAS_TRITON  # re-exported for the test modules

from ..helpers import rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_TOLERANCE = 1e-5
HALF_FLOOR = 1e-5
HAS_CUDA = torch.cuda.is_available()


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def randn(
    shape,
    dtype: torch.dtype = torch.float32,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """Normal values with this mean and spread, made in float64 and rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype).to(device)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def poisoned(shape, like: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """An output filled with NaN, so that any element the kernel does not write shows."""
    out = torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return out.to(memory_format=torch.channels_last) if channels_last else out


def f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


def assert_matches(
    actual: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor | None = None
) -> float:
    """Check ``actual`` against the float64 ``reference`` by the rule above; return its error."""
    assert not torch.isnan(actual).any(), "the kernel left NaN (unwritten) elements"
    assert actual.shape == reference.shape
    err = rel_error(actual, reference)
    if actual.dtype == torch.float32:
        assert err <= FP32_TOLERANCE, f"float32 error {err:.3g} > {FP32_TOLERANCE}"
    else:
        assert baseline is not None and baseline.dtype == actual.dtype
        base = rel_error(baseline, reference)
        limit = 2 * base + HALF_FLOOR
        assert err <= limit, f"{actual.dtype} error {err:.3g} > 2 x torch's {base:.3g} + floor"
    return err


def bad_input(call, error: type[Exception], message: str):
    """A case for a bad-input test: ``call()`` raises ``error`` with ``message`` in its text."""
    return pytest.param(call, error, message, id=message)


def assert_raises(call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call()
