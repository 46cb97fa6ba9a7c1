"""The 2.x reference network, its config inference, its files and its chains against
denoising-diffusion-pytorch 2.3.4 (fixtures made by tests/fixtures/make_dd_pytorch_v2.py)."""

from __future__ import annotations

import collections
import json
import re
from functools import cache
from pathlib import Path

import pytest
import torch

from ddpm_fast import checkpoints
from ddpm_fast.engine import FastUnet
from ddpm_fast.engine.families import dd_pytorch_v2 as fast_v2
from ddpm_fast.errors import CheckpointError, ConfigError
from ddpm_fast.models import dd_pytorch_v1, dd_pytorch_v2
from ddpm_fast.models.dd_pytorch_v2 import Unet, UnetConfig, infer_config, matches
from ddpm_fast.pipeline import DiffusionConfig, Pipeline
from ddpm_fast.samplers import sample_loop, step_tables
from ddpm_fast.schedule import Schedule, ScheduleConfig

from .helpers import rel_error

FIXTURES = Path(__file__).parent / "fixtures" / "dd_pytorch_v2"
V1_FIXTURES = Path(__file__).parent / "fixtures" / "dd_pytorch_v1"
# Constructor arguments that do not change the function at inference (flash_attn computes the
# same attention with F.scaled_dot_product_attention; dropout is off in eval).
INFERENCE_IRRELEVANT = ("flash_attn", "dropout")


@cache
def network_fixtures() -> dict:
    return torch.load(FIXTURES / "networks.pt", weights_only=True)


@cache
def chain_fixtures() -> dict:
    return torch.load(FIXTURES / "chains.pt", weights_only=True)


def network_kwargs(name: str) -> dict:
    return json.loads(network_fixtures()[name]["kwargs"])


def unstored_options(name: str) -> dict:
    """The fixture network's constructor arguments that its state_dict does not determine."""
    kwargs = network_kwargs(name)
    return {k: kwargs[k] for k in dd_pytorch_v2.UNSTORED_DEFAULTS if k in kwargs}


def library_unet(name: str) -> Unet:
    case = network_fixtures()[name]
    network = Unet(infer_config(case["state_dict"], **unstored_options(name)))
    network.load_state_dict(case["state_dict"], strict=True)
    return network.eval()


NAMES = list(network_fixtures())
CHAINS = list(chain_fixtures())


def test_fixtures_cover_the_issue():
    """Full attention at an outer stage, memory key/values, self-conditioning, learned
    sinusoidal features, learned variance: each in at least one fixture network."""
    kwargs = [network_kwargs(n) for n in NAMES]
    assert any(k.get("self_condition") for k in kwargs)
    assert any(isinstance(k.get("full_attn"), list) and k["full_attn"][0] for k in kwargs)
    assert any(k.get("learned_sinusoidal_cond") for k in kwargs)
    assert any(k.get("learned_variance") for k in kwargs)
    assert all(any(".mem_kv" in key for key in network_fixtures()[n]["state_dict"]) for n in NAMES)
    versions = json.loads((FIXTURES / "versions.json").read_text())
    assert versions["denoising-diffusion-pytorch"] == dd_pytorch_v2.LIBRARY_VERSION


# the network


@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_the_library(name):
    case = network_fixtures()[name]
    with torch.no_grad():
        out = library_unet(name)(case["x"], case["t"], case["x_self_cond"])
    assert out.shape == case["output"].shape
    assert rel_error(out, case["output"]) <= 1e-5


def test_self_condition_defaults_to_zeros_as_the_library():
    case = network_fixtures()["full_attn_self_cond"]
    with torch.no_grad():
        out = library_unet("full_attn_self_cond")(case["x"], case["t"])
    assert rel_error(out, case["output_without_self_cond"]) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_config_inferred_from_shapes_is_the_constructors(name):
    kwargs = {k: v for k, v in network_kwargs(name).items() if k not in INFERENCE_IRRELEVANT}
    config = infer_config(network_fixtures()[name]["state_dict"], **unstored_options(name))
    expected = UnetConfig(**kwargs)
    if expected.random_fourier_features:  # same function as learned features; reads as learned
        expected.random_fourier_features = False
        expected.learned_sinusoidal_cond = True
    assert config == expected


def test_config_round_trips_through_its_dict():
    config = infer_config(network_fixtures()["full_attn_self_cond"]["state_dict"])
    d = json.loads(json.dumps(config.to_dict()))
    assert d["family"] == dd_pytorch_v2.FAMILY
    assert UnetConfig.from_dict(d) == config


