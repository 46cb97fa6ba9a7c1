"""OpenAI's ADM U-Nets (guided-diffusion, improved-diffusion) against the libraries' own outputs:
fixtures made by their code (tests/fixtures/make_adm.py), read back as users hold them (a bare
state_dict and the flags it was made with)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ddpm_fast
from ddpm_fast.engine import Engine
from ddpm_fast.errors import CheckpointError, ConfigError
from ddpm_fast.models import adm

FIXTURES = Path(__file__).parent / "fixtures" / "adm"
FORWARD = torch.load(FIXTURES / "forward.pt", weights_only=True)
CHAINS = torch.load(FIXTURES / "chains.pt", weights_only=True)


def flags(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def load(name: str, **changes) -> ddpm_fast.Pipeline:
    return ddpm_fast.load(FIXTURES / f"{name}.pt", **{**flags(name), **changes})


@pytest.mark.parametrize("name", sorted(FORWARD))
def test_the_forward_is_the_librarys(name):
    case = FORWARD[name]
    pipeline = load(name)
    labels = {} if case["y"] is None else {"class_labels": case["y"]}
    with torch.no_grad():
        out = pipeline.network(case["x"], case["t"], **labels)
    scale = case["out"].abs().max()
    assert scale > 0.1  # the fixture is not trivial
    assert (out - case["out"]).abs().max() <= 1e-5 * scale


def test_the_weights_fix_the_config_and_the_flags_the_rest():
    config = load("guided_cond").config
    assert config.library == "guided-diffusion"
    assert (config.model_channels, config.num_res_blocks, config.channel_mult) == (32, 1, (1, 1))
    assert config.num_classes == 1000 and config.out_channels == 6
    assert config.attention_ds == (2,) and config.resblock_updown and config.use_scale_shift_norm
    assert config.num_head_channels == 16 and config.use_new_attention_order
    improved = load("improved_cifar")
    assert improved.config.library == "improved-diffusion"
    assert improved.config.timestep_scale == 1000 / 4000  # rescale_timesteps, its default
    assert improved.diffusion.schedule.timesteps == 4000
    assert improved.diffusion.variance == "learned_range"
    xstart = load("guided_xstart")
    assert xstart.diffusion.objective == "pred_x0"
    assert xstart.diffusion.variance == "fixed_large"  # sigma_small not given
    assert load("improved_sigma_small").diffusion.variance == "fixed_small"


def test_info_lists_every_assumed_value():
    weights = FIXTURES / "guided_uncond.pt"
    notes = " ".join(ddpm_fast.load(weights, image_size=16).notes)
    for assumed in ("num_heads=4", "rescale_timesteps=False", "noise_schedule=linear",
                    "diffusion_steps=1000"):  # fmt: skip
        assert assumed in notes
    given = " ".join(load("guided_uncond").notes)
    assert "noise_schedule=linear" not in given and "num_head_channels" not in given


def _chain_options(case: dict) -> dict:
    options = dict(
        timestep_respacing=case["timestep_respacing"], sampler=case["sampler"], seed=case["seed"]
    )
    if case["eta"]:
        options["eta"] = case["eta"]
    if case["labels"] is not None:
        options["class_labels"] = case["labels"].tolist()
    return options


@pytest.mark.parametrize("key", sorted(CHAINS))
def test_whole_chains_are_the_librarys(key):
    case = CHAINS[key]
    pipeline = load(case["model"])
    images = pipeline.sample(len(case["final"]), **_chain_options(case))
    assert (images - case["final"]).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "key, executor",
    [
        ("guided_cond-ddpm-25-eta0.0", "auto"),  # class labels: the PyTorch step
        ("guided_cond-ddim-ddim10-eta0.5", "auto"),
        ("guided_uncond-ddpm-25-eta0.0", "onnxruntime"),
        ("guided_xstart-ddpm-4,3,5-eta0.0", "onnxruntime"),
        ("improved_cifar-ddpm-50-eta0.0", "torch"),
    ],
)
def test_engine_chains_are_the_librarys(key, executor):
    """The engine: the class-conditional model on its PyTorch step (labels per sample), the
    unconditional ones on the CPU executor (ONNX Runtime) and on the PyTorch step."""
    if executor == "onnxruntime":
        pytest.importorskip("onnxruntime")
    case = CHAINS[key]
    engine = Engine(load(case["model"]), cpu_executor=executor)
    images = engine.sample(len(case["final"]), **_chain_options(case))
    assert (images - case["final"]).abs().max() <= 1e-4


def test_dpm_solver_on_a_learned_sigma_model():
    """DPM-Solver++ reads the first half of a learned-sigma output as eps (as diffusers' does);
    the libraries have no such sampler: the engine against the reference."""
    pipeline = load("guided_cond")
    options = dict(sampler="dpm++2m", steps=6, seed=1, class_labels=[1, 2])
    assert pipeline.sampler_spec("dpm++2m", 6).timestep_spacing != "sections"
    want = pipeline.sample(2, **options)
    assert torch.isfinite(want).all() and want.std() > 0.05
    got = Engine(pipeline).sample(2, **options)
    assert (got - want).abs().max() <= 1e-4


def test_steps_visit_the_libraries_timesteps():
    pipeline = load("guided_cond")
    assert pipeline.sampler_spec("ddpm", 25).timestep_spacing == "sections"
    assert pipeline.sampler_spec("ddim", 10).timestep_spacing == "ddim-stride"
    spec = pipeline.sampler_spec(timestep_respacing="4,3,5")
    assert (spec.steps, spec.section_counts) == (12, (4, 3, 5))
    with pytest.raises(ConfigError, match="means steps 25"):
        pipeline.sampler_spec(steps=30, timestep_respacing="25")


def test_drawn_labels_are_per_sample_index():
    pipeline = load("guided_cond")
    together = pipeline.sample(3, steps=2, seed=5)
    apart = torch.cat([pipeline.sample(1, steps=2, seed=5, start_index=i) for i in range(3)])
    # The same labels and noise per sample (a batch's convolutions may round differently).
    assert (together - apart).abs().max() <= 1e-5
    from ddpm_fast.class_labels import draw_labels

    drawn = draw_labels(5, range(3), 1000)
    assert len(set(drawn)) == 3
    given = pipeline.sample(3, steps=2, seed=5, class_labels=drawn)
    assert torch.equal(given, together)
    other = pipeline.sample(3, steps=2, seed=5, class_labels=[(c + 1) % 1000 for c in drawn])
    assert (other - together).abs().max() > 1e-4  # a label changes the image


def test_label_ids_are_written_and_a_resume_with_other_labels_is_refused(tmp_path):
    pipeline = load("guided_cond")
    out = tmp_path / "x.npz"
    pipeline.sample_to(out, 3, steps=2, seed=1, class_labels=[4, 5, 6])
    import numpy as np

    with np.load(out) as data:
        assert data["label_ids"].tolist() == [4, 5, 6]
        assert data["arr_0"].shape == (3, 16, 16, 3)
    drawn = tmp_path / "drawn.npz"
    pipeline.sample_to(drawn, 2, steps=2, seed=1, batch_size=1)
    from ddpm_fast.class_labels import draw_labels

    with np.load(drawn) as data:
        assert data["label_ids"].tolist() == draw_labels(1, range(2), 1000)
    folder = tmp_path / "folder"
    pipeline.sample_to(folder, 2, steps=2, seed=1, class_labels=3)
    with pytest.raises(Exception, match="class_labels"):
        pipeline.sample_to(folder, 2, steps=2, seed=1, class_labels=4)


@pytest.mark.parametrize(
    "labels, message",
    [
        (1000, r"outside \[0, 1000\)"),
        (-1, "outside"),
        ([1, 2], "2 class labels for 3 images"),
        ("7", "an int or a sequence"),
        ([1.5, 2, 3], "must be integers"),
        (True, "an int or a sequence"),
    ],
)
def test_bad_labels_are_one_line(labels, message):
    with pytest.raises(ConfigError, match=message):
        load("guided_cond").sample(3, steps=1, class_labels=labels)


def test_labels_for_an_unconditional_model_are_refused():
    with pytest.raises(ConfigError, match="not class-conditional"):
        load("guided_uncond").sample(1, steps=1, class_labels=3)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_channels=64), "num_channels 64 contradicts the weights, which say 32"),
        (dict(class_cond=False), "class_cond False contradicts the weights"),
        (dict(learn_sigma=False), "learn_sigma False contradicts"),
        (dict(attention_resolutions="16"), "attention_resolutions 16 contradicts"),
        (dict(num_head_channels=24), "num_head_channels=24 does not divide"),
        (dict(noise_schedule="sqrt"), "noise_schedule must be linear or cosine"),
        (dict(unknown_flag=1), "unknown option"),
    ],
)
def test_flags_that_contradict_the_weights_are_one_line(change, message):
    with pytest.raises((ConfigError, CheckpointError), match=message):
        load("guided_cond", **change)


def test_a_classifier_a_super_resolution_model_and_a_missing_key_are_one_line(tmp_path):
    weights = torch.load(FIXTURES / "guided_uncond.pt", weights_only=True)
    classifier = {k: v for k, v in weights.items() if not k.startswith(("output_blocks", "out."))}
    classifier["out.0.weight"] = torch.ones(32)
    torch.save(classifier, tmp_path / "classifier.pt")
    with pytest.raises(CheckpointError, match="classifier"):
        ddpm_fast.load(tmp_path / "classifier.pt", image_size=16)
    superres = dict(weights)
    superres["input_blocks.0.0.weight"] = torch.zeros(32, 6, 3, 3)
    torch.save(superres, tmp_path / "superres.pt")
    with pytest.raises(CheckpointError, match="super-resolution"):
        ddpm_fast.load(tmp_path / "superres.pt", image_size=16)
    missing = {k: v for k, v in weights.items() if k != "middle_block.1.qkv.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="middle_block.1.qkv.bias"):
        ddpm_fast.load(tmp_path / "missing.pt", image_size=16)


def test_half_precision_weights_load_as_float32(tmp_path):
    weights = torch.load(FIXTURES / "guided_uncond.pt", weights_only=True)
    half = {k: v.half() if k.startswith(("input_blocks", "middle", "output_blocks")) else v
            for k, v in weights.items()}  # fmt: skip
    torch.save(half, tmp_path / "fp16.pt")
    pipeline = ddpm_fast.load(tmp_path / "fp16.pt", **flags("guided_uncond"))
    assert any("float16 weights" in note for note in pipeline.notes)
    assert all(p.dtype == torch.float32 for p in pipeline.network.parameters())


def test_the_config_round_trips():
    config = load("guided_cond").config
    assert adm.UnetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
