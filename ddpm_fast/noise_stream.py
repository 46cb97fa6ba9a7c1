"""The Philox noise stream, written once: Triton's ``tl.randn`` over an array namespace.

Every noise element is a pure function of (seed, sample index, chain step, element), so sample i
is the same image whatever the batch it is drawn in, a resume needs no generator state, and a
Triton kernel can draw the same numbers inside a CUDA graph:

    tl.randn(key, offset) with key = (sample_index << 32) | seed        (64-bit Philox key)
                              offset = step * (C * H * W) + element       (32-bit counter)

where step 0 is the initial noise x_T and step k the k-th reverse step. ``tl.randn`` is
Philox4x32-10 on the counter (offset, 0, 0, 0) with the key split (lo, hi) = (seed, sample
index), the first two words mapped to floats in [0, 1) and through Box-Muller (cos branch), all
in float32.

The rounds and Box-Muller below use only what NumPy arrays, torch tensors and Python ints share
(``+ * >> & ^``); the little that differs comes from an :class:`ArrayOps`: the exact 64-bit
product of two 32-bit words (NumPy holds words in uint64, where it fits; torch in int64, where it
is split into 16-bit halves), the word-to-float map, and four float functions. The two front-ends
are ``ddpm_fast.noise`` (torch) and ``ddpm_fast.export.philox`` (NumPy, no torch); tests check
that their words are equal and equal Triton's. This module imports neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .errors import ConfigError
from .options import check_seed

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
MASK32 = 0xFFFFFFFF
MAX_OFFSET = 2**31  # the kernels index with int32

# tl.randn's float constants, rounded to float32 where they meet a float32 array, as in Triton.
UNIFORM_SCALE = 4.6566127342e-10
MIN_UNIFORM = 1.0e-7
TWO_PI = 6.283185307179586


class ArrayOps(Protocol):
    """What differs between array libraries. ``x`` is an array of uint32 words (or a Python int,
    a word the same for every element); the float functions take float32 arrays that the caller
    never reads again, so they may work in place."""

    def mulhilo(self, a: int, x):
        """(hi, lo) 32-bit words of the exact 64-bit product ``a * x``."""

    def uniform(self, words):
        """Triton's map of uint32 words to float32 in [0, 1): read as int32, fold the negative
        half with bitwise not, times UNIFORM_SCALE in float32."""

    def clamp_min(self, x, low: float): ...

    def log(self, x): ...

    def sqrt(self, x): ...

    def cos(self, x): ...


def philox4x32(c0, c1, c2, c3, k0, k1, ops: ArrayOps, n_rounds: int = N_ROUNDS) -> tuple:
    """Philox4x32 as ``triton.language.random.philox_impl`` on uint32 words that broadcast
    together. Any word may be a Python int (the zero counter words, the seed's half of the key),
    which costs no array operation until it meets an array."""
    for _ in range(n_rounds):
        hi_b, lo_b = ops.mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = ops.mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def randint4x(key, offset, ops: ArrayOps) -> tuple:
    """``tl.randint4x(key, offset)``: 64-bit keys and 32-bit offsets that broadcast together ->
    four uint32 words."""
    return philox4x32(offset & MASK32, 0, 0, 0, key & MASK32, (key >> 32) & MASK32, ops)


def box_muller(i1, i2, ops: ArrayOps):
    """``tl.randn``'s map of two uint32 words to a standard normal: Box-Muller, cos branch."""
    u1 = ops.clamp_min(ops.uniform(i1), MIN_UNIFORM)
    r = ops.sqrt(ops.log(u1) * -2.0)
    return r * ops.cos(ops.uniform(i2) * TWO_PI)


def triton_randn(key, offset, ops: ArrayOps):
    """``tl.randn(key, offset)``: float32 standard normals, one per (broadcast) offset."""
    i1, i2, _, _ = randint4x(key, offset, ops)
    return box_muller(i1, i2, ops)


def keyed_normals(seed: int, indices, offsets, ops: ArrayOps):
    """The stream at key (index << 32) | seed and counters ``offsets``: ``seed`` a checked Python
    int (one key word for every element, no array), ``indices`` and ``offsets`` word arrays that
    broadcast together (a column and a row)."""
    i1, i2, _, _ = philox4x32(offsets, 0, 0, 0, seed, indices, ops)
    return box_muller(i1, i2, ops)


def check_draw(
    seed, sample_indices: Sequence[int], first_step: int, count: int, numel: int
) -> tuple[int, int, int]:
    """(seed, first counter, end counter) of ``count`` steps of ``numel`` values per sample from
    ``first_step``, checked on the host before any array exists (no device sync inside a
    sampling loop); ConfigError for a bad seed, sample index or a draw past the stream."""
    seed = check_seed(seed)
    if (first_step + count) * numel > MAX_OFFSET:
        raise ConfigError(
            f"{first_step + count} steps of {numel} noise values per sample exceed the 2**31 "
            "counters of the Philox stream; use fewer steps or smaller images"
        )
    if len(sample_indices) and (min(sample_indices) < 0 or max(sample_indices) > MASK32):
        raise ConfigError("sample indices must lie in [0, 2**32)")
    return seed, first_step * numel, (first_step + count) * numel
