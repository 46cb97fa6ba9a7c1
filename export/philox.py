"""``ddpm_fast.noise.keyed_noise`` in NumPy: the same Philox stream, without torch.

Noise element e of sample i at chain step s (0 = x_T) is Triton's ``tl.randn(key, offset)`` with
key = (i << 32) | seed and offset = s * (C * H * W) + e: Philox4x32-10 on the counter
(offset, 0, 0, 0) with the key split (lo, hi), the first two words mapped to floats in [0, 1) and
through Box-Muller (cos branch), in float32. The 32-bit words are held in uint64 arrays, where the
product of two 32-bit words fits exactly; they equal ``ddpm_fast.noise``'s bit for bit (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError

PHILOX_KEY_A = np.uint64(0x9E3779B9)
PHILOX_KEY_B = np.uint64(0xBB67AE85)
PHILOX_ROUND_A = np.uint64(0xD2511F53)
PHILOX_ROUND_B = np.uint64(0xCD9E8D57)
N_ROUNDS = 10
MASK32 = 0xFFFFFFFF
MAX_OFFSET = 2**31  # the kernels index with int32
NOISE_BLOCK_STEPS = 50
NOISE_BLOCK_VALUES = 2**22  # 16 MiB of float32 per draw

_MASK = np.uint64(MASK32)
_SHIFT = np.uint64(32)
_UNIFORM_SCALE = np.float32(4.6566127342e-10)
_MIN_UNIFORM = np.float32(1.0e-7)
_TWO_PI = np.float32(6.283185307179586)
_MINUS_TWO = np.float32(-2.0)


def philox4x32(
    c0: np.ndarray,
    c1: np.ndarray,
    c2: np.ndarray,
    c3: np.ndarray,
    k0: np.ndarray,
    k1: np.ndarray,
    n_rounds: int = N_ROUNDS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox4x32 on uint32 words held in uint64 arrays (which broadcast together)."""
    for _ in range(n_rounds):
        prod_b = c2 * PHILOX_ROUND_B  # < 2**64: exact
        prod_a = c0 * PHILOX_ROUND_A
        c0, c1, c2, c3 = (
            (prod_b >> _SHIFT) ^ c1 ^ k0,
            prod_b & _MASK,
            (prod_a >> _SHIFT) ^ c3 ^ k1,
            prod_a & _MASK,
        )
        k0 = (k0 + PHILOX_KEY_A) & _MASK
        k1 = (k1 + PHILOX_KEY_B) & _MASK
    return c0, c1, c2, c3


def randint4x(key: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, ...]:
    """``tl.randint4x(key, offset)``: 64-bit keys and 32-bit offsets (uint64 arrays that
    broadcast together) -> four arrays of uint32 words (in uint64)."""
    zero = np.zeros_like(offset)
    return philox4x32(offset & _MASK, zero, zero, zero, key & _MASK, key >> _SHIFT)


def uint_to_uniform_float(words: np.ndarray) -> np.ndarray:
    """Triton's map of a uint32 word to a float32 in [0, 1): read as int32, fold the negative
    half with bitwise not, scale."""
    signed = words.astype(np.uint32).view(np.int32)
    folded = np.where(signed < 0, ~signed, signed)
    return folded.astype(np.float32) * _UNIFORM_SCALE


def triton_randn(key: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``tl.randn(key, offset)``: float32 standard normals, one per (broadcast) offset."""
    i1, i2, _, _ = randint4x(key, offset)
    u1 = np.maximum(uint_to_uniform_float(i1), _MIN_UNIFORM)
    u2 = uint_to_uniform_float(i2)
    r = np.sqrt(_MINUS_TWO * np.log(u1))
    return r * np.cos(_TWO_PI * u2)


def check_seed(seed: int) -> int:
    """Seeds are the low 32 bits of the Philox key."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed <= MASK32:
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


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
    seed = check_seed(seed)
    numel = int(np.prod(shape, dtype=np.int64))
    if (first_step + count) * numel > MAX_OFFSET:
        raise ConfigError(
            f"{first_step + count} steps of {numel} noise values per sample exceed the 2**31 "
            "counters of the Philox stream; use fewer steps or smaller images"
        )
    indices = np.asarray(list(sample_indices), dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() > MASK32):
        raise ConfigError("sample indices must lie in [0, 2**32)")
    keys = ((indices.astype(np.uint64) << _SHIFT) | np.uint64(seed)).reshape(-1, 1)
    offsets = np.uint64(first_step * numel) + np.arange(count * numel, dtype=np.uint64)
    noise = triton_randn(keys, offsets.reshape(1, -1))
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
    blocks of steps (one draw costs about 0.25 ms whatever its size, a tenth of the digits
    model's step at batch 1): what every chain that runs on ONNX Runtime feeds its steps."""

    def draw(first_step: int, count: int) -> np.ndarray:
        block = keyed_noise_steps(seed, indices, first_step, count, shape)
        return np.ascontiguousarray(np.swapaxes(block, 0, 1))  # [count, B, ...]

    return NoiseBlocks(draw, len(indices) * int(np.prod(shape)), steps)
