"""The public sampling API: load() -> Pipeline.sample(...), per-sample determinism."""

import numpy as np
import pytest
import torch

import ddpm_fast
from ddpm_fast.engine import Engine
from ddpm_fast.errors import ConfigError, NonFiniteError
from ddpm_fast.pipeline import Pipeline


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


# bad arguments: a ConfigError that names the argument, and the pipeline left as it was

BAD_SAMPLE_ARGUMENTS = [
    ({"num": 0}, "number of images must be at least 1"),
    ({"num": None}, "number of images must be an integer, got None"),
    ({"num": 2.0}, "number of images must be an integer, got 2.0"),
    ({"num": np.array([2])}, "number of images must be an integer"),
    ({"steps": 5.0}, "steps must be an integer, got 5.0"),
    ({"steps": "5"}, "steps must be an integer, got '5'"),
    ({"steps": True}, "steps must be an integer, got True"),
    ({"sampler": "euler"}, "unknown sampler 'euler'"),
    ({"sampler": 3}, "unknown sampler 3"),  # None: the model's default
    ({"eta": float("inf")}, "eta must be finite"),
    ({"eta": float("nan")}, "eta must be finite"),
    ({"eta": -0.5}, "eta must be at least 0"),
    ({"eta": 1j}, "eta must be a real number"),
    ({"eta": 0.5, "sampler": "ddpm"}, "eta applies to the ddim sampler only"),
    ({"seed": -1}, "seed must be an integer in [0, 2**32)"),
    ({"seed": 2**32}, "seed must be an integer in [0, 2**32)"),
    ({"seed": 1.5}, "seed must be an integer, got 1.5"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"start_index": -1}, "start_index must be at least 0"),
    ({"start_index": 2**32}, "start_index must be at most"),
    ({"device": "meta"}, "samples on cpu or cuda devices, not 'meta'"),
    ({"device": "bogus"}, "unknown device 'bogus'"),
    ({"device": 3.5}, "device must be a string"),
    ({"initial_noise": np.zeros((2, 1, 8, 8), np.float32)}, "must be a torch.Tensor"),
    ({"initial_noise": torch.zeros(2, 1, 8, 8, dtype=torch.int64)}, "must be a float tensor"),
    ({"initial_noise": torch.full((2, 1, 8, 8), float("nan"))}, "NaN or infinite"),
    ({"initial_noise": torch.full((2, 1, 8, 8), 1e30)}, "reaches 1e+30"),
    ({"initial_noise": torch.randn(3, 1, 8, 8)}, "must have shape [num=2, C, H, W]"),
    ({"initial_noise": torch.randn(2, 3, 8, 8)}, "takes 1 channels"),
    ({"initial_noise": torch.randn(2, 1, 7, 7)}, "needs multiples of 2"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_SAMPLE_ARGUMENTS)
def test_bad_sample_arguments_are_config_errors(pipeline, kwargs, message):
    kwargs = {"num": 2, "steps": 3, "sampler": "ddim", **kwargs}
    parameters = {k: v.clone() for k, v in pipeline.network.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        pipeline.sample(kwargs.pop("num"), **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert pipeline.device == torch.device("cpu")
    for k, v in pipeline.network.state_dict().items():
        assert torch.equal(v, parameters[k])


def test_cuda_without_cuda_is_a_config_error(pipeline):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available here"):
        pipeline.sample(2, steps=3, sampler="ddim", device="cuda")


def test_a_failed_device_leaves_the_pipeline_and_its_engine_usable(pipeline):
    engine = Engine(pipeline)
    before = pipeline.sample(2, steps=3, sampler="ddim")
    for bad in ("meta", "cuda:7" if torch.cuda.is_available() else "cuda", "xla"):
        for model in (pipeline, engine):
            with pytest.raises(ConfigError):
                model.sample(2, steps=3, sampler="ddim", device=bad)
    assert pipeline.device == engine.device == torch.device("cpu")
    torch.testing.assert_close(pipeline.sample(2, steps=3, sampler="ddim"), before, rtol=0, atol=0)
    torch.testing.assert_close(engine.sample(2, steps=3, sampler="ddim"), before, atol=1e-5, rtol=0)


def test_sampling_on_another_device_does_not_move_the_pipeline(pipeline):
    network = pipeline.network
    pipeline.sample(1, steps=2, sampler="ddim", device="cpu")
    assert pipeline.network is network and pipeline.device == torch.device("cpu")


def test_a_non_finite_batch_is_an_error_naming_its_samples(pipeline, monkeypatch):
    """The chain's output is checked once per batch: the first batch comes through, the second
    (where sample 3 is NaN) is an error naming it, and nothing of it is returned."""
    run_chain = Pipeline._run_chain

    def poisoned(self, x, *args, indices, **kwargs):
        x = run_chain(self, x, *args, indices=indices, **kwargs)
        if 3 in indices:
            x[indices.index(3), 0, 0, 0] = float("nan")
        return x

    monkeypatch.setattr(Pipeline, "_run_chain", poisoned)
    batches = pipeline.sample_batches(4, steps=2, sampler="ddim", batch_size=2)
    indices, images = next(batches)
    assert list(indices) == [0, 1] and torch.isfinite(images).all()
    with pytest.raises(
        NonFiniteError, match=r"samples 2\.\.3 gave NaN or infinite values \(samples 3\)"
    ):
        next(batches)


def test_option_lists_match_the_tables_they_name():
    from ddpm_fast.engine import DTYPES
    from ddpm_fast.export.format import expected_noise_steps
    from ddpm_fast.options import BETA_SCHEDULES, ENGINE_DTYPES
    from ddpm_fast.samplers import SamplerSpec, step_tables
    from ddpm_fast.schedule import BETA_SCHEDULES as SCHEDULE_FUNCTIONS
    from ddpm_fast.schedule import Schedule, ScheduleConfig

    assert tuple(SCHEDULE_FUNCTIONS) == BETA_SCHEDULES
    assert tuple(DTYPES) == ENGINE_DTYPES
    schedule = Schedule(ScheduleConfig("linear", 100))
    for kind, eta, variance in [
        ("ddpm", 0.0, "fixed_small"),
        ("ddpm", 0.0, "fixed_large"),
        ("ddpm", 0.0, "learned_range"),
        ("ddim", 0.0, "fixed_small"),
        ("ddim", 0.3, "fixed_small"),
    ]:
        for steps in (1, 7, 100):
            spec = SamplerSpec(kind, steps, eta, variance)
            tables = step_tables(schedule, spec)
            noise = "".join("1" if tables.adds_noise(k, spec) else "0" for k in range(steps))
            assert noise == expected_noise_steps(kind, steps, eta), (spec, noise)
