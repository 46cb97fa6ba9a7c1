"""Triton kernels of ddpm-fast, installed as ``ddpm_fast.kernels``.

One file per op, each with its ``@triton.jit`` kernel(s), a launcher that checks its inputs, and
the PyTorch reference of the same function:

- ``group_norm``: ``group_norm`` / ``group_norm_reference`` (GroupNorm + pre-bias + affine +
  time scale/shift + SiLU);
- ``channel_norm``: ``channel_layer_norm`` / ``channel_rms_norm`` and their ``*_reference``;
- ``linear_attention``: ``linear_attention`` / ``linear_attention_reference``;
- ``sampler_step``: ``sampler_step`` / ``sampler_step_reference`` (one DDPM/DDIM update with its
  Philox noise drawn in the kernel).

Import them from their modules (``from ddpm_fast.kernels.group_norm import group_norm``). This
package depends on torch and triton only, and imports where triton is missing: the launchers
then run their references, and say so once through ``logging``.

Dispatch (every launcher's ``backend=``): CUDA tensors run the compiled kernels, other tensors the
references; ``backend="triton"`` forces the kernel (on CPU under ``TRITON_INTERPRET=1``, set
before this package is imported), ``backend="torch"`` the reference; ``backend=None`` reads
``DDPM_FAST_KERNELS_BACKEND``, else ``"auto"``.
"""

from ._launch import BACKEND_ENV, BACKENDS, HAS_TRITON

__all__ = ["BACKENDS", "BACKEND_ENV", "HAS_TRITON"]