def test_theta_is_not_in_the_state_dict_and_changes_the_function():
    """Why sinusoidal_pos_emb_theta is an option: with the library's default of 10000 instead
    of the 1000 this network was built with, the weights load and the function differs."""
    case = network_fixtures()["flash_theta_out_dim"]
    network = Unet(infer_config(case["state_dict"]))
    network.load_state_dict(case["state_dict"], strict=True)
    with torch.no_grad():
        out = network(case["x"], case["t"])
    assert rel_error(out, case["output"]) > 1e-3


def test_memory_key_values_change_the_function():
    """mem_kv is live in both attentions: moving it moves the output."""
    case = network_fixtures()["full_attn_self_cond"]
    for key in ("downs.0.2.mem_kv", "downs.1.2.mem_kv"):  # a full and a linear attention
        network = library_unet("full_attn_self_cond")
        with torch.no_grad():
            network.get_parameter(key).add_(0.5)
            out = network(case["x"], case["t"], case["x_self_cond"])
        assert rel_error(out, case["output"]) > 1e-4, key


# recognising a 2.x state_dict


@pytest.mark.parametrize("name", NAMES)
def test_two_x_state_dicts_are_recognised(name):
    assert matches(network_fixtures()[name]["state_dict"])


def test_one_x_state_dicts_are_not():
    v1 = torch.load(V1_FIXTURES / "networks.pt", weights_only=True)
    for case in v1.values():
        assert not matches(case["state_dict"])
    assert not matches(torch.load(V1_FIXTURES / "unet_state_dict.pt", weights_only=True))


def test_one_x_reader_refuses_a_two_x_state_dict():
    """The other way round: 1.x's infer_config does not read 2.x weights as its own."""
    with pytest.raises(CheckpointError, match="downs.0.2.fn.fn.to_qkv.weight"):
        dd_pytorch_v1.infer_config(network_fixtures()["defaults"]["state_dict"])


# bad state_dicts and configs: one-line errors naming what is wrong


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_state_dict_of_another_network_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="time_mlp.1.weight") as err:
        infer_config({"conv.weight": torch.ones(3, 3, 1, 1)})
    _one_line(err)


def test_a_missing_attention_is_a_checkpoint_error():
    state = dict(network_fixtures()["defaults"]["state_dict"])
    del state["downs.1.2.mem_kv"]
    with pytest.raises(CheckpointError, match=r"downs\.1\.2\.mem_kv") as err:
        infer_config(state)
    _one_line(err)


def test_a_mis_shaped_mem_kv_is_a_checkpoint_error():
    state = dict(network_fixtures()["defaults"]["state_dict"])
    state["downs.0.2.mem_kv"] = torch.ones(3, 4, 32)
    with pytest.raises(CheckpointError, match=r"downs\.0\.2\.mem_kv has shape \[3, 4, 32\]"):
        infer_config(state)


def test_weights_that_do_not_fit_are_one_checkpoint_error(tmp_path):
    """A shape the config inference does not read (a mid block conv) is caught when the
    network is laid out against the weights (checkpoints.build_network)."""
    state = dict(network_fixtures()["defaults"]["state_dict"])
    state["mid_block1.block1.proj.weight"] = torch.ones(16, 16, 1, 1)
    config = infer_config(state)
    with pytest.raises(CheckpointError, match="mid_block1.block1.proj.weight") as err:
        checkpoints.build_network(tmp_path / "x.pt", dd_pytorch_v2, config, state)
    _one_line(err)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attn_heads": (2, 2, 2)}, "attn_heads must have one entry per stage"),
        ({"full_attn": (True,)}, "full_attn must have one entry per stage"),
        ({"attn_dim_head": 0}, "attn_dim_head must be at least 1"),
        ({"full_attn": (1, 0)}, "full_attn must be true or false"),
        ({"num_mem_kv": -1}, "num_mem_kv must be at least 0"),
        ({"learned_sinusoidal_cond": True, "learned_sinusoidal_dim": 7}, "must be even"),
        ({"dim_mults": ()}, "dim_mults must be a list"),
        ({"dim": 7}, "dim must be even and at least 4"),
        ({"dim": 2}, "dim must be even and at least 4"),
    ],
)
def test_bad_configs_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        UnetConfig(**{"dim": 8, "dim_mults": (1, 2), **kwargs})


def test_options_the_weights_fix_are_refused():
    with pytest.raises(ConfigError, match="attn_heads: not options of dd-pytorch-v2"):
        infer_config(network_fixtures()["defaults"]["state_dict"], attn_heads=2)


