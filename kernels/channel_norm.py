"""The channel norms of the attention paths and of denoising-diffusion-pytorch 2.x's blocks,
per pixel over the C channels of x [N, C, H, W]:

- :func:`channel_layer_norm`, the seed's (1.x) PreNorm LayerNorm with gain ``g``:
  ``(x - mean_c) / sqrt(var_c + eps) * g``, eps 1e-5 in fp32 and 1e-3 otherwise, as the library;
- :func:`channel_rms_norm`, 2.x's RMSNorm: ``F.normalize(x, dim=1) * g * sqrt(C)``
  (``x / max(||x||_2, 1e-12)``), then optionally ``* (1 + scale[n, c]) + shift[n, c]`` and SiLU.

One kernel does both: a program holds all C channels of ``BLOCK_S`` pixels in registers, so the
statistics are passes over registers (fp32: a first mean ``k``, the mean of ``x - k``, then
the centred variance, so a large mean costs no precision) and x is read once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._launch import (
    OPS_NAMESPACE,
    OptionalTensor,
    add_residual,
    cast_to,
    cdiv,
    check_grid,
    check_input,
    check_out,
    check_residual,
    device_guard,
    jit,
    none_if_empty,
    num_warps,
    per_channel,
    per_sample_channel,
    silu,
    spatial_strides,
    tile_shape,
    tl,
    traced,
    use_triton,
    write_outputs,
)

ACTIVATIONS = (None, "silu")
# All channels of a pixel sit in one tile; wider inputs would need a loop over channels.
MAX_CHANNELS = 8192
RMS_EPS = 1e-12  # F.normalize's


def layer_norm_eps(dtype: torch.dtype) -> float:
    """denoising-diffusion-pytorch's LayerNorm epsilon: 1e-5 in fp32, 1e-3 otherwise."""
    return 1e-5 if dtype == torch.float32 else 1e-3


