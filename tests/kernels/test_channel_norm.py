"""The channel LayerNorm and RMSNorm kernel (under the Triton interpreter here) against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ddpm_fast.kernels.channel_norm as cn_module
from ddpm_fast.kernels import _launch
from ddpm_fast.kernels.channel_norm import (
    channel_layer_norm,
    channel_layer_norm_reference,
    channel_norm_settings,
    channel_rms_norm,
    channel_rms_norm_reference,
    layer_norm_eps,
)
from ddpm_fast.models.dd_pytorch_v1 import LayerNorm

from ..helpers import rel_error
from .common import (
    DTYPES,
    HAS_TRITON,
    assert_matches,
    assert_raises,
    bad_input,
    dtype_id,
    f64,
    poisoned,
    randn,
)

pytestmark = pytest.mark.skipif(
    not HAS_TRITON, reason="needs triton: the kernels run under its interpreter here"
)

# (N, C, H, W): C = 384, 1 x 1 and 4 x 4 images, channels and positions off the block sizes.
SHAPES = [(2, 64, 4, 4), (1, 384, 4, 4), (3, 32, 1, 1), (2, 96, 7, 9), (1, 1024, 2, 3)]


def layer_case(shape, dtype, *, mean=0.5, std=2.0, channels_last=False, g_shape=None):
    x = randn(shape, dtype, mean=mean, std=std, seed=1, channels_last=channels_last)
    g = randn(g_shape or (shape[1],), dtype, mean=1.0, std=0.5, seed=2)
    return x, g


def check_layer(x, g, backend="triton"):
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    out = poisoned(x.shape, x, channels_last=channels_last)
    y = channel_layer_norm(x, g, out=out, backend=backend)
    assert y is out and y.dtype == x.dtype
    # float64 computes the function of x's dtype: that dtype's eps, not float64's
    reference = channel_layer_norm_reference(x.double(), g.double(), eps=layer_norm_eps(x.dtype))
    baseline = None if x.dtype == torch.float32 else channel_layer_norm_reference(x, g)
    return assert_matches(y, reference, baseline)


def rms_case(shape, dtype, *, features=("scale", "shift", "silu"), channels_last=False):
    n, c = shape[:2]
    x = randn(shape, dtype, mean=0.5, std=2.0, seed=3, channels_last=channels_last)
    kw = {"g": randn((c,), dtype, mean=1.0, std=0.5, seed=4)}
    if "scale" in features:
        kw["scale"] = randn((n, c), dtype, mean=0.1, std=0.5, seed=5)
    if "shift" in features:
        kw["shift"] = randn((n, c, 1, 1), dtype, mean=-0.2, std=0.5, seed=6)
    kw["act"] = "silu" if "silu" in features else None
    return x, kw


def check_rms(x, kw, backend="triton"):
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    out = poisoned(x.shape, x, channels_last=channels_last)
    y = channel_rms_norm(x, out=out, backend=backend, **kw)
    assert y is out and y.dtype == x.dtype
    kw64 = {k: (f64(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    reference = channel_rms_norm_reference(x.double(), **kw64)
    baseline = None if x.dtype == torch.float32 else channel_rms_norm_reference(x, **kw)
    return assert_matches(y, reference, baseline)


# LayerNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_reference(shape, dtype):
    check_layer(*layer_case(shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_layer_norm_channels_last(dtype):
    x, g = layer_case((2, 96, 5, 6), dtype, channels_last=True, g_shape=(1, 96, 1, 1))
    check_layer(x, g)
    assert channel_layer_norm(x, g, backend="triton").is_contiguous(
        memory_format=torch.channels_last
    )


def test_layer_norm_large_mean_small_spread_keeps_float32_precision():
    """Mean 1000, spread 1 (per pixel over channels): the naive formula fails 1e-5."""
    x, g = layer_case((2, 128, 4, 4), torch.float32, mean=1000.0, std=1.0)
    assert check_layer(x, g) <= 1e-6
    mean = x.mean(1, keepdim=True)
    naive_var = (x * x).mean(1, keepdim=True) - mean * mean
    naive = (x - mean) / torch.sqrt(naive_var.clamp_min(0) + 1e-5) * g.reshape(1, -1, 1, 1)
    exact = channel_layer_norm_reference(x.double(), g.double(), eps=1e-5)
    assert rel_error(naive, exact) > 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_layer_norm_reference_is_the_seed_module(dtype):
    """The reference is the seed's LayerNorm (its eps rule included), bit for bit."""
    module = LayerNorm(64).to(dtype)
    with torch.no_grad():
        module.g.copy_(randn((1, 64, 1, 1), dtype, mean=1.0, std=0.5, seed=7))
        x = randn((2, 64, 3, 3), dtype, mean=0.5, std=2.0, seed=8)
        assert torch.equal(channel_layer_norm_reference(x, module.g), module(x))
        check_layer(x, module.g)


# RMSNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_reference(shape, dtype):
    check_rms(*rms_case(shape, dtype))


@pytest.mark.parametrize(
    "features", [(), ("silu",), ("scale",), ("shift",), ("scale", "shift")], ids=str
)
def test_rms_norm_each_combination(features):
    check_rms(*rms_case((2, 64, 3, 5), torch.float32, features=features))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm_channels_last(dtype):
    check_rms(*rms_case((2, 96, 5, 6), dtype, channels_last=True))


def test_rms_norm_is_2x_rmsnorm():
    """denoising-diffusion-pytorch 2.x: ``F.normalize(x, dim=1) * g * sqrt(C)``, g [1, C, 1, 1]."""
    x = randn((2, 48, 3, 3), torch.float64, mean=0.5, std=2.0, seed=9)
    g = randn((1, 48, 1, 1), torch.float64, mean=1.0, std=0.5, seed=10)
    expected = F.normalize(x, dim=1) * g * 48**0.5
    assert torch.allclose(channel_rms_norm_reference(x, g), expected, rtol=1e-14, atol=0)
    assert rel_error(channel_rms_norm(x.float(), g.float(), backend="triton"), expected) <= 1e-5


def test_rms_norm_of_zero_pixels_is_zero_not_nan():
    x = torch.zeros(1, 16, 2, 2)
    y = channel_rms_norm(x, torch.ones(16), backend="triton")
    assert torch.equal(y, torch.zeros_like(x))


# settings and the CPU path at the big shapes


@pytest.mark.parametrize("channels", [64, 128, 384, 512, 1024])
@pytest.mark.parametrize("side", [1, 4, 32, 64, 256])
def test_settings_hold_all_channels(channels, side):
    s = channel_norm_settings(channels, side * side)
    assert s["BLOCK_C"] >= channels and s["BLOCK_S"] >= 2
    assert s["BLOCK_C"] * s["BLOCK_S"] <= max(4096, 2 * s["BLOCK_C"])


