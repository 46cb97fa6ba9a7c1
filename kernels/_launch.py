"""What the kernel files share: the triton import, backend dispatch, input checks and launch
settings (block sizes, warps, how to split a long reduction).

Backends: ``"auto"`` (the default) runs the compiled Triton kernel on CUDA tensors and the PyTorch
reference on anything else; ``"triton"`` forces the kernel (on CPU tensors that needs the Triton
interpreter, ``TRITON_INTERPRET=1`` set before ``ddpm_fast.kernels`` is imported: that is how the
tests run it); ``"torch"`` forces the reference. A launcher's ``backend=None`` reads the
environment variable ``DDPM_FAST_KERNELS_BACKEND`` and falls back to ``"auto"``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import types
from typing import Optional

import torch

log = logging.getLogger("ddpm_fast.kernels")

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR = None
except ImportError as error:  # no triton wheel for this platform: the references run
    triton = None
    # Kernel signatures annotate with tl.constexpr, so the name must resolve at definition.
    tl = types.SimpleNamespace(constexpr=lambda value: value)
    _TRITON_IMPORT_ERROR = error

HAS_TRITON = triton is not None
BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "DDPM_FAST_KERNELS_BACKEND"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements of one register tile in the memory-bound kernels (group and channel norms).
TILE_ELEMENTS = 4096


def jit(fn):
    """``triton.jit`` where triton imports; the bare function (never launched) where it does not."""
    return triton.jit(fn) if HAS_TRITON else fn


@functools.cache
def _warn_no_triton() -> None:
    log.warning(
        "triton is not importable (%s); ddpm_fast.kernels runs its PyTorch references",
        _TRITON_IMPORT_ERROR,
    )


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was defined under the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return type(kernel).__name__ == "InterpretedFunction"


def use_triton(backend: str | None, x: torch.Tensor, kernel) -> bool:
    """Whether a launcher runs ``kernel`` (True) or its PyTorch reference (False) on ``x``."""
    backend = backend or os.environ.get(BACKEND_ENV) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if not HAS_TRITON:
        if backend == "triton":
            raise RuntimeError(
                f"backend='triton' but triton is not importable: {_TRITON_IMPORT_ERROR}"
            )
        _warn_no_triton()
        return False
    if backend == "auto":
        return x.is_cuda
    if not x.is_cuda and not is_interpreted(kernel):
        raise RuntimeError(
            f"backend='triton' on a {x.device.type} tensor needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before ddpm_fast.kernels is imported"
        )
    return True


# input checks


def check_input(name: str, x: torch.Tensor, ndims: tuple[int, ...]) -> None:
    """``x`` is a tensor of one of ``ndims`` dimensions in a dtype the kernels take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ndims:
        want = " or ".join(f"{n}-d" for n in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def check_param(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    """A parameter of ``x``'s op: same device, and ``x``'s dtype or float32."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")
    if t.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{name} must be {x.dtype} (the input's) or float32, got {t.dtype}")


def check_out(
    out: torch.Tensor, shape: tuple[int, ...], x: torch.Tensor, also: torch.dtype | None = None
) -> None:
    """``out`` has the result's shape and the input's dtype (or ``also``) and device."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    dtype_ok = out.dtype in (x.dtype, also)
    if tuple(out.shape) != tuple(shape) or not dtype_ok or out.device != x.device:
        raise ValueError(
            f"out must be {tuple(shape)} {x.dtype} on {x.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )


def check_residual(
    residual: torch.Tensor | None, residual_bias: torch.Tensor | None, x: torch.Tensor
) -> None:
    """A residual added to an op's output: x's shape (any layout), and an optional [C] bias
    that comes with it (a residual conv's, taken off that conv)."""
    if residual is None:
        if residual_bias is not None:
            raise ValueError("residual_bias needs a residual")
        return
    check_param("residual", residual, x)
    if residual.shape != x.shape:
        raise ValueError(f"residual must be {tuple(x.shape)} like x, got {tuple(residual.shape)}")
    if residual_bias is not None:
        per_channel("residual_bias", residual_bias, x, x.shape[1])


def add_residual(
    y: torch.Tensor, residual: torch.Tensor | None, residual_bias: torch.Tensor | None
) -> torch.Tensor:
    """The PyTorch form of a kernel's residual epilogue: ``y + residual (+ residual_bias)``."""
    if residual is None:
        return y
    y = y + residual.to(y.dtype)
    if residual_bias is not None:
        y = y + residual_bias.to(y.dtype).reshape(1, -1, *([1] * (y.dim() - 2)))
    return y


def per_channel(name: str, t: torch.Tensor, x: torch.Tensor, channels: int) -> torch.Tensor:
    """A per-channel parameter of shape [C] or [1, C, 1, 1], as a [C] view."""
    check_param(name, t, x)
    if tuple(t.shape) not in ((channels,), (1, channels, 1, 1)):
        raise ValueError(
            f"{name} must be [{channels}] or [1, {channels}, 1, 1], got {tuple(t.shape)}"
        )
    return t.reshape(channels)


def per_sample_channel(name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-(sample, channel) tensor of shape [N or 1, C] or [N or 1, C, 1, 1], as an [N, C]
    view (a batch of 1 broadcasts with stride 0)."""
    check_param(name, t, x)
    n, c = x.shape[:2]
    ok = t.dim() in (2, 4) and t.shape[0] in (1, n) and t.shape[1] == c
    if not ok or (t.dim() == 4 and tuple(t.shape[2:]) != (1, 1)):
        raise ValueError(
            f"{name} must be [{n}, {c}] or [{n}, {c}, 1, 1] for an input of {tuple(x.shape)}, "
            f"got {tuple(t.shape)}"
        )
    return t.reshape(t.shape[0], c).expand(n, c)


def spatial_strides(name: str, t: torch.Tensor) -> tuple[int, int, int]:
    """Strides (batch, channel, position) of an [N, C, H, W] or [N, C, L] tensor whose positions
    are one strided axis: NCHW contiguous, channels_last and their slices along N and C are."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1), t.stride(2)
    _, _, h, w = t.shape
    if h > 1 and w > 1 and t.stride(2) != w * t.stride(3):
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} has strides {t.stride()}: its H and W do not "
            "flatten to one axis; pass it contiguous or channels_last"
        )
    return t.stride(0), t.stride(1), t.stride(3) if w > 1 else t.stride(2)


def check_split(split: int | None) -> None:
    """A forced split is None (automatic) or a positive number of chunks."""
    if split is not None and (not isinstance(split, int) or split < 1):
        raise ValueError(f"split must be None or an int >= 1, got {split!r}")


# launch settings


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints."""
    return -(-a // b)


def num_warps(tile_elements: int) -> int:
    """Warps for a program whose register tile holds ``tile_elements`` values."""
    if tile_elements >= 8192:
        return 16
    if tile_elements >= 2048:
        return 8
    return 4


def tile_shape(rows: int, length: int, min_block: int = 2) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_LEN) powers of two: all ``rows`` in one tile, and as much of
    ``length`` as fits in :data:`TILE_ELEMENTS`."""
    block_rows = max(min_block, next_power_of_2(rows))
    budget = max(min_block, TILE_ELEMENTS // block_rows)
    return block_rows, max(min_block, min(next_power_of_2(length), budget))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter is serial)."""
    return _sm_count(device) if device.type == "cuda" else 1


MAX_SPLIT = 128


def plan_split(
    programs: int, length: int, block: int, sms: int, split: int | None = None
) -> tuple[int, int]:
    """(chunks, chunk_length): cut a reduction over ``length`` into chunks (multiples of
    ``block``) so that ``programs * chunks`` programs fill ``sms`` multiprocessors twice over.
    ``split`` asks for a number of chunks instead; both are capped by what ``length`` allows."""
    if split is None:
        target = 2 * sms
        split = 1 if programs >= target else cdiv(target, programs)
    check_split(split)
    split = min(split, MAX_SPLIT, cdiv(length, block))
    chunk = cdiv(cdiv(length, split), block) * block
    return cdiv(length, chunk), chunk


# CUDA's limits on a launch grid: 2**31 - 1 programs along x, 65535 along y and z.
MAX_GRID = (2**31 - 1, 65535, 65535)


def check_grid(grid: tuple[int, ...], what: str) -> tuple[int, ...]:
    """``grid`` itself, after checking that each of its dimensions is within CUDA's limits (put
    the axis that grows with the image along x)."""
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID, strict=False)):
        if size > limit:
            raise ValueError(
                f"{what} needs a launch grid of {tuple(grid)}: axis {axis} is over CUDA's limit "
                f"of {limit}"
            )
    return grid


def device_guard(x: torch.Tensor):
    """Make ``x``'s CUDA device current for a launch (a no-op elsewhere)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


@jit
def _probe():
    pass


# The interpreter (triton 3.x) casts fp32 to bf16 by truncation where GPUs round to nearest even;
# under it, the kernels round explicitly, so that CPU tests measure the numbers a GPU computes.
ROUND_BF16_EXPLICITLY = tl.constexpr(HAS_TRITON and is_interpreted(_probe))
# The interpreter's tl.dot on bf16 operands is wrong (numpy has no bf16); kernels then multiply the
# same bf16 values in fp32, whose products are exact: the sums a GPU's bf16 dot makes.
INTERPRETED = ROUND_BF16_EXPLICITLY


@jit
def cast_to(y, dtype: tl.constexpr):
    """``y`` (fp32) in ``dtype``, rounded to nearest even (also under the interpreter)."""
    if ROUND_BF16_EXPLICITLY and dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(dtype)


@jit
def program_offset(axis: tl.constexpr, stride):
    """``program_id(axis) * stride`` in int64: the offset of a program's sample, right past 2**31
    elements in all (int32 would wrap)."""
    return tl.program_id(axis).to(tl.int64) * stride


@jit
def silu(y):
    """y * sigmoid(y), with exp of -|y| only (no overflow for large |y|)."""
    e = tl.exp(-tl.abs(y))
    return y * tl.where(y >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


OPS_NAMESPACE = "ddpm_fast"  # torch.ops.ddpm_fast.<op>: each kernel file registers its own
# The custom ops' annotation of an optional tensor: torch 2.4's schema inference reads the typing
# form only (not Tensor | None).
OptionalTensor = Optional[torch.Tensor]  # noqa: UP045


def traced() -> bool:
    """Whether torch.compile or torch.export is tracing the caller: a launcher then calls its
    custom op (``torch.ops.ddpm_fast.<op>``, one op of their graph, its shapes from a fake
    implementation) instead of being traced into."""
    return torch.compiler.is_compiling()


def none_if_empty(value):
    """The launchers' None, which the custom ops' schemas spell as an empty string or 0."""
    return value or None


def write_outputs(y: torch.Tensor, out: torch.Tensor | None, also_out: torch.Tensor | None):
    """``y`` copied into the outputs a launcher was given (``out``, ``also_out``), where it was not
    computed in them: on the PyTorch path, and a custom op's result in a compiled graph."""
    if also_out is not None:
        also_out.copy_(y)
    return y if out is None else out.copy_(y)
