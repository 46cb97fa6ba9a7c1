"""The linear attention kernels (under the Triton interpreter here) against float64, and against
the seed's (1.x) LinearAttention module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddpm_fast.kernels.linear_attention import (
    MAX_HEAD_DIM,
    MAX_MEMORY,
    MEMORY_TILE_ELEMENTS,
    linear_attention,
    linear_attention_reference,
    linear_attention_settings,
)
from ddpm_fast.models.dd_pytorch_v1 import LinearAttention

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

# (B, heads, dim_head, H, W, memory M or None): the default 4 x 32, 1 x 1 and 4 x 4 images,
# positions off the block (35, 81), head dims under 16 and not a power of two.
SHAPES = [
    (2, 4, 32, 4, 4, None),
    (1, 4, 32, 5, 7, 4),
    (2, 2, 16, 1, 1, None),
    (1, 2, 8, 3, 3, 2),
    (1, 2, 20, 9, 9, None),
    (1, 1, 32, 9, 9, 4),
]


def make_case(b, heads, d, h, w, memory, dtype, *, mean=0.3, std=1.5, device="cpu", **layout):
    qkv = randn((b, 3 * heads * d, h, w), dtype, mean=mean, std=std, seed=1, device=device)
    if layout.get("channels_last"):
        qkv = qkv.to(memory_format=torch.channels_last)
    if layout.get("flat"):
        qkv = qkv.flatten(2)
    mem_kv = None if memory is None else randn((2, heads, d, memory), dtype, seed=2, device=device)
    # 1.x (no memory) divides v by the positions; 2.x (memory) does not
    kw = {"mem_kv": mem_kv, "v_scale": 1.0 / (h * w) if memory is None else 1.0}
    return qkv, heads, kw


def check(qkv, heads, kw, *, split=None, backend="triton"):
    b, c = qkv.shape[:2]
    out_shape = (b, c // 3, *qkv.shape[2:])
    channels_last = qkv.dim() == 4 and qkv.is_contiguous(memory_format=torch.channels_last)
    out = poisoned(out_shape, qkv, channels_last=channels_last)
    y = linear_attention(qkv, heads, out=out, split=split, backend=backend, **kw)
    assert y is out and y.dtype == qkv.dtype
    reference = linear_attention_reference(
        qkv.double(), heads, **{**kw, "mem_kv": f64(kw["mem_kv"])}
    )
    baseline = None if qkv.dtype == torch.float32 else linear_attention_reference(qkv, heads, **kw)
    return assert_matches(y, reference, baseline)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    check(*make_case(*shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("memory", [None, 4])
def test_split_positions(memory, dtype):
    """Batch 1: the context is merged from chunks of positions (max, sum, context per chunk)."""
    assert linear_attention_settings(4, 32, 12 * 12, torch.device("cpu"), 3)["chunks"] == 3
    check(*make_case(1, 4, 32, 12, 12, memory, dtype), split=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_channels_last_and_flat_inputs(dtype):
    qkv, heads, kw = make_case(2, 2, 16, 5, 6, 4, dtype, channels_last=True)
    check(qkv, heads, kw)
    assert linear_attention(qkv, heads, backend="triton", **kw).is_contiguous(
        memory_format=torch.channels_last
    )
    check(*make_case(2, 2, 16, 5, 6, None, dtype, flat=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("memory", [MAX_MEMORY, 77])
def test_many_memory_slots_in_tiles(memory, dtype):
    """2.x memory at the widest head: the output kernel takes the slots BLOCK_M at a time (all 256
    in one tile at d = 128 would not fit a GPU's shared memory; the compile test checks that
    the tiled kernel does), the last tile partly past the last slot."""
    settings = linear_attention_settings(1, MAX_HEAD_DIM, 9, torch.device("cpu"), memory=memory)
    assert settings["BLOCK_M"] < memory
    check(*make_case(1, 1, MAX_HEAD_DIM, 3, 3, memory, dtype, std=3.0))


@pytest.mark.parametrize("dim_head", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("memory", [1, 4, 40, 256])
def test_memory_tiles_stay_within_their_budget(dim_head, memory):
    s = linear_attention_settings(4, dim_head, 64, torch.device("cpu"), memory=memory)
    assert s["BLOCK_M"] >= 16 and s["BLOCK_M"] & (s["BLOCK_M"] - 1) == 0
    assert s["BLOCK_D"] * s["BLOCK_M"] <= max(MEMORY_TILE_ELEMENTS, 16 * s["BLOCK_D"])
    assert s["BLOCK_M"] >= min(memory, MEMORY_TILE_ELEMENTS // s["BLOCK_D"])


def test_large_logits_do_not_overflow():
    """Softmaxes subtract their max: logits around 60 +- 20 (exp would overflow float32)."""
    check(*make_case(1, 2, 16, 6, 6, 4, torch.float32, mean=60.0, std=20.0), split=2)


def test_memory_in_float32_with_bfloat16_qkv():
    qkv, heads, kw = make_case(1, 2, 16, 4, 4, 4, torch.bfloat16)
    kw["mem_kv"] = kw["mem_kv"].float()
    y = linear_attention(qkv, heads, backend="triton", **kw)
    reference = linear_attention_reference(qkv.double(), heads, mem_kv=kw["mem_kv"].double())
    baseline = linear_attention_reference(qkv, heads, mem_kv=kw["mem_kv"].bfloat16())
    assert_matches(y, reference, baseline)


@pytest.mark.parametrize("split", [None, 2])
def test_seed_linear_attention_module(split):
    """The seed's LinearAttention up to its to_out: the kernel on its to_qkv output, with
    ``v_scale = 1 / (H * W)``, computes what the module computes (float64 module)."""
    torch.manual_seed(0)
    module = LinearAttention(24, heads=4, dim_head=32).double()
    module.to_out = nn.Identity()
    x = randn((2, 24, 6, 5), torch.float64, mean=0.2, std=1.0, seed=3)
    with torch.no_grad():
        expected = module(x)
        qkv = module.to_qkv(x).float()
    y = linear_attention(qkv, 4, v_scale=1 / 30, split=split, backend="triton")
    assert y.shape == (2, 128, 6, 5)
    assert rel_error(y, expected) <= 1e-5


def test_library_2x_math():
    """2.x: memory keys/values prepended to k and v (repeated over the batch), no division of v."""
    b, heads, d, n, m = 2, 2, 8, 5, 3
    qkv = randn((b, 3 * heads * d, n), torch.float64, seed=4)
    mem_kv = randn((2, heads, d, m), torch.float64, seed=5)
    q, k, v = (t.reshape(b, heads, d, n) for t in qkv.chunk(3, dim=1))
    k = torch.cat((mem_kv[0].expand(b, -1, -1, -1), k), dim=-1)
    v = torch.cat((mem_kv[1].expand(b, -1, -1, -1), v), dim=-1)
    q, k = q.softmax(dim=-2) * d**-0.5, k.softmax(dim=-1)
    context = torch.einsum("b h d n, b h e n -> b h d e", k, v)
    expected = torch.einsum("b h d e, b h d n -> b h e n", context, q).reshape(b, heads * d, n)
    assert torch.allclose(linear_attention_reference(qkv, heads, mem_kv=mem_kv), expected)
    y = linear_attention(qkv.float(), heads, mem_kv=mem_kv.float(), backend="triton")
    assert rel_error(y, expected) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("memory", [None, 4])
def test_one_launch_where_the_positions_are_not_split(memory, dtype, monkeypatch):
    """Up to 16 x 16 positions (and wherever one chunk is asked for) one kernel computes a
    head's context and then its output; the two-kernel path is not launched."""
    import ddpm_fast.kernels.linear_attention as la

    assert linear_attention_settings(4, 32, 16 * 16, torch.device("cpu"))["chunks"] == 1
    assert linear_attention_settings(1, 32, 17 * 16, torch.device("cpu"))["chunks"] > 1
    monkeypatch.setattr(la, "_output_kernel", None)  # the two-kernel path would fail
    check(*make_case(2, 4, 32, 16, 16, memory, dtype))
    check(*make_case(1, 2, 16, 20, 21, memory, dtype), split=1)


