"""Micro-benchmarks of the Triton kernels against the unfused PyTorch sequence each replaces
(``provider=torch``, the ``*_reference`` functions) and against ``torch.compile`` of that same
sequence (``provider=compile``), at the shapes of the seed's CIFAR-10 U-Net at 32 x 32: dim 64,
dim_mults 1, 2, 4, 8, so widths 64..512 at resolutions 32..4, batch 1 and 128, float32 and
bfloat16; torch.compile in bfloat16 only (each compile is an Inductor run, and the summary needs
one dtype of it). That is 4 kernels x 4 shapes x 2 batches x 5 (dtype, provider) = 160 cases.

``DDPM_FAST_BENCH_QUICK=1`` keeps one case per kernel and provider (C128@16, batch 128, bf16):
12 cases, for ``gpu_suite.sh --quick``. ``DDPM_FAST_SUITE_DEVICE=cpu`` runs them on the CPU with
small batches (the PyTorch paths stand in for the kernels): the suite's dry run, not a benchmark.

Timing: ``reps`` calls captured in one CUDA graph (as the engine runs its step), replayed per
round, so the figures are GPU time without Python's launch overhead; if capture fails the calls
run eagerly (``extra_info["timing"]`` says which). ``extra_info`` holds the bytes the op must move
(inputs read once, outputs written once), the time per call and the bandwidth achieved; small
shapes sit in L2 and can beat HBM bandwidth.

Needs CUDA: every test is marked ``gpu`` and skips elsewhere (unless the device is switched).
Run them all with ``benchmarks/gpu_suite.sh``, or ``python -m pytest benchmarks/test_kernels.py
--benchmark-json=FILE``. pytest-benchmark writes that file on Ctrl-C too (SIGINT: the suite's
time limits), with every case finished by then.
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch

from ddpm_fast.kernels.channel_norm import (
    channel_layer_norm,
    channel_layer_norm_reference,
    channel_rms_norm,
    channel_rms_norm_reference,
)
from ddpm_fast.kernels.group_norm import group_norm, group_norm_reference
from ddpm_fast.kernels.linear_attention import linear_attention, linear_attention_reference

DEVICE = os.environ.get("DDPM_FAST_SUITE_DEVICE", "cuda")
QUICK = os.environ.get("DDPM_FAST_BENCH_QUICK", "") not in ("", "0")
IMAGE = 32
STAGES = ((64, 1), (128, 2), (256, 4), (512, 8))  # (channels, downsampling) of dim 64, (1, 2, 4, 8)
SHAPES = [(IMAGE, c, IMAGE // down) for c, down in STAGES]
BATCHES = (1, 128) if DEVICE == "cuda" else (1, 4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("triton", "torch", "compile")
COMPILE_DTYPE = "bf16"
if QUICK:
    SHAPES, BATCHES, DTYPES = SHAPES[1:2], BATCHES[-1:], {"bf16": torch.bfloat16}
GROUPS = 8  # resnet_block_groups
HEADS, DIM_HEAD = 4, 32  # the seed's LinearAttention
ROUNDS = 10
ROUND_SECONDS = 2e-3  # reps per round so that a replay lasts about this long
MAX_REPS = 50

pytestmark = pytest.mark.gpu


def shape_id(shape) -> str:
    image, c, res = shape
    return f"img{image}-C{c}@{res}"


@functools.cache
def compiled(fn):
    """torch.compile of a reference, dynamic in its shapes (one compile serves them all)."""
    return torch.compile(fn, dynamic=True)


def provider_fn(provider: str, kernel, reference):
    return {"triton": kernel, "torch": reference, "compile": compiled(reference)}[provider]


def _synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _seconds_once(call) -> float:
    _synchronize()
    start = time.perf_counter()
    call()
    _synchronize()
    return time.perf_counter() - start


def _graph_round(call, reps: int):
    """A round that replays ``reps`` captured calls, or None where capture fails."""
    if DEVICE != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(reps):
                call()
    except Exception:  # any capture failure: time eagerly instead
        torch.cuda.synchronize()
        return None

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    return replay


def run(benchmark, call, bytes_moved: int, **info) -> None:
    """Benchmark ``call`` and record the bytes it must move and the bandwidth it reaches."""
    call()  # compile (Triton, Inductor) outside the timing
    once = min(_seconds_once(call) for _ in range(3))
    reps = max(1, min(MAX_REPS, int(ROUND_SECONDS / max(once, 1e-7))))
    replay = _graph_round(call, reps)
    timing = "cuda-graph"
    if replay is None:
        timing = "eager"

        def replay():
            for _ in range(reps):
                call()
            _synchronize()

    benchmark.pedantic(replay, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median / reps
    benchmark.extra_info.update(
        info,
        timing=timing,
        reps=reps,
        bytes=bytes_moved,
        us_per_call=seconds * 1e6,
        gb_per_s=bytes_moved / seconds / 1e9,
    )


def randn(*shape, dtype, mean=0.0, std=1.0):
    return (torch.randn(*shape, device=DEVICE) * std + mean).to(dtype)


def parametrize(fn):
    """Over shape x batch x (dtype, provider), torch.compile in ``COMPILE_DTYPE`` only."""
    cells = [
        (dtype, provider)
        for dtype in DTYPES
        for provider in PROVIDERS
        if provider != "compile" or dtype == COMPILE_DTYPE
    ]
    for decorator in (
        pytest.mark.parametrize(("dtype", "provider"), cells, ids=[f"{d}-{p}" for d, p in cells]),
        pytest.mark.parametrize("batch", BATCHES),
        pytest.mark.parametrize("shape", SHAPES, ids=shape_id),
    ):
        fn = decorator(fn)
    return fn


@parametrize
def test_group_norm(benchmark, shape, batch, dtype, provider):
    """The seed's Block after its conv: GroupNorm(8) + affine + (1 + scale)/shift + SiLU."""
    image, c, res = shape
    dt = DTYPES[dtype]
    x = randn(batch, c, res, res, dtype=dt, mean=0.3, std=2.0)
    weight, bias = randn(c, dtype=dt, mean=1.0), randn(c, dtype=dt)
    scale, shift = randn(batch, 2 * c, 1, 1, dtype=dt, std=0.3).chunk(2, dim=1)
    fn = provider_fn(provider, group_norm, group_norm_reference)
    es = x.element_size()
    bytes_moved = (2 * x.numel() + 2 * batch * c + 2 * c) * es
    benchmark.group = f"group_norm {shape_id(shape)} b{batch} {dtype}"
    run(
        benchmark,
        lambda: fn(x, GROUPS, weight, bias, scale=scale, shift=shift, act="silu"),
        bytes_moved,
        kernel="group_norm", provider=provider, image=image, channels=c, res=res, batch=batch,
        dtype=dtype,
    )  # fmt: skip


