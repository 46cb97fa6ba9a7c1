"""``noise="torch-generator"`` without diffusers: x_T and the per-step draws come from the
generator in diffusers' order (test_from_diffusers.py checks the images against diffusers'), and
what it cannot be combined with is one line each."""

from __future__ import annotations

import pytest
import torch

import ddpm_fast
from ddpm_fast.engine import Engine
from ddpm_fast.errors import ConfigError


@pytest.fixture(scope="module")
def pipeline():
    return ddpm_fast.load()


def test_x_t_is_the_generators_first_draw(pipeline):
    """DDIM at eta 0 adds no noise: the chain is fixed by x_T, which is randn of the batch."""
    shape = (3, *pipeline.image_shape())
    x_t = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    want = pipeline.sample(3, sampler="ddim", steps=5, initial_noise=x_t)
    assert (want - want.mean()).abs().max() > 0.1
    for sampler in (pipeline, Engine(pipeline)):
        got = sampler.sample(3, sampler="ddim", steps=5, noise="torch-generator", seed=9)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sampler, eta, draws", [("ddpm", 0.0, 1 + 5), ("ddim", 0.5, 1 + 5),
                                                 ("ddim", 0.0, 1)])  # fmt: skip
def test_the_generator_ends_where_diffusers_would(pipeline, sampler, eta, draws):
    """One draw for x_T and one per step where diffusers' scheduler draws (DDPM: t > 0; DDIM
    with eta > 0: every step, the last too), whatever ddpm-fast's step uses."""
    shape = (2, *pipeline.image_shape())
    used = torch.Generator().manual_seed(3)
    pipeline.sample(2, sampler=sampler, eta=eta, steps=5, generator=used)
    expected = torch.Generator().manual_seed(3)
    for _ in range(draws):
        torch.randn(shape, generator=expected)
    assert torch.equal(used.get_state(), expected.get_state())


def test_what_torch_generator_noise_cannot_be_combined_with(pipeline):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, *pipeline.image_shape())
    cases = [
        (dict(noise="philox", generator=g), "generator"),
        (dict(noise="torch", generator=g), "unknown noise"),
        (dict(generator=g, initial_noise=x_t), "initial_noise"),
        (dict(generator=g, start_index=4), "start_index"),
        (dict(generator=[g, g]), "2 generators for 1 images"),
        (dict(generator=0), "torch.Generator"),
    ]
    for options, named in cases:
        with pytest.raises(ConfigError, match=named) as error:
            pipeline.sample(1, steps=2, **options)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m-sde"])
def test_drawing_ahead_changes_nothing_but_when(pipeline, sampler, monkeypatch):
    """Blocks of one step and a whole chain in one block: the same images, the same generator
    state after (the numbers and their order are the generator's, whenever they are drawn)."""
    from ddpm_fast import generator_noise

    runs = []
    for block_bytes in (1, generator_noise.BLOCK_BYTES):
        monkeypatch.setattr(generator_noise, "BLOCK_BYTES", block_bytes)
        g = torch.Generator().manual_seed(1)
        images = Engine(pipeline).sample(2, sampler=sampler, steps=6, generator=g)
        runs.append((images, g.get_state()))
    (one, state_one), (ahead, state_ahead) = runs
    assert (one - one.mean()).abs().max() > 0.1
    assert torch.equal(one, ahead) and torch.equal(state_one, state_ahead)
