"""Classifier guidance against guided-diffusion's own code: its EncoderUNetModel forward, and
whole guided chains of its p_sample_loop / ddim_sample_loop with classifier_sample.py's cond_fn
(tests/fixtures/make_adm.py --only guidance), for class-conditional and unconditional models,
DDPM respaced and DDIM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ddpm_fast
from ddpm_fast.engine import Engine
from ddpm_fast.errors import CheckpointError, ConfigError
from ddpm_fast.models import adm_classifier

FIXTURES = Path(__file__).parent / "fixtures" / "adm"
FORWARD = torch.load(FIXTURES / "classifier_forward.pt", weights_only=True)
CHAINS = torch.load(FIXTURES / "guided_chains.pt", weights_only=True)
HEAD_CHANNELS = 16  # the fixtures' (the released classifiers' is create_classifier's 64)
# Images in [0, 1] after a whole guided chain, fp32 (the bound).
TOLERANCE = 5e-4


def flags(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def classifier(name: str, **changes) -> ddpm_fast.guidance.Classifier:
    options = {**flags(name), "num_head_channels": HEAD_CHANNELS, **changes}
    return ddpm_fast.load_classifier(FIXTURES / f"{name}.pt", **options)


def model(name: str, changes: str = "{}") -> ddpm_fast.Pipeline:
    """A fixture model, with the flags a chain changed (``changes``: JSON)."""
    return ddpm_fast.load(FIXTURES / f"{name}.pt", **{**flags(name), **json.loads(changes)})


@pytest.mark.parametrize("name", sorted(FORWARD))
def test_the_classifier_forward_is_the_librarys(name):
    case = FORWARD[name]
    loaded = classifier(name)
    with torch.no_grad():
        logits = loaded.network(case["x"], case["t"])
    assert case["logits"].abs().max() > 1  # logits of a few units, not ~0
    assert (logits - case["logits"]).abs().max() <= 1e-5 * case["logits"].abs().max()
    assert loaded.image_size == 16 and loaded.num_classes == 1000


@pytest.mark.parametrize("key", sorted(CHAINS))
def test_guided_chains_are_the_librarys(key):
    case = CHAINS[key]
    pipeline = model(case["model"], case["changes"])
    options = dict(timestep_respacing=case["timestep_respacing"], sampler=case["sampler"],
                   seed=case["seed"], class_labels=case["labels"].tolist())  # fmt: skip
    if case["eta"]:
        options["eta"] = case["eta"]
    guide = classifier(case["classifier"])
    images = pipeline.sample(
        2, classifier=guide, classifier_scale=case["classifier_scale"], **options
    )
    # Guidance moved the library's images well beyond the tolerance, so the match tests it.
    assert (case["final"] - case["unguided"]).abs().max() > 10 * TOLERANCE
    assert (images - case["final"]).abs().max() <= TOLERANCE
    if pipeline.num_classes is None:  # the labels went to the classifier only
        options.pop("class_labels")
    unguided = pipeline.sample(2, **options) if pipeline.num_classes is None else None
    if unguided is not None:
        assert (unguided - case["unguided"]).abs().max() <= TOLERANCE


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("key", sorted(CHAINS))
def test_engine_guided_chains_are_the_librarys(key, dtype):
    """The engine's step with the classifier's forward and backward in it (the PyTorch step on
    the CPU: ONNX Runtime cannot differentiate), fp32 within the bound; bf16 (the classifier
    and its gradient in fp32) nearer the library than the unguided chain is."""
    case = CHAINS[key]
    options = dict(timestep_respacing=case["timestep_respacing"], sampler=case["sampler"],
                   seed=case["seed"], class_labels=case["labels"].tolist())  # fmt: skip
    if case["eta"]:
        options["eta"] = case["eta"]
    engine = Engine(model(case["model"], case["changes"]), dtype=dtype)
    guide = classifier(case["classifier"])
    images = engine.sample(
        2, classifier=guide, classifier_scale=case["classifier_scale"], **options
    )
    error = (images - case["final"]).abs().max()
    if dtype == "fp32":
        assert error <= TOLERANCE
    else:  # seen: 7e-4 to 1.7e-3
        assert error <= 5e-3 and error < (case["final"] - case["unguided"]).abs().max()


def test_labels_are_drawn_per_sample_index_for_the_classifier():
    """No labels: guided towards the labels drawn from the seed, as class-conditional models."""
    from ddpm_fast.class_labels import draw_labels

    pipeline = model("guided_uncond")
    guide = dict(classifier=classifier("classifier_adaptive"), classifier_scale=10.0, steps=4)
    drawn = pipeline.sample(3, seed=2, **guide)
    given = pipeline.sample(3, seed=2, class_labels=draw_labels(2, range(3), 1000), **guide)
    other = pipeline.sample(3, seed=2, class_labels=[5, 6, 7], **guide)
    assert torch.equal(drawn, given) and (drawn - other).abs().max() > 10 * TOLERANCE


def test_the_classifier_flags_are_read_and_checked():
    text = ("--image_size 16 --classifier_attention_resolutions 8 --classifier_depth 1 "
            "--classifier_width 32 --classifier_pool attention --classifier_resblock_updown True "
            "--classifier_use_scale_shift_norm True --classifier_use_fp16 True")  # fmt: skip
    path = FIXTURES / "classifier_attention.pt"
    loaded = ddpm_fast.load_classifier(path, text, num_head_channels=HEAD_CHANNELS)
    assert loaded.config.pool == "attention" and "fp32" in " ".join(loaded.notes)
    for change, named in [
        (dict(classifier_width=64), "classifier_width 64, but the classifier's weights say 32"),
        (dict(classifier_depth=2), "classifier_depth"),
        (dict(classifier_attention_resolutions="16"), "attention at 8"),
        (dict(image_size=32), "weights are for 16"),
        (dict(classifier_pool="adaptive"), "classifier_pool"),
        (dict(classifier_sharpness=1), "unknown classifier flags"),
    ]:
        with pytest.raises(ConfigError, match=named) as error:
            classifier("classifier_attention", **change)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="give image_size"):
        ddpm_fast.load_classifier(FIXTURES / "classifier_adaptive.pt",
                                  num_head_channels=HEAD_CHANNELS)  # fmt: skip
    with pytest.raises(ConfigError, match="not a bool"):
        adm_classifier.parse_classifier_flags(
            "--classifier_pool attention --classifier_resblock_updown maybe"
        )


def test_a_classifier_and_a_diffusion_model_are_not_taken_for_each_other():
    with pytest.raises(CheckpointError, match="a diffusion model, not a classifier"):
        ddpm_fast.load_classifier(FIXTURES / "guided_cond.pt")
    with pytest.raises(CheckpointError, match="load_classifier"):
        ddpm_fast.load(FIXTURES / "classifier_attention.pt", image_size=16)


def test_bad_guidance_is_one_line_each(tmp_path):
    pipeline = model("guided_uncond")
    guide = classifier("classifier_attention")
    other_size = {k: v for k, v in flags("guided_uncond").items() if k != "attention_resolutions"}
    big = ddpm_fast.load(FIXTURES / "guided_uncond.pt", **{**other_size, "image_size": 32})
    cases = [
        (pipeline, dict(classifier=guide, classifier_scale=float("inf")), "finite"),
        (pipeline, dict(classifier=guide, class_labels=[1000, 1]), "1000"),
        (big, dict(classifier=guide), "for 16 px images"),
        (pipeline, dict(classifier="clf.pt"), "load_classifier"),
        (pipeline, dict(classifier=guide, sampler="dpm++2m"), "ddpm and ddim"),
        (Engine(pipeline), dict(classifier=guide, classifier_scale=float("nan")), "finite"),
    ]
    for sampler, options, named in cases:
        with pytest.raises(ConfigError, match=named) as error:
            sampler.sample(2, steps=2, **options)
        assert "\n" not in str(error.value)


def test_a_guided_run_records_its_classifier(tmp_path):
    """A resume with another scale is refused: the classifier and scale are the run's."""
    pipeline = model("guided_uncond")
    guide = classifier("classifier_adaptive")
    folder = tmp_path / "folder"
    pipeline.sample_to(folder, 2, steps=3, classifier=guide, classifier_scale=2.0)
    manifest = " ".join(p.read_text() for p in folder.rglob("*.json"))
    assert guide.identity()["weights_sha256"] in manifest
    with pytest.raises(ddpm_fast.DdpmFastError, match="classifier"):
        pipeline.sample_to(folder, 2, steps=3, classifier=guide, classifier_scale=3.0)