@jit
def _channel_norm_kernel(
    x_ptr,
    y_ptr,
    y2_ptr,
    g_ptr,
    sc_ptr,
    sh_ptr,
    pb_ptr,
    r_ptr,
    rb_ptr,
    C,
    HW,
    eps,
    gain,
    sxN,
    sxC,
    sxS,
    syN,
    syC,
    syS,
    sy2N,
    sy2C,
    sy2S,
    srN,
    srC,
    srS,
    sg,
    sscN,
    sscC,
    sshN,
    sshC,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    CENTER: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    HAS_PRE_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_RES_BIAS: tl.constexpr,
    HAS_OUT2: tl.constexpr,
):
    """Program (block of pixels, sample): the pixels along x, whose limit is 2**31 - 1 programs,
    not y's 65535. CENTER: LayerNorm, else RMSNorm (F.normalize). The pre-bias (a conv's bias)
    is added before the statistics, the residual after everything."""
    n = tl.program_id(1).to(tl.int64)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_s < HW)[None, :]
    x_ptrs = x_ptr + n * sxN + offs_c[:, None] * sxC + offs_s[None, :] * sxS
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE_BIAS:
        pb = tl.load(pb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        x = tl.where(mask, x + pb[:, None], 0.0)
    if CENTER:
        # Shift by a first estimate of the mean, so that the mean and the variance are of
        # values of the spread's magnitude, however large the mean is.
        k = tl.sum(x, axis=0) / C
        v = tl.where(mask, x - k[None, :], 0.0)
        mean = tl.sum(v, axis=0) / C
        d = tl.where(mask, v - mean[None, :], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
        y = d * rstd[None, :]
    else:
        norm = tl.sqrt(tl.sum(x * x, axis=0))
        y = x / tl.maximum(norm, eps)[None, :]
    g = tl.load(g_ptr + offs_c * sg, mask=mask_c, other=0.0).to(tl.float32) * gain
    y = y * g[:, None]
    if HAS_SCALE:
        sc = tl.load(sc_ptr + n * sscN + offs_c * sscC, mask=mask_c, other=0.0).to(tl.float32)
        y = y * (1.0 + sc[:, None])
    if HAS_SHIFT:
        sh = tl.load(sh_ptr + n * sshN + offs_c * sshC, mask=mask_c, other=0.0).to(tl.float32)
        y = y + sh[:, None]
    if SILU:
        y = silu(y)
    if HAS_RESIDUAL:
        r_ptrs = r_ptr + n * srN + offs_c[:, None] * srC + offs_s[None, :] * srS
        y += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES_BIAS:
            y += tl.load(rb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + n * syN + offs_c[:, None] * syC + offs_s[None, :] * syS
    tl.store(y_ptrs, cast_to(y, y_ptr.dtype.element_ty), mask=mask)
    if HAS_OUT2:
        y2_ptrs = y2_ptr + n * sy2N + offs_c[:, None] * sy2C + offs_s[None, :] * sy2S
        tl.store(y2_ptrs, cast_to(y, y2_ptr.dtype.element_ty), mask=mask)


def channel_norm_settings(channels: int, positions: int) -> dict:
    """Launch settings: all channels by ``BLOCK_S`` pixels per program."""
    block_c, block_s = tile_shape(channels, positions)
    return {"BLOCK_C": block_c, "BLOCK_S": block_s, "num_warps": num_warps(block_c * block_s)}


def channel_norm_grid(batch: int, positions: int, block_s: int) -> tuple[int, int]:
    """(blocks of pixels, samples): a 256-channel 1024 x 1024 image is 65536 blocks of 16 pixels,
    over y's limit, so the pixels go along x."""
    return check_grid((cdiv(positions, block_s), batch), "channel_norm")


def _launch(
    x: torch.Tensor,
    g: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    out: torch.Tensor | None,
    *,
    center: bool,
    eps: float,
    gain: float,
    act: str | None,
    pre_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_bias: torch.Tensor | None = None,
    also_out: torch.Tensor | None = None,
) -> torch.Tensor:
    n, c, h, w = x.shape
    if out is None:
        out = torch.empty_like(x)  # keeps channels_last
    if x.numel() == 0:
        return out
    sx, sy = spatial_strides("x", x), spatial_strides("out", out)
    sc = x if scale is None else scale
    sh = x if shift is None else shift
    pb = x if pre_bias is None else pre_bias
    r = x if residual is None else residual
    sr = spatial_strides("residual", r)
    rb = x if residual_bias is None else residual_bias
    y2 = out if also_out is None else also_out
    sy2 = spatial_strides("also_out", y2)
    settings = channel_norm_settings(c, h * w)
    grid = channel_norm_grid(n, h * w, settings["BLOCK_S"])
    with device_guard(x):
        _channel_norm_kernel[grid](
            x, out, y2, g, sc, sh, pb, r, rb, c, h * w, eps, gain, *sx, *sy, *sy2, *sr,
            g.stride(0),
            sc.stride(0), sc.stride(1), sh.stride(0), sh.stride(1),
            CENTER=center, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
            SILU=act == "silu", HAS_PRE_BIAS=pre_bias is not None,
            HAS_RESIDUAL=residual is not None, HAS_RES_BIAS=residual_bias is not None,
            HAS_OUT2=also_out is not None, **settings,
        )  # fmt: skip
    return out


def _check(
    x: torch.Tensor,
    g: torch.Tensor,
    out: torch.Tensor | None,
    also_out: torch.Tensor | None,
    residual: torch.Tensor | None,
    residual_bias: torch.Tensor | None,
) -> torch.Tensor:
    check_input("x", x, (4,))
    if x.shape[1] > MAX_CHANNELS:
        raise ValueError(f"x {tuple(x.shape)} has more than {MAX_CHANNELS} channels")
    g = per_channel("g", g, x, x.shape[1])
    for t in (out, also_out):
        if t is not None:
            check_out(t, x.shape, x)
    check_residual(residual, residual_bias, x)
    return g


def channel_layer_norm(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    eps: float | None = None,
    pre_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    also_out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The seed's LayerNorm over channels: ``(x - mean_c) / sqrt(var_c + eps) * g``.

    x [N, C, H, W] (contiguous or channels_last), g [C] or [1, C, 1, 1] (x's dtype or float32);
    eps defaults to the library's 1e-5 in fp32 and 1e-3 otherwise. ``pre_bias`` [C] (the bias of
    the conv before) is added to x first, ``residual`` (x's shape) to the result: an attention's
    ``LayerNorm(to_out(h)) + x`` in one pass (``residual_bias`` [C] with it); ``also_out``
    gets the same values as ``out`` (a skip written into its concatenation).
    """
    g_flat = _check(x, g, out, also_out, residual, residual_bias)
    if pre_bias is not None:
        pre_bias = per_channel("pre_bias", pre_bias, x, x.shape[1])
    eps = layer_norm_eps(x.dtype) if eps is None else eps
    if traced():  # torch.compile / torch.export: one op of their graph
        y = torch.ops.ddpm_fast.channel_norm(
            x, g, False, eps, None, None, "", pre_bias, residual, residual_bias, backend or ""
        )
        return write_outputs(y, out, also_out)
    if not use_triton(backend, x, _channel_norm_kernel):
        if pre_bias is not None:
            x = x + pre_bias.to(x.dtype).reshape(1, -1, 1, 1)
        y = _channel_layer_norm_eager(x, g_flat, eps)
        return write_outputs(add_residual(y, residual, residual_bias), out, also_out)
    return _launch(
        x, g_flat, None, None, out, center=True, eps=eps, gain=1.0, act=None,
        pre_bias=pre_bias, residual=residual, residual_bias=residual_bias, also_out=also_out,
    )  # fmt: skip


def _channel_layer_norm_eager(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """The launcher's PyTorch path. channels_last: F.layer_norm over the NHWC view, one fused
    pass and no copy; otherwise the reference with one reduction for both statistics."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), g.to(x.dtype), None, eps)
        return nhwc.permute(0, 3, 1, 2)
    var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
    return (x - mean).mul_((var + eps).rsqrt()).mul_(g.to(x.dtype).reshape(1, -1, 1, 1))


def channel_rms_norm(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: str | None = None,
    pre_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    also_out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """denoising-diffusion-pytorch 2.x's RMSNorm, then scale/shift and SiLU:
    ``act(F.normalize(x, dim=1) * g * sqrt(C) * (1 + scale) + shift)`` (+ ``residual``, x's
    shape: a ResnetBlock's skip sum in the same pass, with ``residual_bias`` [C]); ``also_out``
    gets the same values as ``out``; ``pre_bias`` [C] (the conv before's bias) is added to x
    first.

    x [N, C, H, W] (contiguous or channels_last), g [C] or [1, C, 1, 1], scale and shift
    [N or 1, C] or [N or 1, C, 1, 1]; parameters in x's dtype or float32; ``act`` None or "silu".
    """
    g_flat = _check(x, g, out, also_out, residual, residual_bias)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    sc = None if scale is None else per_sample_channel("scale", scale, x)
    sh = None if shift is None else per_sample_channel("shift", shift, x)
    if pre_bias is not None:
        pre_bias = per_channel("pre_bias", pre_bias, x, x.shape[1])
    if traced():  # torch.compile / torch.export: one op of their graph
        y = torch.ops.ddpm_fast.channel_norm(
            x, g, True, RMS_EPS, scale, shift, act or "", pre_bias, residual, residual_bias,
            backend or "",
        )  # fmt: skip
        return write_outputs(y, out, also_out)
    if not use_triton(backend, x, _channel_norm_kernel):
        if pre_bias is not None:
            x = x + pre_bias.to(x.dtype).reshape(1, -1, 1, 1)
        y = channel_rms_norm_reference(x, g, scale=scale, shift=shift, act=act)
        return write_outputs(add_residual(y, residual, residual_bias), out, also_out)
    gain = math.sqrt(x.shape[1])
    return _launch(
        x, g_flat, sc, sh, out, center=False, eps=RMS_EPS, gain=gain, act=act,
        pre_bias=pre_bias, residual=residual, residual_bias=residual_bias, also_out=also_out,
    )  # fmt: skip


def channel_layer_norm_reference(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    eps: float | None = None,
    pre_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The seed's ``LayerNorm.forward``, in x's dtype (pass ``eps`` to emulate another dtype's),
    after ``x + pre_bias`` and before ``+ residual``."""
    eps = layer_norm_eps(x.dtype) if eps is None else eps
    if pre_bias is not None:
        x = x + pre_bias.to(x.dtype).reshape(1, -1, 1, 1)
    var = torch.var(x, dim=1, unbiased=False, keepdim=True)
    mean = torch.mean(x, dim=1, keepdim=True)
    y = (x - mean) * (var + eps).rsqrt() * g.to(x.dtype).reshape(1, -1, 1, 1)
    return add_residual(y, residual, residual_bias)


def channel_rms_norm_reference(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: str | None = None,
    residual: torch.Tensor | None = None,
    residual_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """2.x's ``RMSNorm.forward`` and its block's scale/shift and SiLU, in x's dtype."""
    c = x.shape[1]
    y = F.normalize(x, dim=1) * g.to(x.dtype).reshape(1, c, 1, 1) * c**0.5
    if scale is not None:
        y = y * (scale.to(x.dtype).reshape(scale.shape[0], c, 1, 1) + 1)
    if shift is not None:
        y = y + shift.to(x.dtype).reshape(shift.shape[0], c, 1, 1)
    if act == "silu":
        y = F.silu(y)
    return add_residual(y, residual, residual_bias)


# The launcher as a custom op (torch.compile / torch.export see one op; see _launch.traced): its
# implementation is the launcher, into an output allocated as its fake implementation does.


@torch.library.custom_op(f"{OPS_NAMESPACE}::channel_norm", mutates_args=())
def channel_norm_op(
    x: Tensor,
    g: Tensor,
    rms: bool,
    eps: float,
    scale: OptionalTensor,
    shift: OptionalTensor,
    act: str,
    pre_bias: OptionalTensor,
    residual: OptionalTensor,
    residual_bias: OptionalTensor,
    backend: str,
) -> Tensor:

    around = {"pre_bias": pre_bias, "residual": residual, "residual_bias": residual_bias}
    if rms:
        return channel_rms_norm(
            x, g, scale=scale, shift=shift, act=none_if_empty(act), out=torch.empty_like(x),
            backend=none_if_empty(backend), **around,
        )  # fmt: skip
    return channel_layer_norm(
        x, g, eps=eps, out=torch.empty_like(x), backend=none_if_empty(backend), **around
    )


@channel_norm_op.register_fake
def _(x, *args) -> Tensor:
    return torch.empty_like(x)
