"""What holds for every registered family, written once: the split forward, folding, the
engine's network against the reference (fp32, both bias placements, batch invariance), and the
round trip through ddpm-fast's own file."""

from __future__ import annotations

import pytest
import torch

import ddpm_fast
from ddpm_fast.engine import Engine, FastUnet
from ddpm_fast.engine.families import MAPPINGS
from ddpm_fast.folding import fold_weights
from ddpm_fast.models import FAMILIES, family_of

from .families import CASES, CONFIGS, random_network, random_pipeline, timesteps
from .helpers import rel_error

NETWORK_TOLERANCE = 1e-4  # fp32, a whole network


def inputs(name: str, batch: int = 3, size: int = 8, seed: int = 1):
    _, config = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.channels, size, size, generator=g) * 1.2 + 0.1
    cond = torch.rand(x.shape, generator=g) * 2 - 1 if config.self_condition else None
    return x, cond


def test_every_family_has_test_networks_and_an_engine_mapping():
    assert set(CONFIGS) == set(FAMILIES)
    assert set(MAPPINGS) == set(FAMILIES)


@pytest.mark.parametrize("name", CASES)
def test_the_split_forward_is_the_forward(name):
    network = random_network(name)
    x, cond = inputs(name)
    t = timesteps(name)[:3]
    with torch.no_grad():
        want = network(x, t, cond)
        got = network.forward_conditioned(x, network.time_conditioning(t), cond)
    assert want.abs().max() > 0 and torch.isfinite(want).all()
    assert torch.equal(got, want)
    assert CASES[name][0] == family_of(network).FAMILY


@pytest.mark.parametrize("name", CASES)
def test_folding_keeps_the_function_and_the_reference(name):
    network = random_network(name)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    folded = fold_weights(network)
    x, cond = inputs(name)
    t = timesteps(name)[:3]
    with torch.no_grad():
        assert rel_error(folded(x, t, cond), network(x, t, cond)) <= 1e-5
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_the_engine_network_is_the_reference(name, fuse):
    network = random_network(name)
    ts = timesteps(name)
    fast = FastUnet(network, ts, fuse=fuse)
    x, cond = inputs(name)
    with torch.no_grad():
        for k, t in enumerate(ts.tolist()):
            want = network(x, torch.full((3,), t), cond)
            got = fast(x, torch.tensor([k]), cond)
            assert got.shape == want.shape
            assert rel_error(got, want) <= NETWORK_TOLERANCE, (name, t)


@pytest.mark.parametrize("name", CASES)
def test_the_engine_network_is_batch_invariant(name):
    network = random_network(name)
    fast = FastUnet(network, timesteps(name))
    x, cond = inputs(name, batch=4)
    with torch.no_grad():
        whole = fast(x, torch.tensor([1]), cond)
        for i in range(4):
            one = fast(x[i : i + 1], torch.tensor([1]), None if cond is None else cond[i : i + 1])
            assert rel_error(one, whole[i : i + 1]) <= 1e-5


@pytest.mark.parametrize("name", CASES)
def test_own_file_round_trip(name, tmp_path):
    pipeline = random_pipeline(name)
    again = ddpm_fast.load(ddpm_fast.save_pipeline(pipeline, tmp_path / "m.safetensors"))
    assert again.config == pipeline.config
    x, cond = inputs(name)
    t = timesteps(name)[:3]
    with torch.no_grad():
        assert torch.equal(again.network(x, t, cond), pipeline.network(x, t, cond))


@pytest.mark.parametrize("name", CASES)
def test_a_short_engine_chain_is_the_reference_chain(name):
    pipeline = random_pipeline(name, steps=50)
    kwargs = dict(sampler="ddim", steps=4, seed=3)
    want = pipeline.sample(2, **kwargs)
    got = Engine(pipeline).sample(2, **kwargs)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_the_engine_network_through_the_kernels(name, monkeypatch):
    """Every launcher forced to its Triton kernel (interpreted on the CPU): the fused GroupNorms
    with their per-step pre-bias or scale/shift, the channel norms, linear attention."""
    from ddpm_fast.kernels import HAS_TRITON, group_norm

    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    launched = []
    real = group_norm.use_triton

    def spy(backend, x, kernel):
        ran = real(backend, x, kernel)
        launched.append(ran)
        return ran

    monkeypatch.setattr(group_norm, "use_triton", spy)
    monkeypatch.setenv("DDPM_FAST_KERNELS_BACKEND", "triton")
    network = random_network(name)
    ts = timesteps(name)[:2]
    fast = FastUnet(network, ts)
    x, cond = inputs(name, batch=2)
    with torch.no_grad():
        got = fast(x, torch.tensor([1]), cond)
        want = network(x, ts[1:].expand(2), cond)
    assert launched and all(launched)
    assert rel_error(got, want) <= NETWORK_TOLERANCE


# The two families whose U-Net walk writes skips into concatenations (the shared StagedUnet).
@pytest.mark.parametrize("name", ["v1-selfcond-learned-var", "v2-selfcond-learned-var-full-attn"])
def test_the_fused_network_in_bf16_channels_last_through_the_kernels(name, monkeypatch):
    """The CUDA path's half-precision form, interpreted here: convolutions in bf16, the network
    channels_last, so that the skips written into their concatenations, the residuals and the
    transposed upsamplings are channel slices and layouts the kernels take by their strides.
    Within bf16's precision of the fp32 reference (the same network unfused and in fp32 is
    checked to 1e-4 above)."""
    from ddpm_fast.engine.network import cast_convolutions
    from ddpm_fast.kernels import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    monkeypatch.setenv("DDPM_FAST_KERNELS_BACKEND", "triton")
    network = random_network(name)
    ts = timesteps(name)[:2]
    fast = FastUnet(network, ts, fuse=True)
    cast_convolutions(fast, torch.bfloat16)
    fast = fast.to(memory_format=torch.channels_last)
    x, cond = inputs(name, batch=2)
    half = x.to(torch.bfloat16, memory_format=torch.channels_last)
    with torch.no_grad():
        got = fast(half, torch.tensor([1]), None if cond is None else cond.to(torch.bfloat16))
        want = network(x, ts[1:].expand(2), cond)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert rel_error(got, want) <= 3e-2