def test_unknown_fields_in_a_saved_config_are_config_errors():
    d = UnetConfig(dim=8, dim_mults=(1, 2)).to_dict() | {"resnet_block_groups": 8}
    with pytest.raises(ConfigError, match="resnet_block_groups"):
        UnetConfig.from_dict(d)


# the library's files


def read_pipeline(path: Path, *, use_ema: bool = True) -> Pipeline:
    return checkpoints.load_checkpoint(path, use_ema=use_ema, image_size=8)


def test_a_bare_unet_state_dict_is_read_as_two_x_with_what_it_assumed():
    pipeline = read_pipeline(FIXTURES / "unet_state_dict.pt")
    assert pipeline.config.family == dd_pytorch_v2.FAMILY
    assert pipeline.config == infer_config(network_fixtures()["full_attn_self_cond"]["state_dict"])
    notes = " ".join(pipeline.notes)
    assert "dd-pytorch-v2" in notes
    assert "sinusoidal_pos_emb_theta=10000 assumed" in notes


def test_a_diffusion_state_dict_gives_schedule_and_objective():
    pipeline = read_pipeline(FIXTURES / "diffusion_state_dict.pt")
    assert pipeline.diffusion.schedule.name == "cosine"
    assert pipeline.diffusion.schedule.timesteps == 50
    assert pipeline.diffusion.objective == "pred_x0"
    assert pipeline.config == infer_config(network_fixtures()["full_attn_self_cond"]["state_dict"])
    bare = torch.load(FIXTURES / "unet_state_dict.pt", weights_only=True)
    for key, value in pipeline.network.state_dict().items():
        assert torch.equal(value, bare[key]), key


def test_a_trainer_checkpoint_reads_ema_weights_by_default():
    ema = read_pipeline(FIXTURES / "trainer.pt")
    online = read_pipeline(FIXTURES / "trainer.pt", use_ema=False)
    assert ema.diffusion.schedule.name == "linear"
    assert ema.diffusion.schedule.timesteps == 30
    assert ema.diffusion.objective == "pred_noise"
    raw = torch.load(FIXTURES / "trainer.pt", weights_only=True)
    key = "init_conv.weight"
    assert torch.equal(ema.network.state_dict()[key], raw["ema"][f"ema_model.model.{key}"])
    assert torch.equal(online.network.state_dict()[key], raw["model"][f"model.{key}"])
    assert not torch.equal(raw["ema"][f"ema_model.model.{key}"], raw["model"][f"model.{key}"])


# whole chains, with the library's own noise replayed


def chain_pipeline(name: str) -> Pipeline:
    case = chain_fixtures()[name]
    weights = network_fixtures()[case["network"]]["state_dict"]
    ckpt = checkpoints.Checkpoint(Path(name), "diffusion", weights, case["buffers"])
    network = checkpoints.build_network(ckpt.path, dd_pytorch_v2, infer_config(weights), weights)
    schedule = checkpoints._resolve_schedule(ckpt, {})
    objective = checkpoints._objective_from_loss_weight(ckpt.buffers, Schedule(schedule))
    diffusion = DiffusionConfig(
        image_size=case["image_size"], schedule=schedule, objective=objective
    )
    return Pipeline(network, diffusion, source=name)


def replay(noises):
    """A noise function that hands out the library's recorded draws in order."""
    draws = iter(noises)

    def noise_fn(step, shape):
        noise = next(draws)
        assert tuple(noise.shape) == shape
        return noise

    return noise_fn


@pytest.mark.parametrize("name", CHAINS)
def test_chain_equals_the_library(name):
    case = chain_fixtures()[name]
    kwargs = json.loads(case["diffusion_kwargs"])
    pipeline = chain_pipeline(name)
    # Schedule and objective are read from the buffers, not passed.
    assert pipeline.diffusion.schedule.name == kwargs["beta_schedule"]
    assert pipeline.diffusion.schedule.timesteps == kwargs["timesteps"]
    assert pipeline.diffusion.objective == kwargs["objective"]

    steps = kwargs.get("sampling_timesteps", kwargs["timesteps"])
    sampler = "ddim" if steps < kwargs["timesteps"] else "ddpm"
    spec = pipeline.sampler_spec(sampler, steps, kwargs.get("ddim_sampling_eta", 0.0))
    noises = list(case["step_noises"])
    if sampler == "ddim":  # the library draws noise at every DDIM step but the last, used or not
        assert len(noises) == steps - 1
        noises = noises if spec.eta > 0 else []
    tables = step_tables(pipeline.schedule, spec)
    trajectory = [case["initial_noise"]]
    with torch.no_grad():
        sample_loop(
            pipeline.network,
            case["initial_noise"],
            tables,
            spec,
            pipeline.diffusion.objective,
            replay(noises),
            on_step=lambda k, x: trajectory.append(x),
        )
    trajectory = (torch.stack(trajectory, dim=1) + 1) * 0.5
    assert trajectory.shape == case["trajectory"].shape
    assert rel_error(trajectory, case["trajectory"]) <= 1e-4


