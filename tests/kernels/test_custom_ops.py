"""The kernels as PyTorch custom ops: registered with a schema and a fake implementation
(``torch.library.opcheck``), called by the launchers when torch.compile traces them, and a
compiled fast network (inductor's CPU backend; the ops' CPU implementation is the kernels'
PyTorch paths) equal to the reference."""

from __future__ import annotations

import pytest
import torch

import ddpm_fast.kernels.channel_norm  # each kernel file registers its op
import ddpm_fast.kernels.group_norm
import ddpm_fast.kernels.linear_attention
import ddpm_fast.kernels.projection  # noqa: F401

from .common import randn


def _cases():
    x = randn((2, 16, 4, 5), mean=0.3, seed=1)
    c = torch.ones(16)
    qkv = randn((2, 3 * 2 * 8, 4, 5), seed=2)
    heads = randn((2, 2, 20, 8), seed=3)
    weight = randn((12, 16), std=0.3, seed=4)
    vec = randn((2, 16), seed=5)
    edge = randn((16, 3, 3), std=0.1, seed=6)
    return {
        "group_norm": (
            torch.ops.ddpm_fast.group_norm,
            (x, 4, c, c, vec, vec, vec, 1e-5, "silu", edge, x, c, 0, ""),
        ),
        "layer_norm": (
            torch.ops.ddpm_fast.channel_norm,
            (x, c, False, 1e-5, None, None, "", c, x, None, ""),
        ),
        "rms_norm": (
            torch.ops.ddpm_fast.channel_norm,
            (x, c, True, 1e-12, vec, vec, "silu", None, x, c, ""),
        ),
        "linear_attention": (
            torch.ops.ddpm_fast.linear_attention,
            (qkv, 2, None, 0.35, 0.05, 0, "", 16),
        ),
        "projection": (
            torch.ops.ddpm_fast.projection,
            (x, weight, None, "layer", c, 1e-5, "", None, 1e-5, None, False, 4, 5, ""),
        ),
        "projection_of_heads": (
            torch.ops.ddpm_fast.projection,
            (heads, weight, weight[:, 0], "", None, 1e-5, "", None, 1e-5, None, True, 4, 5, ""),
        ),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_each_op_has_a_schema_and_a_fake_implementation(name):
    op, args = _cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_the_launchers_call_their_ops_when_traced(monkeypatch):
    """Under torch.compile the launcher is one op of the graph (no tracing into it); eagerly
    the launcher runs, and the op gives the same values."""
    from ddpm_fast.kernels.group_norm import group_norm

    calls = []
    real = torch.ops.ddpm_fast.group_norm

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    import ddpm_fast.kernels.group_norm as module

    x = randn((2, 16, 4, 5), mean=0.3, seed=1)
    eager = group_norm(x, 4, act="silu")
    monkeypatch.setattr(module, "traced", lambda: not calls)  # the op's own run: eager
    monkeypatch.setattr(torch.ops.ddpm_fast, "group_norm", Spy())
    assert torch.equal(group_norm(x, 4, act="silu"), eager) and len(calls) == 1


@pytest.mark.slow
def test_the_compiled_fused_network_is_the_reference():
    """torch.compile (inductor, CPU) of the engine's fused network (residuals, edge biases, skips
    into their concatenations, projections, one-pass linear attention): one graph, no break
    (fullgraph), within fp32's tolerance of the reference network."""
    from ddpm_fast.engine import FastUnet

    from ..families import CASES, random_network, timesteps
    from ..helpers import rel_error

    name = "v1-selfcond-learned-var"
    assert name in CASES
    network = random_network(name)
    ts = timesteps(name)[:2]
    fast = FastUnet(network, ts, fuse=True)
    compiled = torch.compile(fast, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    cond = torch.rand(x.shape, generator=g) * 2 - 1
    with torch.no_grad():
        for k in (0, 1):
            want = network(x, ts[k : k + 1].expand(2), cond)
            assert rel_error(compiled(x, torch.tensor([k]), cond), want) <= 1e-4