# settings and the CPU path at the big shapes


@pytest.mark.parametrize("batch", [1, 16, 128])
@pytest.mark.parametrize("side", [1, 4, 32, 64, 128])
@pytest.mark.parametrize("dim_head", [16, 32, 64])
def test_settings_cover_every_position_once(batch, side, dim_head):
    s = linear_attention_settings(batch * 4, dim_head, side * side, torch.device("cpu"))
    positions = side * side
    assert s["BLOCK_D"] >= max(16, dim_head) and s["BLOCK_N"] >= 16
    assert s["chunk"] % s["BLOCK_N"] == 0
    assert (s["chunks"] - 1) * s["chunk"] < positions <= s["chunks"] * s["chunk"]


def test_reference_at_the_largest_image():
    qkv, heads, kw = make_case(1, 4, 32, 128, 128, None, torch.float32)
    reference = linear_attention_reference(qkv.double(), heads, v_scale=kw["v_scale"])
    assert rel_error(linear_attention_reference(qkv, heads, **kw), reference) <= 1e-5


# bad inputs

QKV = randn((2, 3 * 4 * 8, 3, 3))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        bad_input(lambda: linear_attention(QKV[0, 0], 4), ValueError, "qkv must be 3-d or 4-d"),
        bad_input(
            lambda: linear_attention(QKV, 5),
            ValueError,
            "qkv (2, 96, 3, 3) must have 3 * heads * dim_head channels; heads=5",
        ),
        bad_input(lambda: linear_attention(QKV[:, :95], 4), ValueError, "does not divide 95 / 3"),
        bad_input(lambda: linear_attention(QKV.double(), 4), TypeError, "float32, float16"),
        bad_input(
            lambda: linear_attention(QKV, 4, mem_kv=torch.zeros(2, 4, 16, 4)),
            ValueError,
            "mem_kv must be [2, 4, 8, M]",
        ),
        bad_input(
            lambda: linear_attention(QKV, 4, mem_kv=torch.zeros(2, 4, 8, 0)),
            ValueError,
            "with 1 <= M <= 256",
        ),
        bad_input(
            lambda: linear_attention(QKV.bfloat16(), 4, mem_kv=torch.zeros(2, 4, 8, 4).half()),
            TypeError,
            "mem_kv must be torch.bfloat16 (the input's) or float32",
        ),
        bad_input(
            lambda: linear_attention(QKV, 4, mem_kv=torch.zeros(2, 4, 8, 4, device="meta")),
            ValueError,
            "mem_kv is on meta",
        ),
        bad_input(
            lambda: linear_attention(QKV, 4, out=torch.empty(2, 32, 9)),
            ValueError,
            "out must be (2, 32, 3, 3)",
        ),
        bad_input(
            lambda: linear_attention(torch.zeros(1, 3 * 256, 2, 2), 1),
            ValueError,
            "dim_head 256",
        ),
        bad_input(lambda: linear_attention(QKV, 4, split=-1), ValueError, "split must be None"),
        bad_input(
            lambda: linear_attention(QKV.transpose(2, 3), 4, backend="triton"),
            ValueError,
            "do not flatten",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, message):
    assert_raises(call, error, message)


# on a GPU: the compiled kernels


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 4, 32, 32, 32, None),  # batch 1: split positions
        (16, 4, 32, 16, 16, 4),
        (128, 4, 32, 8, 8, None),
        (2, 4, 32, 128, 128, 4),
        (4, 8, 64, 4, 4, None),
        (3, 4, 32, 1, 1, 4),
    ],
    ids=str,
)
def test_compiled_kernels_on_cuda(shape, dtype):
    qkv, heads, kw = make_case(*shape, dtype, device="cuda")
    check(qkv, heads, kw, backend="auto")
    check(qkv, heads, kw, backend="auto", split=3)
    check(qkv, heads, kw, backend="auto", split=1)
