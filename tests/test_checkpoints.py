"""Reading the library's files and ddpm-fast's own; clear errors for every bad file."""

import json

import pytest
import torch
from safetensors import safe_open

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
