"""The reference network against denoising-diffusion-pytorch 1.6.4's Unet (fixtures)."""

import pytest
import torch

from ddpm_fast.errors import CheckpointError, ConfigError
from ddpm_fast.models.dd_pytorch_v1 import Unet, UnetConfig, infer_config

from .helpers import network_fixtures, network_kwargs, rel_error, unstored_options

NAMES = list(network_fixtures())


def library_unet(name: str) -> Unet:
    case = network_fixtures()[name]
    network = Unet(infer_config(case["state_dict"], **unstored_options(name)))
    network.load_state_dict(case["state_dict"], strict=True)
    return network.eval()


@pytest.mark.parametrize("name", NAMES)
def test_outputs_match_the_library(name):
    case = network_fixtures()[name]
    with torch.no_grad():
        out = library_unet(name)(case["x"], case["t"], case["x_self_cond"])
    assert out.shape == case["output"].shape
    assert rel_error(out, case["output"]) <= 1e-5


def test_self_condition_defaults_to_zeros_as_the_library():
    case = network_fixtures()["self_cond_three_stages"]
    with torch.no_grad():
        out = library_unet("self_cond_three_stages")(case["x"], case["t"])
    assert rel_error(out, case["output_without_self_cond"]) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_config_inferred_from_shapes_is_the_constructors(name):
    kwargs = network_kwargs(name)
    config = infer_config(network_fixtures()[name]["state_dict"], **unstored_options(name))
    expected = UnetConfig(**kwargs)
    if expected.random_fourier_features:  # same function as learned features; reads as learned
        expected.random_fourier_features = False
        expected.learned_sinusoidal_cond = True
    assert config == expected


def test_groups_are_not_in_the_state_dict_and_change_the_function():
    """Why resnet_block_groups is an option: with the library's default of 8 instead of the 4 this
    network was built with, the weights load and the function differs."""
    case = network_fixtures()["self_cond_three_stages"]
    network = Unet(infer_config(case["state_dict"]))
    network.load_state_dict(case["state_dict"], strict=True)
    with torch.no_grad():
        out = network(case["x"], case["t"], case["x_self_cond"])
    assert rel_error(out, case["output"]) > 1e-2


def test_groups_that_do_not_divide_a_width_are_a_config_error():
    with pytest.raises(ConfigError, match="resnet_block_groups=8 must divide"):
        infer_config(network_fixtures()["four_stages_random_fourier"]["state_dict"])


def test_init_dim_other_than_dim_is_refused():
    """The library builds such a Unet, then its forward fails on the final block's channels."""
    with pytest.raises(ConfigError, match="init_dim must equal dim"):
        UnetConfig(dim=8, init_dim=16, dim_mults=(1, 2))


def test_a_state_dict_of_another_network_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="time_mlp.1.weight"):
        infer_config({"conv.weight": torch.ones(3, 3, 1, 1)})
