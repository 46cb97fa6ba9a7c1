"""ONNX export, verification and the ONNX Runtime sampler, installed as ``ddpm_fast.export``.

- :func:`export_onnx` writes the folded network (``what="unet"``) or one whole reverse step of a
  chain (``what="step"``), verified against the reference before it is renamed into place.
- :func:`verify_onnx` checks an existing file against a pipeline.
- :class:`OnnxSampler` runs the whole chain from a file with ONNX Runtime and NumPy only.

Names are imported on first use: ``from ddpm_fast.export import OnnxSampler`` imports neither
torch nor onnx (the exporter and the verifier need both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr

if TYPE_CHECKING:
    from .exporter import ExportResult, export_onnx
    from .format import OnnxFileError, OnnxModelInfo, VerificationError
    from .onnx_sampler import OnnxSampler, default_providers
    from .philox import keyed_noise
    from .verify import VerifyReport, verify_onnx

_LAZY = {
    "ExportResult": "exporter",
    "export_onnx": "exporter",
    "OnnxFileError": "format",
    "OnnxModelInfo": "format",
    "VerificationError": "format",
    "OnnxSampler": "onnx_sampler",
    "default_providers": "onnx_sampler",
    "keyed_noise": "philox",
    "VerifyReport": "verify",
    "verify_onnx": "verify",
}


__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ExportResult",
    "OnnxFileError",
    "OnnxModelInfo",
    "OnnxSampler",
    "VerificationError",
    "VerifyReport",
    "default_providers",
    "export_onnx",
    "keyed_noise",
    "verify_onnx",
]
