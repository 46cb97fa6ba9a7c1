"""A 1x1 convolution (a linear map over channels, per pixel) with the norms and sums around it,
in one launch: what an attention block does before and after its core.

    y = norm_out( W @ norm_in(x) + bias ) + residual

``norm_in`` / ``norm_out`` are each none, the seed's channel LayerNorm with gain g
(``(x - mean_c) / sqrt(var_c + eps) * g``) or 2.x's RMSNorm (``F.normalize(x, dim=1) * g *
sqrt(C)``), over the channels of each pixel. The seed's linear attention is
``norm_in=LayerNorm`` into the qkv map, the attention core, then ``norm_out=LayerNorm`` (with the
to_out conv's bias before it and the block's input added after); the middle's full attention is
``norm_in=LayerNorm`` into qkv, scaled_dot_product_attention, then the projection with its bias
and the residual. Each saves the launches of a separate norm, bias and add.

A program holds ``BLOCK_S`` pixels of one sample and ``BLOCK_O`` output channels (all of them
where ``norm_out`` needs their statistics): the input statistics are two passes over the pixels'
C channels (the mean, then the centred variance: a large mean costs no precision), then
``tl.dot`` over chunks of ``BLOCK_K`` input channels, normalised as they are loaded. fp32 inputs
multiply in IEEE fp32 (no TF32); half inputs multiply in their dtype with fp32 accumulation, as
cuDNN's convolution does. Statistics and epilogue are fp32.

The input may be a [N, C, H, W] map (any layout whose H x W is one strided axis) or
scaled_dot_product_attention's output [N, heads, H * W, d] (``x_heads``), read in place: channel
``head * d + e`` of pixel s is ``x[n, head, s, e]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._launch import (
    INTERPRETED,
    OPS_NAMESPACE,
    OptionalTensor,
    add_residual,
    cast_to,
    cdiv,
    check_grid,
    check_input,
    check_out,
    check_param,
    check_residual,
    device_guard,
    jit,
    next_power_of_2,
    none_if_empty,
    per_channel,
    spatial_strides,
    tl,
    traced,
    use_triton,
    write_outputs,
)

NORMS = (None, "layer", "rms")
_NORM_CODE = {None: 0, "layer": 1, "rms": 2}
RMS_EPS = 1e-12  # F.normalize's
# norm_out holds all output channels of its pixels in one tile.
MAX_NORMED_OUT = 1024


@jit
def _load_input(x_base, offs_k, mask_k, offs_s, mask_s, D, sxH, sxD, sxS):
    """Channels ``offs_k`` of pixels ``offs_s`` in fp32 ([BLOCK_K, BLOCK_S]); channel k is at
    ``(k // D) * sxH + (k % D) * sxD`` (D = C for a plain map)."""
    channel = (offs_k // D) * sxH + (offs_k % D) * sxD
    ptrs = x_base + channel[:, None] + offs_s[None, :] * sxS
    return tl.load(ptrs, mask=mask_k[:, None] & mask_s[None, :], other=0.0).to(tl.float32)


@jit
def _projection_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    gin_ptr,
    gout_ptr,
    r_ptr,
    y_ptr,
    y2_ptr,
    C,
    O,  # noqa: E741 (the output channels, as C the input)
    HW,
    D,
    eps_in,
    eps_out,
    gain_in,
    gain_out,
    sxN,
    sxH,
    sxD,
    sxS,
    swO,
    swC,
    srN,
    srC,
    srS,
    syN,
    syC,
    syS,
    sy2N,
    sy2C,
    sy2S,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    NORM_IN: tl.constexpr,
    NORM_OUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_OUT2: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Program (block of pixels, block of output channels, sample). NORM_*: 0 none, 1 the
    LayerNorm, 2 the RMSNorm."""
    n = tl.program_id(2).to(tl.int64)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < HW
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    x_base = x_ptr + n * sxN
    mean = tl.zeros([BLOCK_S], tl.float32)
    rstd = tl.full([BLOCK_S], 1.0, tl.float32)
    if NORM_IN == 1:
        total = tl.zeros([BLOCK_S], tl.float32)
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xt = _load_input(x_base, offs_k, offs_k < C, offs_s, mask_s, D, sxH, sxD, sxS)
            total += tl.sum(xt, axis=0)
        mean = total / C
        m2 = tl.zeros([BLOCK_S], tl.float32)
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < C
            xt = _load_input(x_base, offs_k, mask_k, offs_s, mask_s, D, sxH, sxD, sxS)
            d = tl.where(mask_k[:, None], xt - mean[None, :], 0.0)
            m2 += tl.sum(d * d, axis=0)
        rstd = 1.0 / tl.sqrt(m2 / C + eps_in)
    elif NORM_IN == 2:
        squares = tl.zeros([BLOCK_S], tl.float32)
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xt = _load_input(x_base, offs_k, offs_k < C, offs_s, mask_s, D, sxH, sxD, sxS)
            squares += tl.sum(xt * xt, axis=0)
        rstd = gain_in / tl.maximum(tl.sqrt(squares), eps_in)
    acc = tl.zeros([BLOCK_O, BLOCK_S], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        xt = _load_input(x_base, offs_k, mask_k, offs_s, mask_s, D, sxH, sxD, sxS)
        if NORM_IN != 0:
            g = tl.load(gin_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            xt = (xt - mean[None, :]) * rstd[None, :] * g[:, None]
        w_ptrs = w_ptr + offs_o[:, None] * swO + offs_k[None, :] * swC
        w = tl.load(w_ptrs, mask=mask_o[:, None] & mask_k[None, :], other=0.0)
        if FP32_DOT:
            acc += tl.dot(w.to(tl.float32), xt, input_precision="ieee")
        elif INTERPRETED:  # the same bf16/fp16 values, multiplied exactly in fp32
            xh = cast_to(xt, w.dtype).to(tl.float32)
            acc += tl.dot(w.to(tl.float32), xh, input_precision="ieee")
        else:  # the weights' dtype, fp32 accumulation: a half-precision convolution's products
            acc += tl.dot(w, cast_to(xt, w.dtype))
    y = acc
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[:, None]
    if NORM_OUT != 0:  # over all O channels, which this program holds
        g = tl.load(gout_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
        if NORM_OUT == 1:
            mean_o = tl.sum(tl.where(mask_o[:, None], y, 0.0), axis=0) / O
            d = tl.where(mask_o[:, None], y - mean_o[None, :], 0.0)
            y = d / tl.sqrt(tl.sum(d * d, axis=0) / O + eps_out)[None, :]
        else:
            y = tl.where(mask_o[:, None], y, 0.0)
            y = y * (gain_out / tl.maximum(tl.sqrt(tl.sum(y * y, axis=0)), eps_out))[None, :]
        y = y * g[:, None]
    mask = mask_o[:, None] & mask_s[None, :]
    if HAS_RESIDUAL:
        r_ptrs = r_ptr + n * srN + offs_o[:, None] * srC + offs_s[None, :] * srS
        y += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    y_ptrs = y_ptr + n * syN + offs_o[:, None] * syC + offs_s[None, :] * syS
    tl.store(y_ptrs, cast_to(y, y_ptr.dtype.element_ty), mask=mask)
    if HAS_OUT2:
        y2_ptrs = y2_ptr + n * sy2N + offs_o[:, None] * sy2C + offs_s[None, :] * sy2S
        tl.store(y2_ptrs, cast_to(y, y2_ptr.dtype.element_ty), mask=mask)


def projection_settings(channels_in: int, channels_out: int, positions: int, norm_out) -> dict:
    """Tiles: every side of a ``tl.dot`` >= 16; all output channels in one tile with
    ``norm_out``, then fewer pixels, so that the accumulator stays 8192 values."""
    block_k = 32 if channels_in > 16 else 16
    if norm_out is not None:
        block_o = max(16, next_power_of_2(channels_out))
    else:
        block_o = max(16, min(64, next_power_of_2(channels_out)))
    block_s = max(16, min(64, next_power_of_2(positions), 8192 // block_o))
    warps = 8 if block_o * block_s >= 4096 else 4
    return {"BLOCK_O": block_o, "BLOCK_K": block_k, "BLOCK_S": block_s, "num_warps": warps}


def _norm_eps(norm: str | None, eps: float | None, dtype: torch.dtype) -> float:
    if norm == "rms":
        return RMS_EPS
    if eps is not None:
        return float(eps)
    return 1e-5 if dtype == torch.float32 else 1e-3  # the seed's LayerNorm


def projection(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_in: str | None = None,
    g_in: torch.Tensor | None = None,
    eps_in: float | None = None,
    norm_out: str | None = None,
    g_out: torch.Tensor | None = None,
    eps_out: float | None = None,
    residual: torch.Tensor | None = None,
    x_heads: bool = False,
    spatial: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    also_out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``norm_out(weight @ norm_in(x) + bias) + residual`` per pixel (module docstring).

    x [N, C, H, W]; or, with ``x_heads``, [N, heads, H * W, d] (C = heads * d) and ``spatial`` =
    (H, W). weight [O, C] or [O, C, 1, 1] (a 1x1 conv's), bias [O]; g_in [C], g_out [O] with
    their norms ("layer" or "rms"); ``eps_*`` the LayerNorms' (default: the seed's, 1e-5 in fp32
    and 1e-3 otherwise). residual [N, O, H, W]; ``out`` (any layout; default: channels_last, the
    layout scaled_dot_product_attention reads qkv from without a copy) and ``also_out`` get the
    result, in x's dtype or float32. Parameters in x's dtype or float32; a float32 weight with a
    half x multiplies in fp32 (a network's last conv, kept in fp32 on its input made fp32).
    """
    c, spatial = _check_input(x, x_heads, spatial)
    n = x.shape[0]
    h, w = spatial
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        raise ValueError("weight must be [O, C] or [O, C, 1, 1]")
    if weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"weight must be a 1x1 conv's, got {tuple(weight.shape)}")
    o = weight.shape[0]
    if weight.shape[1] != c:
        raise ValueError(f"weight {tuple(weight.shape)} does not take the {c} channels of x")
    check_param("weight", weight, x)
    weight = weight.reshape(o, c)
    for name, norm, g, channels in (("in", norm_in, g_in, c), ("out", norm_out, g_out, o)):
        if norm not in NORMS:
            raise ValueError(f"norm_{name} must be one of {NORMS}, got {norm!r}")
        if (norm is None) != (g is None):
            raise ValueError(f"norm_{name} and g_{name} go together")
        if g is not None:
            per_channel(f"g_{name}", g, x, channels)
    if norm_out is not None and o > MAX_NORMED_OUT:
        raise ValueError(f"norm_out holds at most {MAX_NORMED_OUT} output channels, got {o}")
    if bias is not None:
        bias = per_channel("bias", bias, x, o)
    shape = (n, o, h, w)
    like = x.new_empty(()).expand(shape)  # the result's shape, dtype and device
    check_residual(residual, None, like)
    for t in (out, also_out):
        if t is not None:
            check_out(t, shape, x, torch.float32)
    eps_in = _norm_eps(norm_in, eps_in, x.dtype)
    eps_out = _norm_eps(norm_out, eps_out, x.dtype)

    if traced():  # torch.compile / torch.export: one op of their graph
        y = torch.ops.ddpm_fast.projection(
            x, weight, bias, norm_in or "", g_in, eps_in, norm_out or "", g_out, eps_out,
            residual, x_heads, h, w, backend or "",
        )  # fmt: skip
        return write_outputs(y, out, also_out)

    if not use_triton(backend, x, _projection_kernel):
        y = projection_reference(
            x, weight, bias, norm_in=norm_in, g_in=g_in, eps_in=eps_in, norm_out=norm_out,
            g_out=g_out, eps_out=eps_out, residual=residual, x_heads=x_heads, spatial=spatial,
        )  # fmt: skip
        return write_outputs(y, out, also_out)

    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    if x_heads:
        d = x.shape[3]
        sx = (x.stride(0), x.stride(1), x.stride(3), x.stride(2))
    else:
        d = c
        sxn, sxc, sxs = spatial_strides("x", x)
        sx = (sxn, 0, sxc, sxs)
    sr = spatial_strides("residual", residual) if residual is not None else (0, 0, 0)
    y2 = out if also_out is None else also_out
    settings = projection_settings(c, o, h * w, norm_out)
    grid = (cdiv(h * w, settings["BLOCK_S"]), cdiv(o, settings["BLOCK_O"]), n)
    check_grid(grid, "projection")
    gin = x if g_in is None else g_in.reshape(c)
    gout = x if g_out is None else g_out.reshape(o)
    with device_guard(x):
        _projection_kernel[grid](
            x, weight, x if bias is None else bias, gin, gout,
            x if residual is None else residual, out, y2,
            c, o, h * w, d, eps_in, eps_out, math.sqrt(c), math.sqrt(o),
            *sx, weight.stride(0), weight.stride(1), *sr,
            *spatial_strides("out", out), *spatial_strides("also_out", y2),
            NORM_IN=_NORM_CODE[norm_in], NORM_OUT=_NORM_CODE[norm_out],
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            HAS_OUT2=also_out is not None, FP32_DOT=weight.dtype == torch.float32, **settings,
        )  # fmt: skip
    return out


def _check_input(
    x: torch.Tensor, x_heads: bool, spatial: tuple[int, int] | None
) -> tuple[int, tuple[int, int]]:
    """(C, (H, W)) of the input."""
    check_input("x", x, (4,))
    if not x_heads:
        return x.shape[1], tuple(x.shape[2:])
    if spatial is None or len(spatial) != 2 or spatial[0] * spatial[1] != x.shape[2]:
        raise ValueError(
            f"x_heads: spatial must be (H, W) with H * W = {x.shape[2]} (x {tuple(x.shape)}), "
            f"got {spatial!r}"
        )
    return x.shape[1] * x.shape[3], (int(spatial[0]), int(spatial[1]))


def _norm_reference(x: torch.Tensor, norm: str | None, g, eps: float) -> torch.Tensor:
    if norm is None:
        return x
    g = g.to(x.dtype).reshape(1, -1, 1, 1)
    if norm == "rms":
        return F.normalize(x, dim=1) * g * x.shape[1] ** 0.5
    var = torch.var(x, dim=1, unbiased=False, keepdim=True)
    mean = torch.mean(x, dim=1, keepdim=True)
    return (x - mean) * (var + eps).rsqrt() * g


def projection_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_in: str | None = None,
    g_in: torch.Tensor | None = None,
    eps_in: float | None = None,
    norm_out: str | None = None,
    g_out: torch.Tensor | None = None,
    eps_out: float | None = None,
    residual: torch.Tensor | None = None,
    x_heads: bool = False,
    spatial: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The unfused sequence of :func:`projection` (norm, 1x1 conv, norm, add), in x's dtype."""
    if x_heads:  # [N, heads, H * W, d] -> [N, heads * d, H, W]
        n, heads, _, d = x.shape
        x = x.transpose(2, 3).reshape(n, heads * d, *spatial)
    o = weight.shape[0]
    if weight.dtype == torch.float32 and x.dtype != weight.dtype and norm_in is None:
        x = x.float()  # a float32 conv of the half input
    weight = weight.reshape(o, -1, 1, 1).to(x.dtype)
    x = _norm_reference(x, norm_in, g_in, _norm_eps(norm_in, eps_in, x.dtype))
    y = F.conv2d(x, weight, None if bias is None else bias.to(x.dtype))
    y = _norm_reference(y, norm_out, g_out, _norm_eps(norm_out, eps_out, x.dtype))
    return add_residual(y, residual, None)


# The launcher as a custom op (torch.compile / torch.export see one op; see _launch.traced): its
# implementation is the launcher, into an output allocated as its fake implementation does.


@torch.library.custom_op(f"{OPS_NAMESPACE}::projection", mutates_args=())
def projection_op(
    x: Tensor,
    weight: Tensor,
    bias: OptionalTensor,
    norm_in: str,
    g_in: OptionalTensor,
    eps_in: float,
    norm_out: str,
    g_out: OptionalTensor,
    eps_out: float,
    residual: OptionalTensor,
    x_heads: bool,
    height: int,
    width: int,
    backend: str,
) -> Tensor:

    out = _projection_out(x, weight, height, width)
    return projection(
        x, weight, bias, norm_in=none_if_empty(norm_in), g_in=g_in, eps_in=eps_in,
        norm_out=none_if_empty(norm_out), g_out=g_out, eps_out=eps_out, residual=residual,
        x_heads=x_heads, spatial=(height, width), out=out, backend=none_if_empty(backend),
    )  # fmt: skip


def _projection_out(x: Tensor, weight: Tensor, height: int, width: int) -> Tensor:
    """The op's output: [N, O, H, W] channels_last, x's dtype."""
    shape = (x.shape[0], weight.shape[0], height, width)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@projection_op.register_fake
def _(x, weight, *args) -> Tensor:
    height, width = args[-3], args[-2]
    return _projection_out(x, weight, height, width)
