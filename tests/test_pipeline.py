"""The public sampling API: load() -> Pipeline.sample(...), per-sample determinism."""

import pytest
import torch

import ddpm_fast


@pytest.fixture(scope="module")
def pipeline():
    return ddpm_fast.load()


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 10), ("ddim", 10)])
def test_a_sample_is_the_same_image_in_any_batch(pipeline, sampler, steps):
    """Sample i with seed s: alone, in a batch of 7, in a batch of 64."""
    kwargs = dict(sampler=sampler, steps=steps, seed=7)
    in_64 = pipeline.sample(64, batch_size=64, **kwargs)
    in_7 = pipeline.sample(14, batch_size=7, **kwargs)
    alone = pipeline.sample(1, start_index=12, **kwargs)
    torch.testing.assert_close(in_7, in_64[:14], rtol=0, atol=1e-5)
    torch.testing.assert_close(alone[0], in_64[12], rtol=0, atol=1e-5)
    assert not torch.allclose(in_64[0], in_64[1])


def test_images_are_nchw_in_the_unit_interval(pipeline):
    images = pipeline.sample(3, sampler="ddim", steps=5)
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1


def test_seed_changes_the_images(pipeline):
    a = pipeline.sample(2, sampler="ddim", steps=5, seed=1)
    b = pipeline.sample(2, sampler="ddim", steps=5, seed=2)
    assert not torch.allclose(a, b)


def test_ddim_eta_zero_depends_only_on_the_initial_noise(pipeline):
    noise = torch.randn(2, 1, 8, 8) * 0.9 + 0.1
    a = pipeline.sample(2, sampler="ddim", steps=6, initial_noise=noise, seed=1)
    b = pipeline.sample(2, sampler="ddim", steps=6, initial_noise=noise, seed=2)
    assert torch.equal(a, b)
    c = pipeline.sample(2, sampler="ddim", steps=6, eta=1.0, initial_noise=noise, seed=1)
    assert not torch.allclose(a, c)


def test_fixed_large_variance_is_another_chain():
    small = ddpm_fast.load().sample(2, steps=20, seed=3)
    large = ddpm_fast.load(variance="fixed_large").sample(2, steps=20, seed=3)
    assert not torch.allclose(small, large)


def test_default_model_is_the_trained_digits_model(pipeline):
    assert pipeline.config.channels == 1 and pipeline.diffusion.image_size == 8
    assert pipeline.diffusion.objective == "pred_noise"
    assert pipeline.diffusion.schedule.name == "linear"
    assert pipeline.source.startswith("embedded default")
    assert any("trained on scikit-learn's 8x8 digits" in note for note in pipeline.notes)
