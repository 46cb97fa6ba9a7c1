"""Test set-up: Triton kernels run under the interpreter where there is no GPU, and tests marked
``gpu`` skip there with a reason."""

import os
import tempfile

import pytest
import torch

# The engine's measured CPU convolution choices go to a folder of this run, not the user's cache.
os.environ.setdefault("DDPM_FAST_CACHE_DIR", tempfile.mkdtemp(prefix="ddpm-fast-cache-"))
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before any @triton.jit function is defined (at import of ddpm_fast.kernels.*).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
