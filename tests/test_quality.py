"""The embedded default model draws digits a classifier recognises, and the check catches a
broken sampler. The real-digit figure is the yardstick both are read against."""

import pytest
import torch

import ddpm_fast
import ddpm_fast.pipeline
from ddpm_fast.errors import DdpmFastError
from ddpm_fast.quality import digits, real_digits_report, score_digits
from ddpm_fast.samplers import step_tables

pytest.importorskip("sklearn")

NUM = 256
THRESHOLD = 0.85  # mean top-class probability
MIN_SHARE = 0.03  # of each class


@pytest.fixture(scope="module")
def default():
    return ddpm_fast.load()


def test_real_digits_are_recognised():
    report = real_digits_report()
    print(f"real digits: {report}")
    assert report.num_images == 450
    assert report.mean_top_probability > 0.9
    assert report.min_class_share > 0.08


def test_noise_and_blank_images_are_not():
    g = torch.Generator().manual_seed(0)
    assert score_digits(torch.rand(NUM, 1, 8, 8, generator=g)).mean_top_probability < 0.5
    mean_digit = digits()[0].mean(0, keepdim=True).expand(NUM, 1, 8, 8)
    assert score_digits(mean_digit).min_class_share == 0  # one class only


def test_images_of_another_shape_are_refused():
    with pytest.raises(DdpmFastError, match=r"\[N, 1, 8, 8\]"):
        score_digits(torch.rand(4, 3, 8, 8))


@pytest.fixture(scope="module")
def ddpm_1000(default):
    """The score of the full DDPM chain (1000 steps), sampled once for the tests that read it."""
    return score_digits(default.sample(NUM, batch_size=NUM, seed=0))


@pytest.mark.slow
def test_full_ddpm_chain_draws_recognisable_digits(ddpm_1000):
    report = ddpm_1000
    print(f"DDPM 1000 steps: {report}\nreal digits:     {real_digits_report()}")
    assert report.mean_top_probability >= THRESHOLD
    assert report.min_class_share >= MIN_SHARE


@pytest.mark.slow
def test_ddim_50_steps_draws_recognisable_digits(default):
    images = default.sample(NUM, batch_size=NUM, sampler="ddim", steps=50, seed=0)
    report = score_digits(images)
    print(f"DDIM 50 steps: {report}")
    assert report.mean_top_probability >= THRESHOLD
    assert report.min_class_share >= MIN_SHARE


@pytest.mark.slow
def test_dpm_solver_reaches_ddpm_1000s_quality_in_10_to_20_steps(default, ddpm_1000):
    """DPM-Solver++(2M) at 20 steps within 0.01 of DDPM 1000's mean top-class probability (or
    above it); at 10 steps at least 0.90 with every class at 3% or more."""
    ddpm = ddpm_1000
    dpm20 = score_digits(default.sample(NUM, batch_size=NUM, sampler="dpm++2m", steps=20, seed=0))
    dpm10 = score_digits(default.sample(NUM, batch_size=NUM, sampler="dpm++2m", steps=10, seed=0))
    print(f"DDPM 1000: {ddpm}\nDPM-Solver++ 20: {dpm20}\nDPM-Solver++ 10: {dpm10}")
    assert dpm20.mean_top_probability >= ddpm.mean_top_probability - 0.01
    assert dpm20.min_class_share >= MIN_SHARE
    assert dpm10.mean_top_probability >= 0.90
    assert dpm10.min_class_share >= MIN_SHARE


@pytest.mark.slow
def test_the_check_catches_a_broken_sampler(default, monkeypatch):
    """A wrong sign in the x0 formula (x0 = x/sqrt(abar) + sqrt(1/abar - 1) eps): the samples fall
    far below the threshold. (A wrong variance does not: with the posterior variance doubled the
    figure stays near 0.93, as the network corrects the extra noise at the next steps.)"""

    def wrong_sign(schedule, spec):
        tables = step_tables(schedule, spec)
        tables.x0_from_eps = -tables.x0_from_eps
        return tables

    # A 100-step DDPM chain of 64 images: a tenth of the full chain's cost per image, and the same
    # chain unbroken passes (0.97 when written), so the check is what tells the two apart.
    chain = dict(batch_size=64, seed=0, steps=100)
    sound = score_digits(default.sample(64, **chain))
    assert sound.mean_top_probability >= THRESHOLD and sound.min_class_share >= MIN_SHARE
    monkeypatch.setattr(ddpm_fast.pipeline, "step_tables", wrong_sign)
    report = score_digits(default.sample(64, **chain))
    print(f"DDPM (100 steps) with a wrong sign in x0: {report}")
    assert report.mean_top_probability < THRESHOLD - 0.2