# the engine and the exporter, against the reference


@pytest.mark.parametrize("name", NAMES)
def test_the_engine_network_is_the_reference(name):
    case = network_fixtures()[name]
    network = library_unet(name)
    timesteps = torch.tensor([999, 500, 1, 0])
    fast = FastUnet(network, timesteps)
    assert isinstance(fast.body, fast_v2.FastUnetV2)
    x, cond = case["x"], case["x_self_cond"]
    with torch.no_grad():
        for k, t in enumerate(timesteps.tolist()):
            want = network(x, torch.full((x.shape[0],), t), cond)
            got = fast(x, torch.tensor([k]), cond)
            assert got.shape == want.shape
            assert rel_error(got, want) <= 1e-4, (name, t)


def test_the_engine_swaps_every_block_and_attention():
    """Every reference Block and attention of the network has its fast module (none of the
    reference's modules that the kernels replace is left in the engine's network)."""
    network = library_unet("full_attn_self_cond")
    fast = FastUnet(network, torch.tensor([3]))
    kinds = {type(m) for m in fast.modules()}
    assert not kinds & {
        dd_pytorch_v2.Block,
        dd_pytorch_v2.RMSNorm,
        dd_pytorch_v2.Attention,
        dd_pytorch_v2.LinearAttention,
    }
    count = collections.Counter(type(m).__name__ for m in fast.modules())
    # 3 stages: 2 blocks down and up each, 2 in the middle, 1 final -> 15 ResnetBlocks
    assert count["FastResnetBlock"] == 15 and count["FastBlock"] == 30
    # full attention at stages 0 and 2 (down and up) and in the middle, linear at stage 1
    assert count["FastAttention"] == 5 and count["FastLinearAttention"] == 2


@pytest.mark.slow
def test_the_engine_kernels_are_the_reference(monkeypatch):
    """The fused kernels (channel RMSNorm + scale/shift + SiLU, linear attention with memory),
    forced on and interpreted where there is no GPU, in one engine forward."""
    from ddpm_fast.kernels import HAS_TRITON, channel_norm, linear_attention

    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    launched = set()
    for module in (channel_norm, linear_attention):

        def forced(backend, x, kernel, module=module):
            launched.add(module.__name__.rsplit(".", 1)[1])
            return True

        monkeypatch.setattr(module, "use_triton", forced)
    case = network_fixtures()["full_attn_self_cond"]
    network = library_unet("full_attn_self_cond")
    fast = FastUnet(network, torch.tensor([321]))
    x, cond = case["x"][:1], case["x_self_cond"][:1]
    with torch.no_grad():
        want = network(x, torch.tensor([321]), cond)
        got = fast(x, torch.tensor([0]), cond)
    assert launched == {"channel_norm", "linear_attention"}
    assert rel_error(got, want) <= 1e-4


def test_the_unet_graph_of_the_exporter_is_the_reference():
    """What ``ddpm-fast export --what unet`` traces (the family's time_conditioning and
    forward_conditioned), run in PyTorch."""
    from ddpm_fast.export.graph import UnetGraph

    case = network_fixtures()["full_attn_self_cond"]
    network = library_unet("full_attn_self_cond")
    pipeline = Pipeline(network, DiffusionConfig(image_size=8))
    graph = UnetGraph(pipeline)
    with torch.no_grad():
        want = network(case["x"], case["t"], case["x_self_cond"])
        got = graph(case["x"], case["t"], case["x_self_cond"])
    assert rel_error(got, want) <= 1e-5


