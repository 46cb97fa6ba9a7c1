"""The projection kernel (1x1 conv with the norms, bias and residual around it; under the Triton
interpreter here) against its float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast.kernels.projection import projection, projection_reference

from .common import DTYPES, HAS_TRITON, assert_matches, dtype_id, poisoned, randn

pytestmark = pytest.mark.skipif(
    not HAS_TRITON, reason="needs triton: the kernels run under its interpreter here"
)

# (norm_in, norm_out, bias, residual): the seed's qkv (LayerNorm in), its to_out (bias, LayerNorm
# out, residual), the middle's to_out (bias, residual), 2.x's (RMSNorm), and the bare conv.
FORMS = {
    "qkv": ("layer", None, False, False),
    "linear_out": (None, "layer", True, True),
    "attention_out": (None, None, True, True),
    "rms_both": ("rms", "rms", True, True),
    "bare": (None, None, False, False),
}
# (N, C, O, H, W): channels and pixels off the tiles' sizes, a 1 x 1 image, 96 -> 288 (qkv).
SHAPES = [(2, 32, 48, 4, 4), (1, 96, 288, 3, 5), (3, 20, 24, 1, 1), (1, 64, 64, 8, 9)]


def make_case(shape, dtype, form, *, device="cpu", channels_last=False):
    n, c, o, h, w = shape
    norm_in, norm_out, has_bias, has_residual = FORMS[form]
    x = randn((n, c, h, w), dtype, mean=0.4, std=1.5, seed=1, device=device,
              channels_last=channels_last)  # fmt: skip
    weight = randn((o, c, 1, 1), dtype, std=c**-0.5, seed=2, device=device)
    kw = {"norm_in": norm_in, "norm_out": norm_out}
    if norm_in:
        kw["g_in"] = randn((c,), torch.float32, mean=1.0, std=0.3, seed=3, device=device)
    if norm_out:
        kw["g_out"] = randn((o,), torch.float32, mean=1.0, std=0.3, seed=4, device=device)
    if has_bias:
        kw["bias"] = randn((o,), torch.float32, mean=0.3, std=0.5, seed=5, device=device)
    if has_residual:
        kw["residual"] = randn((n, o, h, w), dtype, mean=-0.2, seed=6, device=device,
                               channels_last=not channels_last)  # fmt: skip
    return x, weight, kw


def reference64(x, weight, kw, **extra):
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    eps = 1e-5 if x.dtype == torch.float32 else 1e-3  # x's dtype's, as the kernel takes it
    eps = {"eps_in": eps, "eps_out": eps}
    return projection_reference(x.double(), weight.double(), **kw64, **eps, **extra)


def check(x, weight, kw, backend="triton", **extra):
    o = weight.shape[0]
    n, h, w = x.shape[0], *(extra.get("spatial") or x.shape[2:])
    out = poisoned((n, o, h, w), x, channels_last=True)
    y = projection(x, weight, out=out, backend=backend, **kw, **extra)
    assert y is out
    baseline = None if x.dtype == torch.float32 else projection_reference(x, weight, **kw, **extra)
    return assert_matches(y, reference64(x, weight, kw, **extra), baseline)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, form, dtype):
    x, weight, kw = make_case(shape, dtype, form)
    check(x, weight, kw)


@pytest.mark.parametrize("form", ["qkv", "linear_out"])
def test_channels_last_input_and_a_second_output(form):
    """The input channels_last, the output NCHW, and the same values into a channel slice of a
    wider tensor (a skip written into its concatenation)."""
    x, weight, kw = make_case((2, 48, 40, 5, 6), torch.float32, form, channels_last=True)
    out = poisoned((2, 40, 5, 6), x)
    concatenation = poisoned((2, 56, 5, 6), x)
    y = projection(x, weight, out=out, also_out=concatenation[:, 16:], backend="triton", **kw)
    assert_matches(y, reference64(x, weight, kw))
    assert torch.equal(concatenation[:, 16:], y) and torch.isnan(concatenation[:, :16]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("physical", ["tokens_by_head", "heads_by_token"])
def test_the_attention_output_read_in_place(dtype, physical):
    """scaled_dot_product_attention's output [N, heads, H * W, d], in either layout its kernels
    write, projected with its bias and residual as the [N, heads * d, H, W] map it stands for."""
    n, heads, d, h, w, o = 2, 3, 16, 4, 5, 40
    x = randn((n, h * w, heads, d) if physical == "tokens_by_head" else (n, heads, h * w, d),
              dtype, seed=7)  # fmt: skip
    if physical == "tokens_by_head":
        x = x.transpose(1, 2)
    _, weight, kw = make_case((n, heads * d, o, h, w), dtype, "attention_out")
    check(x, weight, kw, x_heads=True, spatial=(h, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_a_float32_conv_of_a_half_input_into_a_float32_output(dtype):
    """A network's last 1x1 conv, kept in fp32: the half input's values multiplied in fp32,
    with the bias, into an fp32 output; fp32's tolerance against the same sum in float64."""
    x, weight, kw = make_case((2, 48, 6, 5, 5), dtype, "attention_out")
    del kw["residual"]
    weight = weight.float()
    out = poisoned((2, 6, 5, 5), torch.zeros(0))
    projection(x, weight, out=out, backend="triton", **kw)
    want = projection_reference(x.double(), weight.double(), kw["bias"].double())
    assert_matches(out, want)
    torch.testing.assert_close(projection_reference(x, weight, **kw), want.float())