@pytest.mark.gpu
@pytest.mark.parametrize("key", sorted(CHAINS))
def test_the_guided_step_in_a_cuda_graph_is_the_librarys(key):
    """The classifier's forward and backward captured in the step's graph, with no fallback."""
    import warnings

    case = CHAINS[key]
    options = dict(timestep_respacing=case["timestep_respacing"], sampler=case["sampler"],
                   seed=case["seed"], class_labels=case["labels"].tolist(), device="cuda",
                   classifier=classifier(case["classifier"]),
                   classifier_scale=case["classifier_scale"])  # fmt: skip
    if case["eta"]:
        options["eta"] = case["eta"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns: fail instead
        graphed = Engine(model(case["model"], case["changes"]), cuda_graph=True).sample(
            2, **options
        )
    eager = Engine(model(case["model"], case["changes"]), cuda_graph=False).sample(2, **options)
    assert (graphed - eager).abs().max() <= 1e-5
    assert (graphed - case["final"]).abs().max() <= TOLERANCE


def _flag_string(name: str) -> str:
    return " ".join(f"--{k} {v}" for k, v in flags(name).items())


def test_the_cli_samples_guided_chains(tmp_path, capsys):
    """``sample MODEL --classifier CLF --classifier-scale S --class-labels 207``: the engine's
    guided images (fp32), label_ids written; a classifier with --onnx is one line."""
    import numpy as np

    from ddpm_fast.cli import main

    out = tmp_path / "guided.npz"
    argv = [
        str(FIXTURES / "guided_uncond.pt"), "--model-flags", _flag_string("guided_uncond"),
        "--classifier", str(FIXTURES / "classifier_attention.pt"),
        "--classifier-flags", _flag_string("classifier_attention"),
        "--classifier-num-head-channels", str(HEAD_CHANNELS), "--classifier-scale", "10",
        "--class-labels", "207", "--timestep-respacing", "25", "-n", "2", "--seed", "3",
    ]  # fmt: skip
    assert main(["sample", *argv, "--out", str(out)]) == 0
    want = model("guided_uncond").sample(
        2, timestep_respacing="25", seed=3, class_labels=207,
        classifier=classifier("classifier_attention"), classifier_scale=10.0,
    )  # fmt: skip
    with np.load(out) as data:
        assert data["label_ids"].tolist() == [207, 207]
        images = data["arr_0"].astype(np.float64) / 255
    assert np.abs(images - want.permute(0, 2, 3, 1).numpy()).max() <= 1 / 255 + 1e-6
    for extra, named in [
        (["--classifier-scale", "nan"], "classifier_scale must be finite"),
        (["--sampler", "dpm++2m"], "ddpm and ddim"),
    ]:
        assert main(["sample", *argv, *extra, "--out", str(tmp_path / "x.npz")]) == 2
        assert named in capsys.readouterr().err
