"""The launchers' PyTorch paths (CPU tensors, ``backend="torch"``), which reorder the reference's
arithmetic to save passes over the data: they must still compute the reference's function, by
the same rule as the kernels (fp32: 1e-5 of a float64 reference; half: 2x PyTorch's error)."""

from __future__ import annotations

import pytest
import torch

from ddpm_fast.kernels.channel_norm import channel_layer_norm, channel_layer_norm_reference
from ddpm_fast.kernels.group_norm import group_norm, group_norm_reference
from ddpm_fast.kernels.linear_attention import linear_attention, linear_attention_reference

from .common import DTYPES, assert_matches, dtype_id, f64, poisoned, randn


def f64_kwargs(kw: dict) -> dict:
    return {k: (f64(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "parts",
    [("scale", "shift", "affine", "silu"), ("scale",), ("shift", "silu"), ("scale", "affine")],
    ids="+".join,
)
def test_group_norm_with_a_batch_wide_scale_and_shift(parts, dtype):
    """A sampler step's (scale, shift): one row for the whole batch, folded into the affine."""
    x = randn((3, 32, 5, 6), dtype, mean=0.4, std=2.0, seed=1)
    kw = {"act": "silu" if "silu" in parts else None}
    if "affine" in parts:
        kw["weight"] = randn((32,), torch.float32, mean=1.0, std=0.5, seed=2)
        kw["bias"] = randn((32,), torch.float32, mean=0.2, std=0.5, seed=3)
    row = randn((1, 64), torch.float32, mean=0.1, std=0.7, seed=4)  # [1, 2C], as the engine's
    if "scale" in parts:
        kw["scale"] = row[:, :32]
    if "shift" in parts:
        kw["shift"] = row[:, 32:]
    out = poisoned(x.shape, x)
    y = group_norm(x, 8, out=out, backend="torch", **kw)
    assert y is out
    reference = group_norm_reference(x.double(), 8, **f64_kwargs(kw))
    baseline = None if dtype == torch.float32 else group_norm_reference(x, 8, **kw)
    assert_matches(y, reference, baseline)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_channel_layer_norm(dtype, channels_last):
    x = randn((2, 48, 5, 7), dtype, mean=1.5, std=0.8, seed=1, channels_last=channels_last)
    g = randn((48,), dtype, mean=1.0, std=0.5, seed=2)
    out = poisoned(x.shape, x, channels_last=channels_last)
    y = channel_layer_norm(x, g, eps=1e-5, out=out, backend="torch")
    reference = channel_layer_norm_reference(x.double(), g.double(), eps=1e-5)
    baseline = None if dtype == torch.float32 else channel_layer_norm_reference(x, g, eps=1e-5)
    assert_matches(y, reference, baseline)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("memory", [None, 4], ids=["1.x", "2.x-memory"])
def test_linear_attention(memory, dtype):
    heads, d, h, w = 2, 16, 6, 5
    qkv = randn((2, 3 * heads * d, h, w), dtype, mean=0.3, std=1.5, seed=1)
    mem_kv = None if memory is None else randn((2, heads, d, memory), dtype, seed=2)
    kw = {"mem_kv": mem_kv, "v_scale": 1.0 / (h * w) if memory is None else 0.5}
    out = poisoned((2, heads * d, h, w), qkv)
    y = linear_attention(qkv, heads, out=out, backend="torch", **kw)
    reference = linear_attention_reference(qkv.double(), heads, **f64_kwargs(kw))
    baseline = None if dtype == torch.float32 else linear_attention_reference(qkv, heads, **kw)
    assert_matches(y, reference, baseline)