@pytest.mark.parametrize(
    ("what", "options"),
    [("unet", dict(steps=4)), ("step", dict(sampler="ddim", steps=4, eta=0.5))],
)
def test_onnx_export_is_verified_against_the_reference(tmp_path, what, options):
    """Full and linear attention with memory key/values, self-conditioning: the exported file
    (batch dynamic) agrees with the reference at batches 1 and 3."""
    pytest.importorskip("onnxruntime")
    from ddpm_fast.export import export_onnx

    network = library_unet("full_attn_self_cond")
    schedule = ScheduleConfig("linear", 100)
    pipeline = Pipeline(network, DiffusionConfig(image_size=8, schedule=schedule))
    result = export_onnx(pipeline, tmp_path / "model.onnx", what=what, **options)
    report = result.report
    assert report.ok, str(report)
    assert {c.batch for c in report.checks} == {1, 3}
    assert max(c.rel for c in report.checks) <= 1e-4


def test_an_engine_chain_gives_the_librarys_images():
    """DDIM with eta 0 is deterministic given x_T: the engine (fused modules, channels_last,
    self-conditioning) gives the library's images."""
    from ddpm_fast.engine import Engine

    name = "ddim_eta0_pred_x0_cosine_self_cond"
    case = chain_fixtures()[name]
    images = Engine(chain_pipeline(name)).sample(
        2, sampler="ddim", steps=5, initial_noise=case["initial_noise"]
    )
    assert rel_error(images, case["trajectory"][:, -1]) <= 1e-4


@pytest.mark.parametrize(
    ("name", "chain"),
    [
        ("ddpm_learned_variance", dict(steps=30)),
        ("ddim_eta05_pred_v_sigmoid", dict(sampler="ddim", steps=7, eta=0.5)),
    ],
)
def test_engine_chains_with_noise_give_the_reference_images(name, chain):
    """With noise (the same counter-based draws on both paths), learned variance included."""
    from ddpm_fast.engine import Engine

    pipeline = chain_pipeline(name)
    want = pipeline.sample(2, seed=5, **chain)
    got = Engine(pipeline).sample(2, seed=5, **chain)
    assert rel_error(got, want) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_half_precision_engine_is_within_twice_pytorchs_own_error(dtype):
    """The engine in half precision (convolutions and matmuls in ``dtype``, the norms' statistics
    in fp32) against the fp32 reference: at most twice the error of the reference network itself
    run in ``dtype`` (flash-attention's rule)."""
    import copy

    from ddpm_fast.engine.network import cast_convolutions

    case = network_fixtures()["full_attn_self_cond"]
    network = library_unet("full_attn_self_cond")
    fast = FastUnet(network, torch.tensor([700]))
    cast_convolutions(fast, dtype)
    x, cond, t = case["x"], case["x_self_cond"], torch.tensor([700, 700])
    with torch.no_grad():
        want = network(x, t, cond)
        # PyTorch's own: the network in dtype, its time conditioning computed in fp32 (as the
        # engine's tables are; a half-precision sinusoid of t ~ 1000 loses its phase)
        half = copy.deepcopy(network).to(dtype)
        time_cond = {k: v.to(dtype) for k, v in network.time_conditioning(t).items()}
        pytorch_half = half.forward_conditioned(x.to(dtype), time_cond, cond.to(dtype)).float()
        got = fast(x.to(dtype), torch.tensor([0]), cond.to(dtype)).float()
    own = rel_error(pytorch_half, want)
    assert 0 < own < 0.1
    assert rel_error(got, want) <= 2 * own


# the command line and bad files