def test_the_reference_is_the_unfused_modules():
    """LayerNorm in, conv, LayerNorm out as the seed writes them (its LayerNorm over dim 1)."""
    x, weight, kw = make_case((2, 32, 48, 4, 4), torch.float64, "linear_out")
    kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    kw["norm_in"], kw["g_in"] = "layer", torch.rand(32, dtype=torch.float64) + 0.5
    kw["eps_in"] = kw["eps_out"] = 1e-5
    g_in, g_out = kw["g_in"].reshape(1, -1, 1, 1), kw["g_out"].reshape(1, -1, 1, 1)

    def layer_norm(t, g):
        var, mean = torch.var_mean(t, dim=1, unbiased=False, keepdim=True)
        return (t - mean) / (var + 1e-5).sqrt() * g

    want = layer_norm(F.conv2d(layer_norm(x, g_in), weight, kw["bias"]), g_out) + kw["residual"]
    assert torch.allclose(projection_reference(x, weight, **kw), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"weight": torch.zeros(8, 16)}, ValueError, "does not take the 32 channels"),
        ({"weight": torch.zeros(8, 32, 3, 3)}, ValueError, "a 1x1 conv's"),
        ({"norm_in": "layer"}, ValueError, "norm_in and g_in go together"),
        ({"norm_out": "batch", "g_out": torch.ones(8)}, ValueError, "norm_out must be one of"),
        ({"residual": torch.zeros(2, 8, 4, 5)}, ValueError, "residual must be"),
        ({"weight": torch.zeros(8, 32, dtype=torch.bfloat16)}, TypeError, "weight must be"),
        ({"out": torch.zeros(2, 8, 4, 4, dtype=torch.float16)}, ValueError, "out must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, message):
    args = {"weight": torch.zeros(8, 32), **kwargs}
    with pytest.raises(error, match=message):
        projection(torch.zeros(2, 32, 4, 4), backend="triton", **args)


def test_x_heads_needs_the_image_size():
    with pytest.raises(ValueError, match="spatial must be"):
        projection(torch.zeros(1, 2, 12, 8), torch.zeros(4, 16), x_heads=True, spatial=(3, 5))


# on a GPU: the compiled kernel


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize(
    "shape", [(1, 64, 384, 32, 32), (16, 512, 512, 4, 4), (64, 128, 128, 16, 16)], ids=str
)
def test_compiled_kernel_on_cuda(shape, form, dtype):
    x, weight, kw = make_case(shape, dtype, form, device="cuda")
    check(x, weight, kw, backend="auto")