class GridRecorder:
    """Stands for a kernel: records the grid of each launch and runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


@pytest.mark.parametrize(
    "shape", [(1, 256, 1024, 1024), (2, 64, 2048, 2048), (70000, 32, 4, 4)], ids=str
)
def test_the_launch_grid_of_a_huge_image_is_within_cuda_limits(monkeypatch, shape):
    """256 channels at 1024 x 1024 is 65536 blocks of pixels per sample: over the y axis's 65535,
    fine along x. Launched on meta tensors with the kernel replaced: nothing is allocated."""
    n, c, h, w = shape
    recorder = GridRecorder()
    monkeypatch.setattr(cn_module, "_channel_norm_kernel", recorder)
    monkeypatch.setattr(_launch, "is_interpreted", lambda kernel: True)
    x = torch.empty(shape, device="meta")
    if n > _launch.MAX_GRID[1]:  # the batch is along y
        with pytest.raises(ValueError, match="over CUDA's limit of 65535"):
            channel_layer_norm(x, torch.ones(c, device="meta"), backend="triton")
        return
    channel_layer_norm(x, torch.ones(c, device="meta"), backend="triton")
    channel_rms_norm(x, torch.ones(c, device="meta"), backend="triton")
    settings = channel_norm_settings(c, h * w)
    for grid in recorder.grids:
        assert grid == (-(-h * w // settings["BLOCK_S"]), n)
        assert all(size <= limit for size, limit in zip(grid, _launch.MAX_GRID, strict=False))
    if shape[1:] == (256, 1024, 1024):
        assert recorder.grids[0][0] > _launch.MAX_GRID[1], "this shape needs x for the pixels"


def test_reference_at_the_widest_shape():
    x, g = layer_case((1, 1024, 64, 64), torch.float32, std=1.0)
    reference = channel_layer_norm_reference(x.double(), g.double(), eps=1e-5)
    assert rel_error(channel_layer_norm_reference(x, g), reference) <= 1e-5


# bad inputs

X = randn((2, 64, 4, 4))
G = torch.ones(64)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        bad_input(lambda: channel_layer_norm(X[0], G), ValueError, "x must be 4-d"),
        bad_input(lambda: channel_rms_norm(X[0, 0], G), ValueError, "got shape (4, 4)"),
        bad_input(lambda: channel_layer_norm(X.double(), G), TypeError, "float32, float16"),
        bad_input(
            lambda: channel_layer_norm(X, torch.ones(32)),
            ValueError,
            "g must be [64] or [1, 64, 1, 1], got (32,)",
        ),
        bad_input(
            lambda: channel_layer_norm(X.half(), G.bfloat16()),
            TypeError,
            "g must be torch.float16 (the input's) or float32, got torch.bfloat16",
        ),
        bad_input(
            lambda: channel_rms_norm(X, G.to("meta")), ValueError, "g is on meta but the input"
        ),
        bad_input(
            lambda: channel_rms_norm(X, G, scale=torch.ones(2, 32)),
            ValueError,
            "scale must be [2, 64] or [2, 64, 1, 1]",
        ),
        bad_input(
            lambda: channel_rms_norm(X, G, shift=torch.ones(2, 64, 4, 4)), ValueError, "shift"
        ),
        bad_input(lambda: channel_rms_norm(X, G, act="relu"), ValueError, "act must be one of"),
        bad_input(
            lambda: channel_layer_norm(X, G, out=torch.empty(2, 64, 4)), ValueError, "out must be"
        ),
        bad_input(
            lambda: channel_layer_norm(X.transpose(2, 3), G, backend="triton"),
            ValueError,
            "pass it contiguous or channels_last",
        ),
        bad_input(
            lambda: channel_layer_norm(torch.zeros(1, 9000, 1, 1), torch.ones(9000)),
            ValueError,
            "more than 8192 channels",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, message):
    assert_raises(call, error, message)


def check_around(x, g, backend="triton"):
    """The LayerNorm with what an attention's output adds around it: the to_out conv's bias
    before the statistics, the block's input (in another layout) after."""
    pre_bias = randn(x.shape[1:2], torch.float32, mean=0.7, seed=7, device=x.device.type)
    channels_last = x.is_contiguous(memory_format=torch.channels_last)
    residual = randn(
        x.shape, x.dtype, mean=-0.4, std=1.5, seed=8, device=x.device.type,
        channels_last=not channels_last,
    )  # fmt: skip
    residual_bias = randn(x.shape[1:2], torch.float32, mean=0.2, seed=9, device=x.device.type)
    out = poisoned(x.shape, x, channels_last=channels_last)
    n, c, h, w = x.shape
    concatenation = poisoned((n, c + 8, h, w), x)  # a skip's: the channels after the first 8
    kw = {"pre_bias": pre_bias, "residual": residual, "residual_bias": residual_bias}
    y = channel_layer_norm(x, g, out=out, also_out=concatenation[:, 8:], backend=backend, **kw)
    kw64 = {k: v.double() for k, v in kw.items()}
    eps = layer_norm_eps(x.dtype)
    reference = channel_layer_norm_reference(x.double(), g.double(), eps=eps, **kw64)
    baseline = None if x.dtype == torch.float32 else channel_layer_norm_reference(x, g, **kw)
    assert_matches(y, reference, baseline)
    assert torch.equal(concatenation[:, 8:], y) and torch.isnan(concatenation[:, :8]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_layer_norm_with_a_pre_bias_and_a_residual(dtype, backend):
    x, g = layer_case((2, 96, 5, 7), dtype)
    check_around(x, g, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm_with_a_residual(dtype):
    x, kw = rms_case((2, 64, 5, 6), dtype)
    kw["residual"] = randn((2, 64, 5, 6), dtype, mean=0.3, seed=9, channels_last=True)
    kw["residual_bias"] = randn((64,), torch.float32, mean=-0.2, seed=10)
    check_rms(x, kw)


# on a GPU: the compiled kernel


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [
        ((1, 64, 32, 32), False),
        ((16, 384, 16, 16), True),
        ((128, 512, 4, 4), False),
        ((2, 1024, 64, 64), True),
        ((4, 96, 1, 1), False),
    ],
    ids=str,
)
def test_compiled_kernels_on_cuda(shape, channels_last, dtype):
    x, g = layer_case(shape, dtype, channels_last=channels_last)
    check_layer(x.cuda(), g.cuda(), backend="auto")
    check_around(x.cuda(), g.cuda(), backend="auto")
    x, kw = rms_case(shape, dtype, channels_last=channels_last)
    check_rms(x.cuda(), {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
