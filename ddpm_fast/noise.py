"""The Philox noise stream in PyTorch: the torch front-end of :mod:`ddpm_fast.noise_stream`.

Noise element e of sample i at chain step s (0 = x_T) is Triton's ``tl.randn(key, offset)`` with
key = (i << 32) | seed and offset = s * (C * H * W) + e (the stream, its rounds and Box-Muller
are written once in ``noise_stream``). Here the 32-bit words are int64 tensors: products are
split into 16-bit halves so that no intermediate overflows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import noise_stream as stream
from .noise_stream import MASK32
from .options import check_seed

_HALF = 0xFFFF


class TorchOps:
    """:class:`~ddpm_fast.noise_stream.ArrayOps` for uint32 words held in int64 tensors."""

    @staticmethod
    def mulhilo(a: int, x):
        """(hi, lo) of ``a * x`` from 16-bit halves of ``a`` (a tensor, or a Python int where the
        word is the same for every element)."""
        a_hi, a_lo = a >> 16, a & _HALF
        p_lo = x * a_lo  # < 2**48
        p_hi = x * a_hi  # < 2**48
        hi = (p_hi + (p_lo >> 16)) >> 16  # = (x * a) >> 32 exactly, so already < 2**32
        lo = (p_lo + ((p_hi & _HALF) << 16)) & MASK32
        return hi, lo

    @staticmethod
    def uniform(words: torch.Tensor) -> torch.Tensor:
        """For a word w >= 2**31, ~(w - 2**32) = w ^ (2**32 - 1). The scale is a Python float:
        PyTorch rounds it to float32 and multiplies in float32, as Triton does, with no device
        tensor made for it."""
        folded = torch.where(words >= 2**31, words ^ MASK32, words)
        return folded.to(torch.float32) * stream.UNIFORM_SCALE

    @staticmethod
    def clamp_min(x: torch.Tensor, low: float) -> torch.Tensor:
        return x.clamp_min_(low)

    log = staticmethod(torch.Tensor.log_)
    sqrt = staticmethod(torch.Tensor.sqrt_)
    cos = staticmethod(torch.Tensor.cos_)


TORCH = TorchOps()


def philox4x32(c0, c1, c2, c3, k0, k1, n_rounds: int = stream.N_ROUNDS) -> tuple:
    """Philox4x32 on uint32 words held in int64 tensors that broadcast together (or Python
    ints)."""
    return stream.philox4x32(c0, c1, c2, c3, k0, k1, TORCH, n_rounds)


def randint4x(seed: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x(seed, offset)`` for a 64-bit seed and 32-bit offsets (int64 tensors that
    broadcast together); returns four tensors of uint32 words in int64."""
    return stream.randint4x(seed, offset, TORCH)


def uint_to_uniform_float(x: torch.Tensor) -> torch.Tensor:
    """Triton's map of a uint32 word (in int64) to a float32 in [0, 1)."""
    return TORCH.uniform(x)


def triton_randn(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``tl.randn(seed, offset)``: float32 standard normals, one per offset."""
    return stream.triton_randn(seed, offset, TORCH)


def keyed_noise(
    seed: int,
    sample_indices: Sequence[int],
    step: int,
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Noise of shape [len(sample_indices), *shape] for chain step ``step`` (0 = x_T)."""
    noise = keyed_noise_steps(seed, sample_indices, step, 1, shape, device=device, dtype=dtype)
    return noise.view(len(sample_indices), *shape)


def keyed_noise_steps(
    seed: int,
    sample_indices: Sequence[int],
    first_step: int,
    count: int,
    shape: tuple[int, ...],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The noise of ``count`` consecutive chain steps from ``first_step`` in one draw, shape
    [len(sample_indices), count, *shape]: entry [:, j] is ``keyed_noise`` of step
    ``first_step + j`` (the steps' counters are consecutive), for the per-call cost once."""
    numel = 1
    for s in shape:
        numel *= s
    seed, start, stop = stream.check_draw(seed, sample_indices, first_step, count, numel)
    indices = _sample_indices(sample_indices, device).view(-1, 1)
    offsets = torch.arange(start, stop, dtype=torch.int64, device=indices.device)
    noise = stream.keyed_normals(seed, indices, offsets.view(1, -1), TORCH)
    return noise.view(len(sample_indices), count, *shape).to(dtype)


def _sample_indices(
    sample_indices: Sequence[int], device: torch.device | str | None
) -> torch.Tensor:
    if isinstance(sample_indices, range):  # made on the device: no host-to-device copy
        r = sample_indices
        return torch.arange(r.start, r.stop, r.step, dtype=torch.int64, device=device)
    return torch.as_tensor(list(sample_indices), dtype=torch.int64, device=device)


def philox_keys(
    seed: int, sample_indices: Sequence[int], *, device: torch.device | str | None = None
) -> torch.Tensor:
    """The 64-bit Philox keys ``sample_index << 32 | seed`` as int64 (two's complement: the bits
    of indices >= 2**31 land in the sign), one per sample."""
    seed = check_seed(seed)
    return (_sample_indices(sample_indices, device) << 32) | seed
