"""Shared test helpers: the library fixtures and error measures."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "dd_pytorch_v1"
# Options the files of the library cannot carry, as the fixture networks were built.
NOT_IN_STATE_DICT = ("resnet_block_groups",)


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
    return {k: kwargs[k] for k in NOT_IN_STATE_DICT if k in kwargs}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()
