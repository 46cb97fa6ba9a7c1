"""Benchmarks time compiled kernels: tests marked ``gpu`` skip with a reason where there is no
CUDA GPU (as tests/conftest.py does for the tests), unless ``DDPM_FAST_SUITE_DEVICE=cpu`` switches
them to the CPU (gpu_suite.sh's dry run).

The kernel benchmarks run shape by shape rather than kernel by kernel (at one shape, batch and
dtype: each kernel against eager PyTorch, then each against torch.compile; then the next), so
that a run cut short by a time limit still has every kernel in its summary."""

import os

import pytest
import torch


def _interleaved(item) -> tuple:
    params = getattr(getattr(item, "callspec", None), "params", {})
    module = item.module
    if not hasattr(module, "SHAPES") or "shape" not in params:
        return (0,)
    return (
        1,
        module.SHAPES.index(params["shape"]),
        module.BATCHES.index(params["batch"]),
        params["dtype"],
        params["provider"] == "compile",  # its cold compiles are the slowest: last at a shape
        item.originalname,
        module.PROVIDERS.index(params["provider"]),
    )


def pytest_collection_modifyitems(config, items):
    items.sort(key=_interleaved)
    if torch.cuda.is_available() or os.environ.get("DDPM_FAST_SUITE_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks time compiled kernels); none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