def test_the_command_line_samples_a_trainer_checkpoint_and_info_names_the_family(tmp_path, capsys):
    from ddpm_fast import cli

    path = str(FIXTURES / "trainer.pt")
    assert cli.main(["info", path, "--image-size", "8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == dd_pytorch_v2.FAMILY
    assert info["network"]["full_attn"] == [False, True]
    assert any("sinusoidal_pos_emb_theta=10000 assumed" in n for n in info["notes"])
    assert any("EMA weights" in n for n in info["notes"])
    out = tmp_path / "x.png"
    argv = ["sample", path, "--image-size", "8", "--steps", "3", "--sampler", "ddim", "--num", "2"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert out.is_file()


def _saved(tmp_path, state: dict) -> Path:
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    return path


def test_a_two_x_file_with_a_missing_weight_is_one_checkpoint_error(tmp_path):
    state = dict(torch.load(FIXTURES / "unet_state_dict.pt", weights_only=True))
    del state["ups.0.2.to_out.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: ups\.0\.2\.to_out\.weight") as err:
        checkpoints.load_checkpoint(_saved(tmp_path, state))
    _one_line(err)


def test_a_two_x_file_with_nan_weights_is_one_checkpoint_error(tmp_path):
    state = dict(torch.load(FIXTURES / "unet_state_dict.pt", weights_only=True))
    state["mid_attn.mem_kv"] = torch.full_like(state["mid_attn.mem_kv"], float("nan"))
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in mid_attn\.mem_kv") as err:
        checkpoints.load_checkpoint(_saved(tmp_path, state))
    _one_line(err)


def test_group_norm_blocks_with_two_x_attention_are_no_known_family(tmp_path):
    """denoising-diffusion-pytorch 1.8 to 1.11 had GroupNorm Blocks (``norm.weight``/``bias``)
    and 2.x's attention: neither family reads them, and the error says so in one line."""
    state = {}
    for key, value in network_fixtures()["defaults"]["state_dict"].items():
        if re.search(r"block\d\.norm\.g$", key):
            state[key[:-1] + "weight"] = value.flatten()
            state[key[:-1] + "bias"] = torch.zeros_like(value.flatten())
        else:
            state[key] = value
    with pytest.raises(CheckpointError, match="not a network of any known family") as err:
        checkpoints.load_checkpoint(_saved(tmp_path, state))
    _one_line(err)


def test_the_theta_option_is_not_a_one_x_option(tmp_path):
    """Options are per family: a 1.x file refuses 2.x's sinusoidal_pos_emb_theta."""
    if "sinusoidal_pos_emb_theta" not in checkpoints.UNET_OPTIONS:
        pytest.skip("the registry does not list dd_pytorch_v2 yet (UNET_OPTIONS from FAMILIES)")
    with pytest.raises(ConfigError, match="sinusoidal_pos_emb_theta"):
        checkpoints.load_checkpoint(
            V1_FIXTURES / "unet_state_dict.pt", sinusoidal_pos_emb_theta=1000
        )


# what a GaussianDiffusion file says of its training, and what it cannot come from


def test_training_only_settings_in_a_file_are_noted_or_not_stored():
    """2.3.4 keeps offset_noise_strength, immiscible and auto_normalize as plain attributes: a
    state_dict made with them on has exactly the keys of one made without. min_snr_loss_weight
    shapes the stored loss_weight buffer, so its gamma is read back and noted."""
    path = FIXTURES / "diffusion_training_settings.pt"
    state = torch.load(path, weights_only=True)
    plain = torch.load(FIXTURES / "diffusion_state_dict.pt", weights_only=True)
    buffers = {k for k in state if not k.startswith("model.")}
    assert buffers == {k for k in plain if not k.startswith("model.")}
    pipeline = read_pipeline(path)
    assert pipeline.diffusion.objective == "pred_v"  # read from the min-SNR loss weight
    assert pipeline.diffusion.schedule.name == "linear"
    notes = " ".join(pipeline.notes)
    assert "min_snr_loss_weight (min_snr_gamma 3," in notes
    assert "objective" not in notes  # not assumed
    for name in ("offset_noise", "immiscible"):
        assert name not in notes


def test_a_loss_weight_without_min_snr_is_not_noted():
    pipeline = read_pipeline(FIXTURES / "diffusion_state_dict.pt")
    assert not any("min_snr" in note for note in pipeline.notes)


def test_a_continuous_time_file_is_refused_in_one_line(tmp_path):
    """ContinuousTimeGaussianDiffusion's state_dict looks like a GaussianDiffusion one (model.*
    keys; no buffers) but its network has Fourier features, which GaussianDiffusion refuses."""
    path = FIXTURES / "continuous_time.pt"
    state = torch.load(path, weights_only=True)
    assert all(k.startswith("model.") for k in state) and "model.time_mlp.0.weights" in state
    with pytest.raises(CheckpointError, match="GaussianDiffusion refuses such a network") as err:
        read_pipeline(path)
    message = _one_line(err)
    assert "ContinuousTimeGaussianDiffusion" in message and str(path) in message
    trainer = {"step": 3, "model": state, "ema": {f"ema_model.{k}": v for k, v in state.items()}}
    with pytest.raises(CheckpointError, match="pytorch Trainer checkpoint, but"):
        read_pipeline(_saved(tmp_path, trainer))
    bare = {k.removeprefix("model."): v for k, v in state.items()}  # the network alone: read
    assert read_pipeline(_saved(tmp_path, bare)).config.learned_sinusoidal_cond
    assert dd_pytorch_v2.gaussian_diffusion_refuses(infer_config(bare))
    assert dd_pytorch_v2.gaussian_diffusion_refuses(UnetConfig(dim=8)) is None