@parametrize
def test_channel_layer_norm(benchmark, shape, batch, dtype, provider):
    """The seed's PreNorm LayerNorm over channels, with its gain."""
    image, c, res = shape
    dt = DTYPES[dtype]
    x = randn(batch, c, res, res, dtype=dt, mean=0.3, std=2.0)
    g = randn(1, c, 1, 1, dtype=dt, mean=1.0)
    fn = provider_fn(provider, channel_layer_norm, channel_layer_norm_reference)
    benchmark.group = f"channel_layer_norm {shape_id(shape)} b{batch} {dtype}"
    run(
        benchmark,
        lambda: fn(x, g),
        (2 * x.numel() + c) * x.element_size(),
        kernel="channel_layer_norm", provider=provider, image=image, channels=c, res=res,
        batch=batch, dtype=dtype,
    )  # fmt: skip


@parametrize
def test_channel_rms_norm(benchmark, shape, batch, dtype, provider):
    """denoising-diffusion-pytorch 2.x's block norm: RMSNorm + (1 + scale)/shift + SiLU."""
    image, c, res = shape
    dt = DTYPES[dtype]
    x = randn(batch, c, res, res, dtype=dt, mean=0.3, std=2.0)
    g = randn(c, dtype=dt, mean=1.0)
    scale, shift = randn(batch, 2 * c, 1, 1, dtype=dt, std=0.3).chunk(2, dim=1)
    fn = provider_fn(provider, channel_rms_norm, channel_rms_norm_reference)
    benchmark.group = f"channel_rms_norm {shape_id(shape)} b{batch} {dtype}"
    run(
        benchmark,
        lambda: fn(x, g, scale=scale, shift=shift, act="silu"),
        (2 * x.numel() + 2 * batch * c + c) * x.element_size(),
        kernel="channel_rms_norm", provider=provider, image=image, channels=c, res=res,
        batch=batch, dtype=dtype,
    )  # fmt: skip


@parametrize
def test_linear_attention(benchmark, shape, batch, dtype, provider):
    """The seed's (1.x) LinearAttention between to_qkv and to_out, 4 heads of 32, at the
    stage's resolution (its width does not enter: qkv has 3 * 4 * 32 channels)."""
    image, c, res = shape
    dt = DTYPES[dtype]
    qkv = randn(batch, 3 * HEADS * DIM_HEAD, res, res, dtype=dt, std=1.5)
    fn = provider_fn(provider, linear_attention, linear_attention_reference)
    benchmark.group = f"linear_attention {shape_id(shape)} b{batch} {dtype}"
    run(
        benchmark,
        lambda: fn(qkv, HEADS, v_scale=1.0 / (res * res)),
        qkv.numel() * 4 // 3 * qkv.element_size(),
        kernel="linear_attention", provider=provider, image=image, channels=c, res=res,
        batch=batch, dtype=dtype,
    )  # fmt: skip
