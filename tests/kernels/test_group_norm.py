"""The fused GroupNorm kernel (under the Triton interpreter here) against its float64 reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ddpm_fast.kernels.group_norm as gn_module
from ddpm_fast.kernels import _launch
from ddpm_fast.kernels.group_norm import group_norm, group_norm_reference, group_norm_settings
from ddpm_fast.models.dd_pytorch_v1 import Block

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

# What the blocks around a GroupNorm add: none, the seed's (1.x) block, the original DDPM's.
FEATURES = {
    "bare": (),
    "affine": ("affine",),
    "seed_block": ("affine", "scale", "shift", "silu"),
    "ddpm_block": ("affine", "pre_bias", "silu"),
    "all": ("affine", "pre_bias", "scale", "shift", "silu"),
}
# (N, C, groups, H, W): C = 384 with 8 and 32 groups, 1 x 1 and 4 x 4 images, sizes that are
# no multiple of a block (48 and 12 channels a group, 15 and 63 positions).
SHAPES = [
    (2, 64, 8, 4, 4),
    (1, 384, 32, 4, 4),
    (1, 384, 8, 3, 5),
    (3, 32, 8, 1, 1),
    (2, 96, 32, 7, 9),
]


def make_case(
    shape,
    groups,
    dtype,
    features=FEATURES["all"],
    *,
    mean=0.5,
    std=2.0,
    param_dtype=None,
    channels_last=False,
    device="cpu",
):
    """(x, kwargs) for group_norm: random input with non-zero mean, random parameters."""
    n, c = shape[:2]
    pdt = param_dtype or dtype
    x = randn(shape, dtype, mean=mean, std=std, seed=1, device=device, channels_last=channels_last)
    kw = {"act": "silu" if "silu" in features else None}
    if "affine" in features:
        kw["weight"] = randn((c,), pdt, mean=1.0, std=0.5, seed=2, device=device)
        kw["bias"] = randn((c,), pdt, mean=0.2, std=0.5, seed=3, device=device)
    for i, name in enumerate(("pre_bias", "scale", "shift")):
        if name in features:
            kw[name] = randn((n, c), pdt, mean=0.1, std=0.7, seed=4 + i, device=device)
    return x, kw


def reference64(x, groups, kw):
    kw64 = {k: (f64(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return group_norm_reference(x.double(), groups, **kw64)


def check(x, groups, kw, *, split=None, backend="triton"):
    """Run the kernel into a NaN-poisoned output and check it by the dtype's rule."""
    out = poisoned(x.shape, x, channels_last=x.is_contiguous(memory_format=torch.channels_last))
    y = group_norm(x, groups, out=out, split=split, backend=backend, **kw)
    assert y is out and y.dtype == x.dtype
    baseline = None if x.dtype == torch.float32 else group_norm_reference(x, groups, **kw)
    return assert_matches(y, reference64(x, groups, kw), baseline)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    x, kw = make_case(shape[:2] + shape[3:], shape[2], dtype)
    check(x, shape[2], kw)


