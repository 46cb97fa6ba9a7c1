"""The fused sampler step: the Triton kernel (interpreted here) against its PyTorch reference and
the reference sampler (``ddpm_fast.samplers.denoise_step``), its in-kernel noise against the
PyTorch Philox stream of ``ddpm_fast.noise``, and its input checks."""

from __future__ import annotations

import pytest
import torch

from ddpm_fast.engine.coefficients import coefficient_table
from ddpm_fast.kernels import sampler_step as kernel_module
from ddpm_fast.kernels.sampler_step import (
    COEFFICIENTS,
    NUM_COEFFICIENTS,
    sampler_step,
    sampler_step_reference,
)
from ddpm_fast.noise import keyed_noise, philox_keys
from ddpm_fast.samplers import SamplerSpec, denoise_step, rule, step_tables
from ddpm_fast.schedule import Schedule, ScheduleConfig

from .common import HAS_TRITON, poisoned, randn

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
SEED = 1234
# tl.randn's float32 log/cos on one side, torch's on the other: the 32-bit Philox words are the
# same (tests/test_noise.py checks them bit for bit), the normals differ in the last bits.
NOISE_ATOL = 4e-6

CHAINS = [
    ("pred_noise", SamplerSpec("ddpm", 20)),
    ("pred_v", SamplerSpec("ddpm", 20, variance="fixed_large")),
    ("pred_x0", SamplerSpec("ddim", 8, eta=0.5)),
    ("pred_noise", SamplerSpec("ddim", 8)),
    ("pred_v", SamplerSpec("ddpm", 20, variance="learned_range")),
    ("pred_noise", SamplerSpec("dpm++2m", 8)),
    ("pred_v", SamplerSpec("dpm++2m-sde-karras", 8, clip_x0=False)),
    # diffusers' DDIM: eps from the unclipped x0 (the network's own), its spacing and clip range
    ("pred_noise", SamplerSpec("ddim", 8, eta=0.5, eps_from_clipped_x0=False)),
    (
        "pred_v",
        SamplerSpec(
            "ddim", 7, 0.0, timestep_spacing="linspace", clip_range=0.7, eps_from_clipped_x0=False
        ),
    ),
]


def chain_id(case) -> str:
    objective, spec = case
    eps = "" if spec.eps_from_clipped_x0 else "-unclipped-eps"
    return f"{objective}-{spec.kind}{spec.steps}-{spec.variance}-{spec.eta}{eps}"


def setup(objective: str, spec: SamplerSpec, batch: int = 3, shape=(3, 5, 6)):
    schedule = Schedule(ScheduleConfig("cosine", 20))
    tables = step_tables(schedule, spec)
    coeffs = coefficient_table(tables, spec, objective)
    learned = tables.learned
    x = randn((batch, *shape), seed=1)
    out_channels = 2 * shape[0] if learned else shape[0]
    out = randn((batch, out_channels, *shape[1:]), seed=2, std=0.8)
    return tables, coeffs, learned, x, out


def previous_x0(x: torch.Tensor) -> torch.Tensor:
    """A previous step's x0 (the solvers' history): in [-1, 1], not zeros."""
    return randn(x.shape, seed=5, std=0.6).clamp(-1, 1)


def keys_for(indices) -> torch.Tensor:
    return philox_keys(SEED, indices)


@needs_triton
@pytest.mark.parametrize("case", CHAINS, ids=chain_id)
def test_the_kernel_is_the_reference_sampler(case):
    """Every step of the chain: the kernel, drawing its own noise, against ``denoise_step`` given
    ``keyed_noise`` for the same (seed, sample, step)."""
    objective, spec = case
    tables, coeffs, learned, x, out = setup(objective, spec)
    x0_prev = previous_x0(x)
    indices = [0, 5, 2**32 - 1]
    for k in range(len(tables)):
        z = keyed_noise(SEED, indices, k + 1, tuple(x.shape[1:]))
        noise = z if tables.adds_noise(k, spec) else None
        want_next, want_x0 = denoise_step(out, x, tables, k, spec, objective, noise, x0_prev)
        buffers = (poisoned(x.shape, x), poisoned(x.shape, x))
        got_next, got_x0 = sampler_step(
            out, x, coeffs, torch.tensor([k]), keys_for(indices), x0_prev=x0_prev,
            learned=learned, out=buffers, backend="triton",
        )  # fmt: skip
        assert got_next.data_ptr() == buffers[0].data_ptr()
        torch.testing.assert_close(got_x0, want_x0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_next, want_next, rtol=1e-5, atol=NOISE_ATOL)


@needs_triton
@pytest.mark.parametrize("case", CHAINS, ids=chain_id)
def test_the_kernel_given_noise_is_its_reference(case):
    objective, spec = case
    tables, coeffs, learned, x, out = setup(objective, spec, batch=2)
    z = randn(x.shape, seed=3)
    x0_prev = previous_x0(x)
    for k in (0, 1, len(tables) // 2, len(tables) - 1):
        step = torch.tensor([k])
        got = sampler_step(
            out, x, coeffs, step, z=z, x0_prev=x0_prev, learned=learned, backend="triton"
        )
        want = sampler_step_reference(out, x, coeffs[k], z, x0_prev=x0_prev, learned=learned)
        for g, w in zip(got, want, strict=True):
            assert not torch.isnan(g).any()
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_the_next_input_written_in_the_networks_dtype_and_layout(dtype, backend):
    """``also_out``: x_next a second time, cast (rounded to nearest) into the network's input
    buffer, channels_last: the next step's input with no cast of its own."""
    _, coeffs, learned, x, out = setup("pred_noise", SamplerSpec("ddim", 8, eta=0.5))
    z = randn(x.shape, seed=3)
    cast = poisoned(x.shape, torch.zeros(0, dtype=dtype), channels_last=True)
    x_next, _ = sampler_step(
        out, x, coeffs, torch.tensor([2]), z=z, learned=learned, also_out=cast, backend=backend
    )
    assert cast.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cast, x_next.to(dtype))


