"""Reading the library's files and ddpm-fast's own; clear errors for every bad file."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ddpm_fast
from ddpm_fast.checkpoints import describe, read_checkpoint
from ddpm_fast.errors import CheckpointError, ConfigError

from .helpers import FIXTURES, network_fixtures, rel_error


def forward(pipeline, seed=0):
    """The network on fixed random inputs (non-zero mean, spread != 1)."""
    g = torch.Generator().manual_seed(seed)
    c, size = pipeline.config.channels, 8
    x = torch.randn(2, c, size, size, generator=g) * 1.3 + 0.4
    t = torch.tensor([5, 40])
    with torch.no_grad():
        return pipeline.network(x, t)


def test_bare_unet_state_dict():
    pipeline = ddpm_fast.load(FIXTURES / "unet_state_dict.pt", image_size=8)
    assert pipeline.config.dim == 8 and pipeline.config.dim_mults == (1, 2)
    # nothing in the file says schedule or objective: the library's defaults, said in the notes
    assert pipeline.diffusion.schedule.name == "sigmoid"
    assert pipeline.diffusion.objective == "pred_v"
    assert any("assumed" in note for note in pipeline.notes)


def test_gaussian_diffusion_state_dict_gives_schedule_and_objective():
    pipeline = ddpm_fast.load(FIXTURES / "diffusion_state_dict.pt", image_size=8)
    assert pipeline.diffusion.schedule.name == "cosine"
    assert pipeline.diffusion.schedule.timesteps == 50
    assert pipeline.diffusion.objective == "pred_x0"
    bare = ddpm_fast.load(FIXTURES / "unet_state_dict.pt")  # the same network, saved bare
    assert rel_error(forward(pipeline), forward(bare)) == 0


def test_a_chosen_schedule_is_checked_against_the_buffers():
    path = FIXTURES / "diffusion_state_dict.pt"
    assert ddpm_fast.load(path, beta_schedule="cosine").diffusion.schedule.timesteps == 50
    with pytest.raises(CheckpointError, match="do not match the linear schedule"):
        ddpm_fast.load(path, beta_schedule="linear")
    with pytest.raises(CheckpointError, match="has 50 timesteps, not 1000"):
        ddpm_fast.load(path, timesteps=1000)


def test_trainer_checkpoint_reads_ema_weights_by_default():
    path = FIXTURES / "trainer.pt"
    raw = torch.load(path, weights_only=True)
    ema = ddpm_fast.load(path, image_size=8)
    online = ddpm_fast.load(path, image_size=8, use_ema=False)
    key = "init_conv.weight"
    assert torch.equal(ema.network.state_dict()[key], raw["ema"][f"ema_model.model.{key}"])
    assert torch.equal(online.network.state_dict()[key], raw["model"][f"model.{key}"])
    assert rel_error(forward(ema), forward(online)) > 1e-3
    assert ema.diffusion.schedule.name == "linear" and ema.diffusion.objective == "pred_noise"
    assert any("EMA weights of a Trainer checkpoint at step 7" in note for note in ema.notes)


def test_trainer_checkpoint_without_ema(tmp_path):
    raw = torch.load(FIXTURES / "trainer.pt", weights_only=True)
    del raw["ema"]
    path = tmp_path / "no_ema.pt"
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="without an 'ema' entry.*--online"):
        ddpm_fast.load(path)
    assert ddpm_fast.load(path, use_ema=False).config.channels == 3


def test_own_safetensors_round_trip(tmp_path):
    source = ddpm_fast.load(FIXTURES / "diffusion_state_dict.pt", image_size=8)
    path = ddpm_fast.save_pipeline(source, tmp_path / "model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["family"] == "dd-pytorch-v1"
    assert json.loads(metadata["diffusion"])["schedule"]["name"] == "cosine"
    loaded = ddpm_fast.load(path)  # no further arguments
    assert loaded.config == source.config
    assert loaded.diffusion == source.diffusion
    assert rel_error(forward(loaded), forward(source)) == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_own_file_refuses_network_overrides(tmp_path):
    path = ddpm_fast.save_pipeline(ddpm_fast.load(), tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="stores its network config"):
        ddpm_fast.load(path, channels=3)
    assert ddpm_fast.load(path, variance="fixed_large").diffusion.variance == "fixed_large"


def test_info_describes_the_model():
    info = describe(ddpm_fast.load(FIXTURES / "unet_state_dict.pt"))
    assert info["family"] == "dd-pytorch-v1"
    assert info["parameters"] == sum(
        v.numel() for v in network_fixtures()["default_sinusoidal"]["state_dict"].values()
    )


def test_unknown_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown option.*dims"):
        ddpm_fast.load(FIXTURES / "unet_state_dict.pt", dims=8)


# bad files: one clear CheckpointError naming the file


def saved(tmp_path, obj, name="bad.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def written(path, data: bytes):
    path.write_bytes(data)
    return path


def unet_state():
    return dict(torch.load(FIXTURES / "unet_state_dict.pt", weights_only=True))


class NotATensor:
    pass


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing.pt", "no such file"),
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: written(tmp / "empty.pt", b""), "only 0 bytes"),
        (lambda tmp: written(tmp / "t.txt", b"hello world\n"), "neither a PyTorch checkpoint"),
        (lambda tmp: saved(tmp, [1, 2, 3]), "holds a list, not a state_dict"),
        (lambda tmp: saved(tmp, {"model": NotATensor()}), "does not unpickle arbitrary objects"),
        (lambda tmp: saved(tmp, {"weights": {"a": 1}, "x": 2}), "not a checkpoint ddpm-fast knows"),
    ],
)
def test_unreadable_files(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=message) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)


def test_truncated_file(tmp_path):
    data = (FIXTURES / "unet_state_dict.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: cannot be read as a PyTorch"):
        ddpm_fast.load(path)


def test_truncated_safetensors(tmp_path):
    path = ddpm_fast.save_pipeline(ddpm_fast.load(), tmp_path / "model.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ddpm_fast.load(path)


def test_missing_unexpected_and_misshaped_keys(tmp_path):
    state = unet_state()
    del state["mid_attn.fn.fn.to_out.weight"]
    state["extra.weight"] = torch.ones(2)
    state["final_res_block.mlp.1.bias"] = torch.ones(3)
    with pytest.raises(CheckpointError) as err:
        ddpm_fast.load(saved(tmp_path, state))
    message = str(err.value)
    assert "bad.pt" in message
    assert "missing keys: mid_attn.fn.fn.to_out.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "final_res_block.mlp.1.bias [3] (network: [16])" in message


def test_non_finite_weights(tmp_path):
    state = unet_state()
    state["downs.0.0.block1.norm.weight"] = state["downs.0.0.block1.norm.weight"].clone()
    state["downs.0.0.block1.norm.weight"][3] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or infinite values in downs.0.0.block1.norm"):
        ddpm_fast.load(saved(tmp_path, state))


def test_unmatched_betas(tmp_path):
    state = dict(torch.load(FIXTURES / "diffusion_state_dict.pt", weights_only=True))
    state["betas"] = state["betas"] * 1.01
    with pytest.raises(CheckpointError, match="match none of the linear, cosine, sigmoid"):
        ddpm_fast.load(saved(tmp_path, state))


# files read as something they are not, and crafted metadata


def own_file(tmp_path, name="own.safetensors", weights=None, **changes) -> Path:
    """A ddpm-fast file of the small fixture network, with metadata entries replaced (a value
    of None removes the entry) and optionally other weights."""
    source = ddpm_fast.load(FIXTURES / "diffusion_state_dict.pt", image_size=8)
    path = ddpm_fast.save_pipeline(source, tmp_path / name)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    for key, value in changes.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(weights if weights is not None else tensors, str(path), metadata=metadata)
    return path


COSINE = {"name": "cosine", "timesteps": 50}


def header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_safetensors_detected_by_structure_for_every_header_length(tmp_path):
    """A header length whose low byte is 0x80 once read as a legacy pickle and lost the
    metadata; every length (multiples of 8, so 32 low bytes) is a ddpm-fast file now."""
    low_bytes = set()
    tensors = {"w": torch.arange(6, dtype=torch.float32)}
    for pad in range(0, 256, 3):
        path = tmp_path / f"h{pad}.safetensors"
        save_file(tensors, str(path), metadata={"ddpm_fast_format": "1", "pad": "x" * pad})
        low_bytes.add(header_length(path) & 0xFF)
        ckpt = read_checkpoint(path)
        assert ckpt.format == "ddpm-fast" and ckpt.metadata["pad"] == "x" * pad
    assert 0x80 in low_bytes and len(low_bytes) == 32


def test_own_file_with_a_0x80_header_length_keeps_its_schedule(tmp_path):
    for pad in range(0, 256, 8):  # header lengths step by 8: every low byte comes once
        path = own_file(tmp_path, notes=["x" * pad])
        if header_length(path) & 0xFF == 0x80:
            break
    else:
        pytest.fail("no header length ending in 0x80")
    pipeline = ddpm_fast.load(path)
    assert (
        pipeline.diffusion.schedule.name == "cosine" and pipeline.diffusion.objective == "pred_x0"
    )


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="model.pt: not a regular file"):
        read_checkpoint(fifo)


def test_a_device_file_is_refused():
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero here")
    with pytest.raises(CheckpointError, match="/dev/zero: not a regular file"):
        read_checkpoint("/dev/zero")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ddpm_fast_format": "2"}, "ddpm-fast safetensors format '2'"),
        ({"unet_config": None}, "bad ddpm-fast metadata"),
        ({"unet_config": "{not json"}, "bad ddpm-fast metadata"),
        ({"unet_config": [8, [1, 2]]}, "unet_config is a JSON list"),
        ({"unet_config": {"dim": 100000}}, "mis-shaped"),
        ({"unet_config": {"dim": 8, "dim_mults": [1, 2], "resnet_block_groups": 0}}, "at least 1"),
        ({"unet_config": {"dim": 8, "dim_mults": [1, 2], "attn_heads": 0}}, "at least 1"),
        ({"unet_config": {"dim": "8"}}, "dim must be an integer"),
        ({"unet_config": {"dim": 8, "dim_mults": "12"}}, "dim_mults must be a list"),
        ({"unet_config": {"dim": 8, "dim_mults": [1, 2], "size": 3}}, "unexpected keyword"),
        ({"diffusion": '"cosine"'}, "a diffusion config is a dict"),
        ({"diffusion": {"schedule": {**COSINE, "timesteps": 10**12}}}, "at most 100000"),
        ({"diffusion": {"schedule": COSINE, "image_size": -3}}, "at least 1"),
        ({"diffusion": {"schedule": {**COSINE, "kwargs": {"s": "x"}}}}, "real number"),
        ({"diffusion": {"schedule": COSINE, "objective": "eps"}}, "unknown objective"),
        ({"notes": {"a": 1}}, "notes is not a list"),
        ({"family": "dd-pytorch-v9"}, "unknown model family"),
    ],
)  # fmt: skip
def test_crafted_metadata_is_one_error(tmp_path, changes, message):
    path = own_file(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message) as err:
        ddpm_fast.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_huge_config_is_refused_before_allocating(tmp_path):
    """dim 100000 would be a network of hundreds of GB: it is laid out on the meta device and
    compared with the weights, so the error comes at once and with little memory."""
    import tracemalloc

    path = own_file(tmp_path, unet_config={"dim": 100000, "dim_mults": [1, 2, 4, 8]})
    tracemalloc.start()
    with pytest.raises(CheckpointError, match="mis-shaped"):
        ddpm_fast.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200e6


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, torch.uint8])
def test_weights_must_be_real_floats(tmp_path, dtype):
    state = unet_state()
    state["init_conv.weight"] = state["init_conv.weight"].to(dtype)
    with pytest.raises(CheckpointError, match=f"not real floats: init_conv.weight .{dtype}"):
        ddpm_fast.load(saved(tmp_path, state))


def test_half_precision_weights_load_as_fp32(tmp_path):
    state = {k: v.half() for k, v in unet_state().items()}
    pipeline = ddpm_fast.load(saved(tmp_path, state))
    assert {p.dtype for p in pipeline.network.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attn_heads": 0}, "attn_heads must be at least 1"),
        ({"attn_heads": 3}, "not a multiple of attn_heads=3"),
        ({"attn_heads": "4"}, "attn_heads must be an integer"),
        ({"resnet_block_groups": 0}, "resnet_block_groups must be at least 1"),
        ({"image_size": 8.0}, "image_size must be an integer"),
        ({"timesteps": 10**9}, "timesteps must be at most"),
        ({"objective": "eps"}, "unknown objective"),
    ],
)
def test_bad_load_options_are_errors(options, message):
    with pytest.raises((ConfigError, CheckpointError), match=message):
        ddpm_fast.load(FIXTURES / "unet_state_dict.pt", **options)


def test_truncated_safetensors_header(tmp_path):
    path = ddpm_fast.save_pipeline(ddpm_fast.load(), tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="header that does not fit the file"):
        ddpm_fast.load(path)


def test_a_one_x_continuous_time_file_is_refused_and_its_bare_network_is_read(tmp_path):
    """1.6.4's GaussianDiffusion asserts against Fourier time features, as 2.x's does: a
    GaussianDiffusion-shaped file whose network has them comes from a continuous-time class."""
    from ddpm_fast.models.dd_pytorch_v1 import Unet, UnetConfig

    buffers = {
        k: v
        for k, v in torch.load(FIXTURES / "diffusion_state_dict.pt", weights_only=True).items()
        if not k.startswith("model.")
    }
    torch.manual_seed(0)
    network = Unet(UnetConfig(dim=8, dim_mults=(1, 2), learned_sinusoidal_cond=True))
    weights = network.state_dict()
    path = tmp_path / "continuous.pt"
    torch.save({**{f"model.{k}": v for k, v in weights.items()}, **buffers}, path)
    with pytest.raises(CheckpointError, match="1.6.4's GaussianDiffusion refuses such a network"):
        ddpm_fast.load(path)
    torch.save(weights, tmp_path / "bare.pt")
    assert ddpm_fast.load(tmp_path / "bare.pt").config.learned_sinusoidal_cond
