"""The Philox noise: Random123's known answers, Triton's tl.randn stream (under the
interpreter), and keying by (seed, sample, step, element)."""

import pytest
import torch

from ddpm_fast.errors import ConfigError
from ddpm_fast.noise import (
    keyed_noise,
    keyed_noise_steps,
    philox4x32,
    philox_keys,
    randint4x,
    triton_randn,
    uint_to_uniform_float,
)

# Random123's philox4x32_10 known-answer tests: (counter, key) -> output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF,) * 4,
        (0xFFFFFFFF,) * 2,
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in counter]
    keys = [torch.tensor([k], dtype=torch.int64) for k in key]
    out = philox4x32(*words, *keys)
    assert tuple(int(w) for w in out) == expected


def triton_stream(seed: int, n: int):
    """tl.randint4x and tl.randn for offsets 0..n-1, run by Triton (the interpreter here)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(words_ptr, normal_ptr, seed, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        i1, i2, i3, i4 = tl.randint4x(seed, offsets)
        for j, word in enumerate((i1, i2, i3, i4)):
            tl.store(words_ptr + offsets * 4 + j, word.to(tl.int64) & 0xFFFFFFFF, mask=mask)
        tl.store(normal_ptr + offsets, tl.randn(seed, offsets), mask=mask)

    words = torch.full((n, 4), -1, dtype=torch.int64)
    normal = torch.full((n,), float("nan"))
    kernel[(triton.cdiv(n, 256),)](words, normal, seed, n, BLOCK=256)
    return words, normal


@pytest.mark.parametrize("seed", [0, 20251128, (3 << 32) | 7, ((2**31 - 1) << 32) | (2**32 - 1)])
def test_the_stream_is_tritons(seed):
    pytest.importorskip("triton")
    n = 700
    words, normal = triton_stream(seed, n)
    offsets = torch.arange(n, dtype=torch.int64)
    ours = torch.stack(randint4x(torch.tensor(seed), offsets), dim=1)
    assert torch.equal(ours, words)  # the 32-bit words, bit for bit
    # The floats go through float32 log and cos, whose last bit differs between libraries
    # (numpy in the interpreter, PyTorch here); the uniforms themselves are exact.
    torch.testing.assert_close(triton_randn(torch.tensor(seed), offsets), normal, rtol=0, atol=2e-6)


def test_uniforms_lie_in_the_unit_interval_at_the_extremes():
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = uint_to_uniform_float(words)
    assert (u >= 0).all() and (u < 1).all()
    assert u[0] == 0 and u[-1] == 0  # 0 and all-ones both map to the lowest value


def test_a_sample_is_the_same_in_any_batch():
    shape = (3, 5, 7)
    alone = keyed_noise(11, [6], 4, shape)
    in_seven = keyed_noise(11, range(7), 4, shape)
    in_sixty_four = keyed_noise(11, range(64), 4, shape)
    assert torch.equal(alone[0], in_seven[6])
    assert torch.equal(alone[0], in_sixty_four[6])


def test_seed_sample_and_step_each_change_the_noise():
    base = keyed_noise(1, [0], 1, (4, 4))
    for other in (
        keyed_noise(2, [0], 1, (4, 4)),
        keyed_noise(1, [1], 1, (4, 4)),
        keyed_noise(1, [0], 2, (4, 4)),
    ):
        assert not torch.equal(base, other)


def test_it_is_standard_normal():
    noise = keyed_noise(5, range(64), 3, (3, 32, 32)).double()
    assert abs(noise.mean().item()) < 0.01
    assert abs(noise.std().item() - 1) < 0.01
    # within the range of a Box-Muller draw from float32 uniforms floored at 1e-7
    assert noise.abs().max().item() < 5.7


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5])
def test_bad_seeds_are_config_errors(seed):
    with pytest.raises(ConfigError, match="seed must be"):
        keyed_noise(seed, [0], 0, (2,))


def test_counters_beyond_the_stream_are_config_errors():
    with pytest.raises(ConfigError, match="exceed the 2\\*\\*31 counters"):
        keyed_noise(0, [0], 1000, (3, 1024, 1024))


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_keyed_noise_is_the_stream_at_its_keys_and_offsets(seed):
    """keyed_noise keeps the seed's key word a Python int: the same numbers as the full keys."""
    indices, step, shape = [0, 5, 2**31 + 3, 2**32 - 1], 3, (2, 3, 5)
    numel = 2 * 3 * 5
    offsets = step * numel + torch.arange(numel, dtype=torch.int64)
    keys = philox_keys(seed, indices).view(-1, 1)
    expected = triton_randn(keys, offsets.view(1, -1)).view(len(indices), *shape)
    assert torch.equal(keyed_noise(seed, indices, step, shape), expected)


def test_keyed_noise_makes_no_tensor_from_a_python_number():
    """On CUDA each would be a blocking host-to-device copy inside the sampling loop."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append((str(func), kwargs or {}))
            return func(*args, **(kwargs or {}))

    with Record() as record:
        keyed_noise(3, range(2), 1, (3, 8, 8))
    made = [op for op, kwargs in record.ops if "lift_fresh" in op or "scalar_tensor" in op]
    copies = [op for op, kwargs in record.ops if "copy" in op and "device" in kwargs]
    assert record.ops and not made and not copies


def test_a_block_of_steps_is_each_step_drawn_alone():
    block = keyed_noise_steps(5, range(2, 5), 3, 4, (2, 3, 3))
    assert block.shape == (3, 4, 2, 3, 3)
    for j in range(4):
        assert torch.equal(block[:, j], keyed_noise(5, range(2, 5), 3 + j, (2, 3, 3)))


def test_a_block_past_the_stream_is_a_config_error():
    numel = 4 * 64 * 64
    last = 2**31 // numel  # the first step past the stream
    keyed_noise_steps(0, [0], last - 2, 2, (4, 64, 64))  # ends exactly at the limit
    with pytest.raises(ConfigError, match="exceed the 2\\*\\*31 counters"):
        keyed_noise_steps(0, [0], last - 2, 3, (4, 64, 64))


def test_one_check_seed_for_both_front_ends():
    """options.check_seed: NumPy integers are seeds (the same noise as the int), bools are not,
    in the torch and the NumPy front-end alike."""
    import numpy as np

    from ddpm_fast.export import philox
    from ddpm_fast.options import check_seed

    assert check_seed(np.uint32(2**32 - 1)) == 2**32 - 1 and type(check_seed(np.int64(3))) is int
    for seed in (np.int64(7), np.uint32(7)):
        assert torch.equal(keyed_noise(seed, [0, 3], 2, (4,)), keyed_noise(7, [0, 3], 2, (4,)))
        np.testing.assert_array_equal(
            philox.keyed_noise(seed, [0, 3], 2, (4,)), philox.keyed_noise(7, [0, 3], 2, (4,))
        )
    for draw in (keyed_noise, philox.keyed_noise):
        with pytest.raises(ConfigError, match="seed must be"):
            draw(True, [0], 0, (2,))
        with pytest.raises(ConfigError, match="seed must be"):
            draw(np.int64(2**32), [0], 0, (2,))
    with pytest.raises(ConfigError, match="seed must be"):
        philox_keys(-1, [0])