@needs_triton
def test_the_in_kernel_noise_is_the_philox_stream():
    """A row that keeps only sigma * z shows z: the stream of ``keyed_noise`` for step k + 1."""
    row = dict.fromkeys(COEFFICIENTS, 0.0) | {"x0_from_eps": 1.0, "sigma": 1.0, "noise_on": 1.0}
    coeffs = torch.tensor([[row[name] for name in COEFFICIENTS]] * 4)
    x = randn((3, 2, 7, 9), seed=4)
    indices = [3, 1, 70000]
    for k in (0, 3):
        got, _ = sampler_step(x, x, coeffs, torch.tensor([k]), keys_for(indices), backend="triton")
        want = keyed_noise(SEED, indices, k + 1, (2, 7, 9))
        torch.testing.assert_close(got, want, rtol=0, atol=NOISE_ATOL)
        assert got.std() > 0.5


def test_the_reference_backend_needs_the_noise():
    objective, spec = CHAINS[0]
    _, coeffs, _, x, out = setup(objective, spec)
    with pytest.raises(ValueError, match="needs z"):
        sampler_step(out, x, coeffs, torch.tensor([0]), backend="torch")


def bad_calls():
    objective, spec = CHAINS[0]
    _, coeffs, _, x, out = setup(objective, spec)
    step = torch.tensor([0])
    z = torch.randn_like(x)
    return [
        (lambda: sampler_step(out[:, :2], x, coeffs, step, z=z), "model_output must be"),
        (lambda: sampler_step(out, x, coeffs, step, z=z, learned=True), "model_output must be"),
        (lambda: sampler_step(out, x.half(), coeffs, step, z=z), "x must be contiguous float32"),
        (lambda: sampler_step(out, x, coeffs[:, :3], step, z=z), "coeffs must be float32"),
        (lambda: sampler_step(out, x, coeffs, torch.tensor([0, 1]), z=z), "step must be one"),
        (lambda: sampler_step(out, x, coeffs, step, z=z[:1]), "z must be float32"),
    ]


@pytest.mark.parametrize("index", range(6))
def test_bad_inputs_are_clear_errors(index):
    call, message = bad_calls()[index]
    with pytest.raises(ValueError, match=message):
        call()


def test_a_batch_past_2_31_values_launches_within_cuda_limits(monkeypatch):
    """64 images of 3 x 1024 x 1024 are 201M values a step; 70000 samples are over the y axis's
    65535 and say so. Meta tensors and a stand-in kernel: nothing is allocated or run."""
    import ddpm_fast.kernels.sampler_step as module
    from ddpm_fast.kernels import _launch

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(module, "_sampler_step_kernel", Recorder())
    monkeypatch.setattr(_launch, "is_interpreted", lambda kernel: True)
    coeffs = torch.zeros(4, NUM_COEFFICIENTS, device="meta")
    step = torch.zeros(1, dtype=torch.int64, device="meta")
    for batch, side in ((700, 1024), (70000, 8)):
        x = torch.empty(batch, 3, side, side, device="meta")
        keys = torch.zeros(batch, dtype=torch.int64, device="meta")
        if batch > _launch.MAX_GRID[1]:
            with pytest.raises(ValueError, match="sampler_step needs a launch grid"):
                sampler_step(x, x, coeffs, step, keys, backend="triton")
        else:
            assert x.numel() > 2**31  # offsets past int32: the kernel's are int64
            sampler_step(x, x, coeffs, step, keys, backend="triton")
            assert grids == [(-(-x[0].numel() // module.BLOCK), batch)]


def test_the_columns_are_the_rules():
    """The kernel's row is ``rule.ROW`` and each offset it reads is that name's position."""
    assert COEFFICIENTS == rule.ROW and len(rule.ROW) == NUM_COEFFICIENTS
    for name in rule.ROW:
        assert getattr(kernel_module, f"COL_{name.upper()}") == rule.ROW.index(name), name


@needs_triton
@pytest.mark.parametrize("column", ["c_x0_prev", "c_xt", "c_x0"])
def test_each_column_is_read_where_its_name_says(column):
    """A row whose only mixing coefficient is ``column`` (2.5) gives 2.5 times that input."""
    row = dict.fromkeys(COEFFICIENTS, 0.0) | {"x0_from_eps": 1.0, "x0_max": 1.0, "b": -1.0}
    row[column] = 2.5
    coeffs = torch.tensor([[row[name] for name in COEFFICIENTS]] * 2)
    x = randn((2, 2, 3, 5), seed=6)
    out = randn(x.shape, seed=7, std=0.4).clamp(-1, 1)  # x0 = out (a = 0, b = -1)
    x0_prev = previous_x0(x)
    z = randn(x.shape, seed=8)
    got, _ = sampler_step(out, x, coeffs, torch.tensor([1]), z=z, x0_prev=x0_prev, backend="triton")
    source = {"c_x0_prev": x0_prev, "c_xt": x, "c_x0": out}[column]
    torch.testing.assert_close(got, 2.5 * source, rtol=1e-6, atol=1e-6)
