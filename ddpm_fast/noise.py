"""Counter-based Gaussian noise: Triton's ``tl.randn(seed, offset)`` written in PyTorch.

Every noise element is a pure function of (seed, sample index, chain step, element), so sample i
is the same image whatever the batch it is drawn in, a resume needs no generator state, and a
Triton kernel can draw the same numbers inside a CUDA graph:

    tl.randn(key, offset) with key = (sample_index << 32) | seed        (64-bit Philox key)
                              offset = step * (C * H * W) + element       (32-bit counter)

where step 0 is the initial noise x_T and step k the k-th reverse step. ``tl.randn`` is
Philox4x32-10 on the counter (offset, 0, 0, 0) with the key split (lo, hi), the first two words
mapped to floats in [0, 1) and through Box-Muller (cos branch), all in float32.

The 32-bit words are emulated with int64 tensors: products are split into 16-bit halves so that no
intermediate overflows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import ConfigError

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
MASK32 = 0xFFFFFFFF
MAX_OFFSET = 2**31  # the kernels index with int32

# tl.randn's float constants, rounded to float32 as Triton does.
_UNIFORM_SCALE = 4.6566127342e-10
_MIN_UNIFORM = 1.0e-7
_TWO_PI = 6.283185307179586


def _mulhilo(a: int, x):
    """(hi, lo) 32-bit words of the 64-bit product of the constant ``a`` and uint32 words ``x``
    (an int64 tensor, or a Python int where the word is the same for every element)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = x * a_lo  # < 2**48
    p_hi = x * a_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16  # = (x * a) >> 32 exactly, so already < 2**32
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1, n_rounds: int = N_ROUNDS) -> tuple:
    """Philox4x32 as ``triton.language.random.philox_impl``: uint32 words held in int64 tensors
    that broadcast together. Any word may be a Python int instead (a word that is the same for
    every element: the zero counter words, the seed's half of the key), which then costs no
    kernel until it meets a tensor."""
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def randint4x(seed: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x(seed, offset)`` for a 64-bit seed and 32-bit offsets (int64 tensors that
    broadcast together); returns four tensors of uint32 words in int64."""
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    return philox4x32(offset & MASK32, 0, 0, 0, k0, k1)


def uint_to_uniform_float(x: torch.Tensor) -> torch.Tensor:
    """Triton's map of a uint32 word to a float32 in [0, 1): reinterpret as int32, fold the
    negative half with bitwise not (for a word w >= 2**31, ~(w - 2**32) = w ^ (2**32 - 1)),
    scale. The scale is a Python float: PyTorch rounds it to float32 and multiplies in float32,
    as Triton does, with no device tensor made for it."""
    folded = torch.where(x >= 2**31, x ^ MASK32, x)
    return folded.to(torch.float32) * _UNIFORM_SCALE


def _box_muller(i1: torch.Tensor, i2: torch.Tensor) -> torch.Tensor:
    """``tl.randn``'s map of two uint32 words to a normal: Box-Muller, cos branch, float32."""
    u1 = uint_to_uniform_float(i1).clamp_min_(_MIN_UNIFORM)
    th = uint_to_uniform_float(i2).mul_(_TWO_PI)
    r = torch.log(u1).mul_(-2.0).sqrt_()
    return r.mul_(torch.cos(th))


def triton_randn(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``tl.randn(seed, offset)``: float32 standard normals, one per offset."""
    i1, i2, _, _ = randint4x(seed, offset)
    return _box_muller(i1, i2)


def check_seed(seed: int) -> int:
    """Seeds are the low 32 bits of the Philox key."""
    if not isinstance(seed, int) or not 0 <= seed <= MASK32:
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return seed


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
    check_seed(seed)
    numel = 1
    for s in shape:
        numel *= s
    if (first_step + count) * numel > MAX_OFFSET:
        raise ConfigError(
            f"{first_step + count} steps of {numel} noise values per sample exceed the 2**31 "
            "counters of the Philox stream; use fewer steps or smaller images"
        )
    # Checked on the host, before the tensor exists: no device sync inside a sampling loop.
    if sample_indices and (min(sample_indices) < 0 or max(sample_indices) > MASK32):
        raise ConfigError("sample indices must lie in [0, 2**32)")
    # The key's low word is the seed, the same for every sample: a Python int (no kernels).
    indices = _sample_indices(sample_indices, device).view(-1, 1)
    start = first_step * numel  # offsets < 2**31 (checked above): no masking needed
    stop = start + count * numel
    offsets = torch.arange(start, stop, dtype=torch.int64, device=indices.device)
    i1, i2, _, _ = philox4x32(offsets.view(1, -1), 0, 0, 0, seed, indices)
    return _box_muller(i1, i2).view(len(sample_indices), count, *shape).to(dtype)


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
    return (_sample_indices(sample_indices, device) << 32) | seed
