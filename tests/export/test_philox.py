"""The NumPy Philox stream equals ddpm_fast.noise's: the 32-bit words exactly, the normals
within float32 rounding of log and cos."""

import numpy as np
import pytest
import torch

from ddpm_fast import noise as torch_noise
from ddpm_fast.errors import ConfigError
from ddpm_fast.export import philox

KEYS = [0, 1, 0xFFFFFFFF, (7 << 32) | 123, (0xFFFFFFFF << 32) | 0xFFFFFFFF]


def test_words_equal_the_torch_stream_bit_for_bit():
    keys = np.array(KEYS, np.uint64).reshape(-1, 1)
    offsets = np.concatenate([np.arange(300), 2**31 - 1 - np.arange(300)]).astype(np.uint64)
    words = philox.randint4x(keys, offsets.reshape(1, -1))
    expected = torch_noise.randint4x(
        torch.tensor([k - 2**64 if k >= 2**63 else k for k in KEYS]).view(-1, 1),
        torch.from_numpy(offsets.astype(np.int64)).view(1, -1),
    )
    for ours, theirs in zip(words, expected, strict=True):
        assert ours.shape == (len(KEYS), 600)
        np.testing.assert_array_equal(ours.astype(np.int64), theirs.numpy())
    assert len(set(words[0].ravel().tolist())) == words[0].size  # all distinct


def test_random123_known_answer():
    """Random123's kat_vectors, philox4x32 10 rounds, counter and key all ones."""
    ones = np.full(1, 0xFFFFFFFF, np.uint64)
    words = philox.philox4x32(ones, ones, ones, ones, ones, ones)
    assert [int(w[0]) for w in words] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize(
    ("seed", "indices", "step", "shape"),
    [(0, [0, 1, 2], 0, (1, 8, 8)), (2**32 - 1, [5, 2**32 - 1], 17, (3, 4, 4))],
)
def test_keyed_noise_equals_the_torch_version(seed, indices, step, shape):
    ours = philox.keyed_noise(seed, indices, step, shape)
    theirs = torch_noise.keyed_noise(seed, indices, step, shape).numpy()
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 2e-6
    assert 0.8 < ours.std() < 1.2 and not np.allclose(ours[0], ours[-1])


def test_a_block_of_steps_is_each_step_drawn_alone_and_the_torch_block():
    block = philox.keyed_noise_steps(5, range(2, 5), 3, 4, (2, 3, 3))
    assert block.shape == (3, 4, 2, 3, 3) and block.dtype == np.float32
    for j in range(4):
        np.testing.assert_array_equal(
            block[:, j], philox.keyed_noise(5, range(2, 5), 3 + j, (2, 3, 3))
        )
    theirs = torch_noise.keyed_noise_steps(5, range(2, 5), 3, 4, (2, 3, 3)).numpy()
    assert np.abs(block - theirs).max() <= 2e-6
    assert philox.block_steps(3 * 18, 1000) == philox.NOISE_BLOCK_STEPS
    assert philox.block_steps(3 * 18, 7) == 7 and philox.block_steps(2**30, 1000) == 1


def test_noise_blocks_draw_on_demand_and_give_each_step_its_noise():
    calls = []

    def draw(first_step, count):
        calls.append((first_step, count))
        return np.swapaxes(philox.keyed_noise_steps(3, range(2), first_step, count, (4, 4)), 0, 1)

    blocks = philox.NoiseBlocks(draw, 2 * 16, steps=120)
    assert calls == []
    for k in (0, 1, 49, 50, 119):
        np.testing.assert_array_equal(
            blocks.of_step(k), philox.keyed_noise(3, range(2), k + 1, (4, 4))
        )
    assert calls == [(1, 50), (51, 50), (120, 1)]  # a block starts at the step that asks


def test_bad_seeds_and_counters_are_config_errors():
    with pytest.raises(ConfigError, match="seed must be"):
        philox.keyed_noise(-1, [0], 0, (1,))
    with pytest.raises(ConfigError, match="seed must be"):
        philox.keyed_noise(2**32, [0], 0, (1,))
    with pytest.raises(ConfigError, match="sample indices"):
        philox.keyed_noise(0, [2**32], 0, (1,))
    with pytest.raises(ConfigError, match="2\\*\\*31 counters"):
        philox.keyed_noise(0, [0], 2**20, (3, 32, 32))
