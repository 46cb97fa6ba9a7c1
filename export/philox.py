"""The Philox noise stream in NumPy, without torch: the NumPy front-end of
:mod:`ddpm_fast.noise_stream`, what ``OnnxSampler``, the engine's ONNX Runtime chains and the CLI's
warm start draw.

Noise element e of sample i at chain step s (0 = x_T) is Triton's ``tl.randn(key, offset)`` with
key = (i << 32) | seed and offset = s * (C * H * W) + e (the stream, its rounds and Box-Muller
are written once in ``noise_stream``). Here the 32-bit words are uint64 arrays, where the product
of two 32-bit words fits exactly; they equal ``ddpm_fast.noise``'s bit for bit (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import noise_stream as stream
from ..noise_stream import MASK32

# Re-exported only until warm_start and cli import it from options (after the merge).

NOISE_BLOCK_STEPS = 50
NOISE_BLOCK_VALUES = 2**22  # 16 MiB of float32 per draw

_SHIFT = np.uint64(32)
_MASK = np.uint64(MASK32)
_UNIFORM_SCALE = np.float32(stream.UNIFORM_SCALE)
_MIN_UNIFORM = np.float32(stream.MIN_UNIFORM)


class NumpyOps:
    """:class:`~ddpm_fast.noise_stream.ArrayOps` for uint32 words held in uint64 arrays."""

    @staticmethod
    def mulhilo(a: int, x):
        """(hi, lo) of ``a * x``: the product is < 2**64, exact in uint64 (or a Python int)."""
        if isinstance(x, int):
            p = a * x
            return p >> 32, p & MASK32
        p = x * np.uint64(a)
        return p >> _SHIFT, p & _MASK

    @staticmethod
    def uniform(words: np.ndarray) -> np.ndarray:
        signed = words.astype(np.uint32).view(np.int32)
        folded = np.where(signed < 0, ~signed, signed)
        return folded.astype(np.float32) * _UNIFORM_SCALE

    @staticmethod
    def clamp_min(x: np.ndarray, low: float) -> np.ndarray:
        return np.maximum(x, np.float32(low), out=x)

    @staticmethod
    def log(x: np.ndarray) -> np.ndarray:
        return np.log(x, out=x)

    @staticmethod
    def sqrt(x: np.ndarray) -> np.ndarray:
        return np.sqrt(x, out=x)

    @staticmethod
    def cos(x: np.ndarray) -> np.ndarray:
        return np.cos(x, out=x)


NUMPY = NumpyOps()


def philox4x32(
    c0: np.ndarray,
    c1: np.ndarray,
    c2: np.ndarray,
    c3: np.ndarray,
    k0: np.ndarray,
    k1: np.ndarray,
    n_rounds: int = stream.N_ROUNDS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32 on uint32 words held in uint64 arrays (which broadcast together)."""
    return stream.philox4x32(c0, c1, c2, c3, k0, k1, NUMPY, n_rounds)


def randint4x(key: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, ...]:
    """``tl.randint4x(key, offset)``: 64-bit keys and 32-bit offsets (uint64 arrays that
    broadcast together) -> four arrays of uint32 words (in uint64)."""
    return stream.randint4x(key, offset, NUMPY)


def uint_to_uniform_float(words: np.ndarray) -> np.ndarray:
    """Triton's map of a uint32 word (in uint64) to a float32 in [0, 1)."""
    return NUMPY.uniform(words)


def triton_randn(key: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``tl.randn(key, offset)``: float32 standard normals, one per (broadcast) offset."""
    return stream.triton_randn(key, offset, NUMPY)


def keyed_noise(
    seed: int, sample_indices: Sequence[int], step: int, shape: tuple[int, ...]
) -> np.ndarray:
    """Noise of shape [len(sample_indices), *shape] (float32) for chain step ``step`` (0 = x_T):
    ``ddpm_fast.noise.keyed_noise`` without torch."""
    return keyed_noise_steps(seed, sample_indices, step, 1, shape)[:, 0]


def keyed_noise_steps(
    seed: int, sample_indices: Sequence[int], first_step: int, count: int, shape: tuple[int, ...]
) -> np.ndarray:
    """The noise of ``count`` consecutive chain steps from ``first_step`` in one draw, shape
    [len(sample_indices), count, *shape] (float32): entry [:, j] is ``keyed_noise`` of step
    ``first_step + j`` (the steps' counters are consecutive). ``ddpm_fast.noise``'s without
    torch."""
    numel = int(np.prod(shape, dtype=np.int64))
    indices = list(sample_indices)
    seed, start, stop = stream.check_draw(seed, indices, first_step, count, numel)
    column = np.array(indices, dtype=np.uint64).reshape(-1, 1)
    offsets = np.arange(start, stop, dtype=np.uint64).reshape(1, -1)
    noise = stream.keyed_normals(seed, column, offsets, NUMPY)
    return noise.reshape(len(indices), count, *shape)


def block_steps(values_per_step: int, steps: int) -> int:
    """How many chain steps' noise a sampler draws at once: up to ``NOISE_BLOCK_STEPS``, at most
    ``NOISE_BLOCK_VALUES`` values per draw. Each draw has a fixed cost (tens of array or tensor
    calls) as large as a small model's whole step; a block pays it once."""
    return max(1, min(NOISE_BLOCK_STEPS, steps, NOISE_BLOCK_VALUES // max(1, values_per_step)))


class NoiseBlocks:
    """A chain's noise, drawn ``block_steps`` steps at a time and only when a step asks:
    ``of_step(k)`` is chain step k's noise (reverse step k + 1's counters; 0 is x_T), [B, ...].
    ``draw(first_step, count)`` returns ``count`` consecutive steps' noise as a NumPy array
    [count, B, ...] (``step_noise``: NumPy's draw; the Philox words are ``ddpm_fast.noise``'s,
    the floats within an ulp of its). A chain whose steps add no noise (DDIM with eta 0) draws
    nothing."""

    def __init__(self, draw, values_per_step: int, steps: int):
        self.draw, self.steps = draw, steps
        self.count = block_steps(values_per_step, steps)
        self.first, self.block = 0, None

    def of_step(self, k: int) -> np.ndarray:
        if self.block is None or not self.first <= k < self.first + len(self.block):
            self.block = self.draw(k + 1, min(self.count, self.steps - k))
            self.first = k
        return self.block[k - self.first]


def step_noise(seed: int, indices: range, shape: tuple[int, ...], steps: int) -> NoiseBlocks:
    """A chain's noise for the samples ``indices`` of images ``shape``, drawn with NumPy in
    blocks of steps (each draw has a fixed cost whatever its size, so one draw serves many
    steps): what every chain that runs on ONNX Runtime feeds its steps."""

    def draw(first_step: int, count: int) -> np.ndarray:
        block = keyed_noise_steps(seed, indices, first_step, count, shape)
        return np.ascontiguousarray(np.swapaxes(block, 0, 1))  # [count, B, ...]

    return NoiseBlocks(draw, len(indices) * int(np.prod(shape)), steps)
