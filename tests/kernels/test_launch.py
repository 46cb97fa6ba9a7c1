"""What the kernel files share: dispatch, the fallback without triton, the split of a reduction,
the rounding of outputs, and that every kernel compiles for a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_fast.kernels import _launch
from ddpm_fast.kernels.group_norm import group_norm

from .common import HAS_CUDA, HAS_TRITON, randn

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

HERE = Path(__file__).parent


def test_plan_split_fills_the_gpu_at_batch_1_and_not_at_batch_128():
    # GroupNorm of 64 channels in 32 groups at 64 x 64 on a 132-multiprocessor GPU
    assert _launch.plan_split(32, 4096, 256, 132) == (8, 512)
    assert _launch.plan_split(128 * 32, 4096, 256, 132) == (1, 4096)
    # never more chunks than blocks, nor than MAX_SPLIT
    assert _launch.plan_split(1, 100, 64, 132) == (2, 64)
    assert _launch.plan_split(1, 10**6, 16, 1000)[0] <= _launch.MAX_SPLIT
    assert _launch.plan_split(4, 1000, 16, 1, split=3) == (3, 336)


@needs_triton
def test_backend_from_the_environment(monkeypatch):
    x = torch.zeros(1, 8, 2, 2)
    monkeypatch.setenv(_launch.BACKEND_ENV, "torch")
    assert not _launch.use_triton(None, x, None)
    assert _launch.use_triton("triton", x, _launch._probe)  # an argument beats the environment
    monkeypatch.setenv(_launch.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        group_norm(x, 8)


NO_TRITON = """
import logging, sys
sys.modules["triton"] = None  # import triton raises ImportError
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
import torch
import ddpm_fast.kernels as kernels
from ddpm_fast.kernels.channel_norm import channel_layer_norm, channel_rms_norm
from ddpm_fast.kernels.group_norm import group_norm, group_norm_reference
from ddpm_fast.kernels.linear_attention import linear_attention

assert not kernels.HAS_TRITON
x = torch.randn(2, 16, 3, 3)
assert torch.equal(group_norm(x, 4, act="silu"), group_norm_reference(x, 4, act="silu"))
channel_layer_norm(x, torch.ones(16))
channel_rms_norm(x, torch.ones(16))
linear_attention(torch.randn(1, 24, 5), 2)
try:
    group_norm(x, 4, backend="triton")
except RuntimeError as error:
    print("raised:", error)
"""


def test_without_triton_the_package_imports_and_runs_its_references():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", NO_TRITON], capture_output=True, text=True, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if "triton is not importable" in line]
    assert len(warnings) == 1, run.stderr  # said once, however many calls
    assert warnings[0].startswith("WARNING ddpm_fast.kernels:")
    assert "raised: backend='triton' but triton is not importable" in run.stdout


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, _launch.cast_to(x, y_ptr.dtype.element_ty), mask=offs < n)


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_outputs_round_to_nearest_even_as_torch(dtype):
    """GPUs round fp32 to bf16 to nearest even; the interpreter would truncate unless told."""
    device = "cuda" if HAS_CUDA else "cpu"
    values = randn((3000,), std=300.0, seed=1)
    low = randn((500,), std=3.0, seed=2).to(dtype)
    ulp = (torch.nextafter(low, torch.full_like(low, float("inf"))).float() - low.float()).abs()
    ties = low.float() + ulp / 2  # exactly halfway: even wins
    special = torch.tensor([0.0, -0.0, 1e-40, -3e-39, 3.39e38, -3.4e38, float("inf")])
    x = torch.cat((values, ties, special)).to(device)
    y = torch.empty_like(x, dtype=dtype)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y, x.to(dtype))


if HAS_TRITON:

    @triton.jit
    def _offset_kernel(out_ptr, stride):
        tl.store(out_ptr + tl.program_id(0), _launch.program_offset(0, stride))


@needs_triton
def test_sample_offsets_are_int64_past_2_31():
    """The sampler step's (and any kernel's) offset of sample n, n * numel, as program_offset
    computes it: int32 would wrap at 2**31."""
    stride = 2**30 + 3
    out = torch.zeros(5, dtype=torch.int64, device="cuda" if HAS_CUDA else "cpu")
    _offset_kernel[(5,)](out, stride)
    assert out.tolist() == [n * stride for n in range(5)]


def test_grids_over_cuda_limits_are_clear_errors():
    assert _launch.check_grid((2**31 - 1, 65535, 65535), "k") == (2**31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match=r"k needs a launch grid of \(1, 65536\): axis 1"):
        _launch.check_grid((1, 65536), "k")
    with pytest.raises(ValueError, match="axis 0 is over CUDA's limit of 2147483647"):
        _launch.check_grid((2**31, 1), "k")


@needs_triton
def test_every_kernel_compiles_for_a_gpu(tmp_path):
    """The interpreter does not type-check like the compiler: compile each kernel for sm_90
    (and sm_80) here, on the CPU, within the target's shared memory."""
    from .compile_kernels import cases

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = str(HERE / "compile_kernels.py")
    for arch in ("90", "80"):
        run = subprocess.run(
            [sys.executable, script, arch], capture_output=True, text=True, env=env, timeout=600
        )
        if run.returncode == 3:
            pytest.skip(run.stderr.strip())
        assert run.returncode == 0, run.stderr[-4000:]
        assert run.stdout.count("ok ") == len(list(cases())), run.stdout
