"""Test set-up: Triton kernels run under the interpreter where there is no GPU, tests marked
``gpu`` skip there with a reason, and one known bug of old Triton interpreters skips the tests it
breaks (and nothing else)."""

import os
import tempfile
from importlib import metadata

import pytest
import torch

# The engine's measured CPU convolution choices go to a folder of this run, not the user's cache.
os.environ.setdefault("DDPM_FAST_CACHE_DIR", tempfile.mkdtemp(prefix="ddpm-fast-cache-"))
# The engine's CPU tests exercise its own PyTorch step (and the Triton kernels, interpreted);
# tests/test_onnx_executor.py runs the ONNX Runtime executor, the default where it is installed.
os.environ.setdefault("DDPM_FAST_CPU_EXECUTOR", "torch")
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


def _release(dist: str) -> tuple[int, ...]:
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ()
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())


# Triton's interpreter before 3.7 turns a scalar tensor into a Python int with
# ``int(handle.data)`` on a 1-element 1-d array, which NumPy 2.4 no longer allows (deprecated since
# NumPy 1.25): every loop whose bound is a kernel argument or a program id then fails, in any
# kernel (triton-lang/triton#9171, fixed by ``.squeeze()`` in 3.7). The kernels are right: the same
# loops compile for sm_80/sm_90 with that Triton, and run interpreted with NumPy < 2.4 or Triton
# >= 3.7. Only tests that hit exactly this error skip; on a GPU nothing is interpreted.
INTERPRETER_INDEX_BUG = (
    os.environ.get("TRITON_INTERPRET") == "1"
    and () < _release("triton") < (3, 7)
    and _release("numpy") >= (2, 4)
)
INTERPRETER_INDEX_ERROR = "only 0-dimensional arrays can be converted to Python scalars"
INTERPRETER_INDEX_SKIP = (
    "the Triton < 3.7 interpreter cannot take a loop bound from a tensor under NumPy >= 2.4 "
    "(triton-lang/triton#9171); the kernel compiles for the GPU"
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    error = call.excinfo
    hit = error is not None and INTERPRETER_INDEX_ERROR in str(error.value)
    if INTERPRETER_INDEX_BUG and report.when == "call" and hit:
        report.outcome = "skipped"
        report.longrepr = (
            str(item.path),
            item.location[1],
            f"Skipped: {INTERPRETER_INDEX_SKIP}",
        )
