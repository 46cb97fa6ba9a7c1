"""Benchmarks time compiled kernels: tests marked ``gpu`` skip with a reason where there is no
CUDA GPU (as tests/conftest.py does for the tests), unless ``DDPM_FAST_SUITE_DEVICE=cpu`` switches
them to the CPU (gpu_suite.sh's dry run)."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get("DDPM_FAST_SUITE_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks time compiled kernels); none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