@pytest.mark.parametrize("features", list(FEATURES))
def test_each_combination_of_the_fused_parts(features):
    x, kw = make_case((2, 64, 5, 5), 8, torch.float32, FEATURES[features])
    check(x, 8, kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_channels_last(dtype):
    x, kw = make_case((2, 96, 5, 6), 8, dtype, channels_last=True)
    check(x, 8, kw)
    y = group_norm(x, 8, backend="triton", **kw)  # the output it allocates keeps the layout
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("split", [2, 5])
def test_split_reduction(split, dtype):
    """Batch 1: H x W cut in chunks (partial statistics, then merge and normalise)."""
    shape, groups = (1, 48, 9, 11), 8
    settings = group_norm_settings(1, 48, groups, 99, torch.device("cpu"), split)
    assert settings["chunks"] > 1
    x, kw = make_case(shape, groups, dtype)
    check(x, groups, kw, split=split)


def test_split_reduction_channels_last_and_one_channel_a_group():
    x, kw = make_case((1, 8, 6, 7), 8, torch.float32, channels_last=True)
    check(x, 8, kw, split=3)


def test_strided_views_need_no_copy():
    """A channel slice of a wider tensor (as after torch.cat) and a batch slice: not contiguous,
    but H x W still one strided axis, so the kernel reads them in place."""
    wide = randn((3, 96, 5, 5), mean=0.5, std=2.0, seed=14)
    x = wide[1:, 16:80]
    assert not x.is_contiguous()
    _, kw = make_case((2, 64, 5, 5), 8, torch.float32)
    check(x, 8, kw)
    check(
        wide.to(memory_format=torch.channels_last)[:, 32:],
        8,
        make_case((3, 64, 5, 5), 8, torch.float32)[1],
    )


def test_parameters_in_float32_with_half_input():
    x, kw = make_case((2, 64, 4, 4), 8, torch.bfloat16, param_dtype=torch.float32)
    y = group_norm(x, 8, backend="triton", **kw)
    baseline = group_norm_reference(x, 8, **kw)
    assert_matches(y, reference64(x, 8, kw), baseline)


def test_broadcast_and_strided_vectors():
    """scale/shift as the [N, C, 1, 1] halves of one projection (strided views), pre_bias [1, C]."""
    n, c = 2, 64
    x, kw = make_case((n, c, 4, 4), 8, torch.float32, FEATURES["affine"])
    scale, shift = randn((n, 2 * c, 1, 1), seed=9).chunk(2, dim=1)
    kw.update(scale=scale, shift=shift, pre_bias=randn((1, c), seed=10), act="silu")
    check(x, 8, kw)


@pytest.mark.parametrize("split", [None, 4])
def test_large_mean_small_spread_keeps_float32_precision(split):
    """Mean 1000, spread 1: the naive E[x^2] - E[x]^2 in float32 fails 1e-5; the kernel does not."""
    x, kw = make_case((1, 64, 8, 8), 8, torch.float32, mean=1000.0, std=1.0)
    kw["pre_bias"] = randn((1, 64), mean=3.0, seed=11)
    err = check(x, 8, kw, split=split)
    assert err <= 1e-6

    xb = (x + kw["pre_bias"].reshape(1, 64, 1, 1)).reshape(1, 8, -1)
    mean = xb.mean(-1, keepdim=True)
    naive_var = (xb * xb).mean(-1, keepdim=True) - mean * mean
    naive = ((xb - mean) / torch.sqrt(naive_var.clamp_min(0) + 1e-5)).reshape(x.shape)
    exact = group_norm_reference(x.double(), 8, pre_bias=kw["pre_bias"].double())
    assert rel_error(naive, exact) > 1e-5


def test_one_large_image_few_channels():
    """256 x 256 positions (the largest image): many tiles per group, through the split path."""
    x, kw = make_case((1, 8, 256, 256), 8, torch.float32, FEATURES["seed_block"])
    check(x, 8, kw, split=4)


def test_wide_channels_tiny_image():
    x, kw = make_case((1, 1024, 2, 2), 8, torch.float32)
    check(x, 8, kw)


def test_seed_block_computes_the_library_block():
    """Block = WeightStandardizedConv2d -> GroupNorm -> x * (scale + 1) + shift -> SiLU."""
    torch.manual_seed(0)
    block = Block(16, 32, groups=8).double()
    nn.init.normal_(block.norm.weight, 1.0, 0.3)
    nn.init.normal_(block.norm.bias, 0.0, 0.3)
    x = randn((2, 16, 6, 6), torch.float64, mean=0.3, std=1.5, seed=12)
    scale, shift = randn((2, 64, 1, 1), torch.float64, std=0.5, seed=13).chunk(2, dim=1)
    with torch.no_grad():
        expected = block(x, scale_shift=(scale, shift))
        conv = block.proj(x)
        y = group_norm(
            conv.float(), 8, block.norm.weight.float(), block.norm.bias.float(),
            scale=scale.float(), shift=shift.float(), eps=block.norm.eps, act="silu",
            backend="triton",
        )  # fmt: skip
    assert rel_error(y, expected) <= 1e-5


# launch settings for the shapes too big for the interpreter


@pytest.mark.parametrize("batch", [1, 16, 128])
@pytest.mark.parametrize(
    ("channels", "groups", "side"),
    [(64, 8, 256), (384, 32, 64), (1024, 32, 32), (1024, 8, 256), (512, 8, 4), (128, 32, 1)],
)
def test_settings_cover_every_position_once(batch, channels, groups, side):
    positions = side * side
    # a 132-multiprocessor GPU, as the benchmarks' H100/H200
    block_c, block_s = _launch.tile_shape(channels // groups, positions)
    chunks, chunk = _launch.plan_split(batch * groups, positions, block_s, 132)
    assert block_c >= channels // groups and block_c * block_s <= _launch.TILE_ELEMENTS
    assert chunk % block_s == 0 and (chunks - 1) * chunk < positions <= chunks * chunk
    if batch * groups < 264 and positions >= 8 * block_s:
        assert chunks > 1, "a small grid should split the reduction"
    if batch * groups >= 264:
        assert chunks == 1


@pytest.mark.parametrize("batch", [1, 2, 16, 128])
@pytest.mark.parametrize(
    ("channels", "groups", "side"),
    [
        (64, 8, 32),
        (128, 8, 32),
        (256, 8, 16),
        (512, 8, 4),
        (64, 32, 64),
        (128, 32, 256),
        (256, 8, 64),
    ],
)
def test_a_small_batch_splits_into_enough_programs(batch, channels, groups, side):
    """The CIFAR-10 U-Net's GroupNorms on a 132-multiprocessor GPU: where N x G programs are too
    few, the tile shrinks so that the split gives the GPU work (at least one program per
    multiprocessor where H x W has enough tiles of MIN_SPLIT_TILE elements); no split where a
    group fits one tile or is small (MIN_SPLIT_GROUP values: a split costs a launch), nor at
    large batch."""
    sms, positions = 132, side * side
    s = group_norm_settings(batch, channels, groups, positions, torch.device("cpu"), sms=sms)
    programs = batch * groups * s["chunks"]
    assert s["BLOCK_C"] * s["BLOCK_S"] <= _launch.TILE_ELEMENTS
    assert s["chunk"] % s["BLOCK_S"] == 0
    assert (s["chunks"] - 1) * s["chunk"] < positions <= s["chunks"] * s["chunk"]
    one_tile = _launch.tile_shape(channels // groups, positions)[1] >= positions
    small = channels // groups * positions <= gn_module.MIN_SPLIT_GROUP
    if batch * groups >= 2 * sms or one_tile or small:  # no split: a launch for little
        assert s["chunks"] == 1
    else:
        tile = min(positions * s["BLOCK_C"], gn_module.MIN_SPLIT_TILE)
        assert s["BLOCK_C"] * s["BLOCK_S"] >= tile
        room = positions * s["BLOCK_C"] // gn_module.MIN_SPLIT_TILE  # tiles H x W can give
        assert programs >= min(sms, batch * groups * room, batch * groups * _launch.MAX_SPLIT)


@pytest.mark.parametrize(("shape", "groups"), [((1, 1024, 64, 64), 32), ((1, 64, 256, 256), 8)])
def test_reference_at_large_shapes(shape, groups):
    """The reference (the CPU path) at the widest and at the largest image agrees with float64."""
    x, kw = make_case(shape, groups, torch.float32, FEATURES["seed_block"], std=1.0)
    assert rel_error(group_norm_reference(x, groups, **kw), reference64(x, groups, kw)) <= 1e-5


# dispatch


def test_cpu_tensors_run_the_reference_by_default(monkeypatch):
    class Unlaunchable:
        def __getitem__(self, grid):
            raise AssertionError("the kernel ran on a CPU tensor")

    monkeypatch.setattr(gn_module, "_group_norm_fused_kernel", Unlaunchable())
    monkeypatch.setattr(_launch, "is_interpreted", lambda kernel: True)
    monkeypatch.delenv(_launch.BACKEND_ENV, raising=False)
    x, kw = make_case((2, 64, 4, 4), 8, torch.float32)
    assert torch.equal(group_norm(x, 8, **kw), group_norm_reference(x, 8, **kw))
    monkeypatch.setenv(_launch.BACKEND_ENV, "triton")
    with pytest.raises(AssertionError, match="the kernel ran"):
        group_norm(x, 8, **kw)


def test_forcing_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_launch, "is_interpreted", lambda kernel: False)
    x, kw = make_case((1, 16, 2, 2), 8, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        group_norm(x, 8, backend="triton", **kw)


# bad inputs

X = randn((2, 64, 4, 4))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        bad_input(lambda: group_norm(X[0], 8), ValueError, "x must be 4-d, got shape (64, 4, 4)"),
        bad_input(
            lambda: group_norm(X, 6), ValueError, "num_groups must be a positive divisor of the 64"
        ),
        bad_input(lambda: group_norm(X, 0), ValueError, "num_groups"),
        bad_input(lambda: group_norm(X.double(), 8), TypeError, "float32, float16 or bfloat16"),
        bad_input(lambda: group_norm(X.to(torch.int32), 8), TypeError, "torch.int32"),
        bad_input(lambda: group_norm(X.numpy(), 8), TypeError, "x must be a torch.Tensor"),
        bad_input(lambda: group_norm(X, 8, randn((32,))), ValueError, "weight must be [64]"),
        bad_input(
            lambda: group_norm(X, 8, scale=randn((2, 63))), ValueError, "scale must be [2, 64]"
        ),
        bad_input(lambda: group_norm(X, 8, shift=randn((3, 64))), ValueError, "got (3, 64)"),
        bad_input(
            lambda: group_norm(X, 8, shift=randn((2, 64, 2, 1))), ValueError, "shift must be"
        ),
        bad_input(
            lambda: group_norm(X.half(), 8, scale=randn((2, 64), torch.bfloat16)),
            TypeError,
            "scale must be torch.float16 (the input's) or float32",
        ),
        bad_input(
            lambda: group_norm(X, 8, pre_bias=torch.zeros(2, 64, device="meta")),
            ValueError,
            "pre_bias is on meta but the input is on cpu",
        ),
        bad_input(lambda: group_norm(X, 8, act="gelu"), ValueError, "act must be one of"),
        bad_input(
            lambda: group_norm(X, 8, out=torch.empty(2, 64, 4, 4, dtype=torch.float16)),
            ValueError,
            "out must be (2, 64, 4, 4) torch.float32",
        ),
        bad_input(lambda: group_norm(X, 8, backend="cuda"), ValueError, "backend must be one of"),
        bad_input(
            lambda: group_norm(X, 8, split=0), ValueError, "split must be None or an int >= 1"
        ),
        bad_input(
            lambda: group_norm(X.transpose(2, 3), 8, backend="triton"),
            ValueError,
            "do not flatten to one axis; pass it contiguous or channels_last",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, message):
    assert_raises(call, error, message)


def test_transposed_input_runs_on_the_reference_path():
    x = X.transpose(2, 3)
    assert torch.equal(group_norm(x, 8, backend="torch"), group_norm_reference(x, 8))


def edge_case(shape, dtype=torch.float32):
    """An edge bias made the way the engine makes it: a 3x3 conv's weights and the constant
    (bias) its input carries."""
    from ddpm_fast.kernels.group_norm import edge_bias_of

    c = shape[1]
    weight = randn((c, 5, 3, 3), torch.float32, std=0.4, seed=31)
    return edge_bias_of(weight, randn((5,), torch.float32, mean=0.5, seed=32))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("shape", "split"), [((2, 64, 5, 6), None), ((1, 48, 9, 11), 3),
                                              ((2, 32, 1, 1), None), ((1, 32, 1, 7), None)],
                         ids=str)  # fmt: skip
def test_an_edge_bias_is_the_conv_of_a_constant(shape, split, dtype):
    """The pre-bias a 3x3 zero-padded conv makes of its input's per-channel bias: constant
    inside, less at the border rows and columns (and on 1-pixel images)."""
    x, kw = make_case(shape, 8, dtype)
    kw["edge_bias"] = edge_case(shape)
    check(x, 8, kw, split=split)


def test_the_edge_bias_map_is_the_conv_of_the_bias():
    from ddpm_fast.kernels.group_norm import edge_bias_map, edge_bias_of

    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    for h, w in [(5, 7), (1, 1), (2, 3)]:
        constant = bias.reshape(1, 4, 1, 1).expand(1, 4, h, w)
        want = torch.nn.functional.conv2d(constant, weight, padding=1)
        got = edge_bias_map(edge_bias_of(weight, bias).double(), h, w)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="edge_bias must be"):
        group_norm(X, 8, edge_bias=torch.zeros(3, 3, 3), backend="triton")


# on a GPU: the compiled kernel


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    ("shape", "groups", "channels_last"),
    [
        ((1, 64, 32, 32), 8, False),  # batch 1: the split path
        ((16, 384, 16, 16), 32, False),
        ((128, 512, 4, 4), 8, True),
        ((2, 1024, 64, 64), 32, True),
        ((1, 128, 256, 256), 32, False),
        ((4, 96, 1, 1), 32, False),
    ],
    ids=str,
)
def test_compiled_kernel_on_cuda(shape, groups, channels_last, dtype):
    for features in ("seed_block", "ddpm_block"):
        x, kw = make_case(
            shape, groups, dtype, FEATURES[features], device="cuda", channels_last=channels_last
        )
        check(x, groups, kw, backend="auto")
        check(x, groups, kw, backend="auto", split=3)
    kw["edge_bias"] = edge_case(shape).cuda()
    check(x, groups, kw, backend="auto")
    kw["residual"] = randn(shape, dtype, seed=21, device="cuda", channels_last=not channels_last)
    kw["residual_bias"] = randn(shape[1:2], torch.float32, seed=22, device="cuda")
    check(x, groups, kw, backend="auto")
    check(x, groups, kw, backend="auto", split=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("split", [None, 3], ids=["one_pass", "split"])
def test_a_residual_and_its_bias_added_after_the_activation(dtype, split):
    """A ResBlock's ``h + res_conv(x)`` in the norm's pass: the residual (channels_last here,
    another layout than x) and the residual conv's bias added after SiLU."""
    x, kw = make_case((2, 64, 5, 6), 8, dtype)
    kw["residual"] = randn((2, 64, 5, 6), dtype, mean=-0.3, std=1.5, seed=21, channels_last=True)
    kw["residual_bias"] = randn((64,), torch.float32, mean=0.4, seed=22)
    check(x, 8, kw, split=split)


def test_a_residual_bias_needs_a_residual_and_a_residual_its_shape():
    x, kw = make_case((2, 64, 4, 4), 8, torch.float32)
    with pytest.raises(ValueError, match="residual_bias needs a residual"):
        group_norm(x, 8, residual_bias=torch.zeros(64), backend="triton", **kw)
    with pytest.raises(ValueError, match="residual must be"):
        group_norm(x, 8, residual=torch.zeros(2, 64, 4, 5), backend="triton", **kw)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_out_a_channel_slice_of_a_concatenation_and_float32_from_half(backend):
    """The output written into its slice of a wider buffer (a skip concatenation made in place:
    the other channels untouched), the same values into a second (``also_out``), and a half
    input normalised into a float32 output."""
    x, kw = make_case((2, 32, 4, 4), 8, torch.float32)
    buffer = poisoned((2, 96, 4, 4), x)
    skip = poisoned((2, 48, 4, 4), x, channels_last=True)  # also written: a second output
    y = group_norm(x, 8, out=buffer[:, 32:64], also_out=skip[:, 16:], backend=backend, **kw)
    assert_matches(y, reference64(x, 8, kw))
    assert torch.isnan(buffer[:, :32]).all() and torch.isnan(buffer[:, 64:]).all()
    assert torch.equal(skip[:, 16:], y) and torch.isnan(skip[:, :16]).all()
    xh, kw = make_case((2, 32, 4, 4), 8, torch.bfloat16)
    out = poisoned((2, 32, 4, 4), torch.zeros(0))
    group_norm(xh, 8, out=out, backend=backend, **kw)
    assert out.dtype == torch.float32  # within bf16's rule (the kernel rounds once, not twice)
    assert_matches(out.bfloat16(), reference64(xh, 8, kw), group_norm_reference(xh, 8, **kw))
