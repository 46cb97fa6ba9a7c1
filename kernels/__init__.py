"""Triton kernels of ddpm-fast, installed as ``ddpm_fast.kernels``.

Each kernel file holds its ``@triton.jit`` kernel(s), a launcher that checks its inputs, and the
PyTorch reference of the same function. This package depends on torch and triton only, and
imports where triton is missing (the launchers then run their references).
"""

import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None
