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

from ._launch import (
    cast_to,
    cdiv,
    check_grid,
    check_input,
    check_out,
    device_guard,
    jit,
    num_warps,
    per_channel,
    per_sample_channel,
    silu,
    spatial_strides,
    tile_shape,
    tl,
    use_triton,
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
    g_ptr,
    sc_ptr,
    sh_ptr,
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
):
    """Program (block of pixels, sample): the pixels along x, whose limit is 2**31 - 1 programs,
    not y's 65535. CENTER: LayerNorm, else RMSNorm (F.normalize)."""
    n = tl.program_id(1).to(tl.int64)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_s < HW)[None, :]
    x_ptrs = x_ptr + n * sxN + offs_c[:, None] * sxC + offs_s[None, :] * sxS
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
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
    y_ptrs = y_ptr + n * syN + offs_c[:, None] * syC + offs_s[None, :] * syS
    tl.store(y_ptrs, cast_to(y, y_ptr.dtype.element_ty), mask=mask)


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
) -> torch.Tensor:
    n, c, h, w = x.shape
    if out is None:
        out = torch.empty_like(x)  # keeps channels_last
    if x.numel() == 0:
        return out
    sx, sy = spatial_strides("x", x), spatial_strides("out", out)
    sc = x if scale is None else scale
    sh = x if shift is None else shift
    settings = channel_norm_settings(c, h * w)
    grid = channel_norm_grid(n, h * w, settings["BLOCK_S"])
    with device_guard(x):
        _channel_norm_kernel[grid](
            x, out, g, sc, sh, c, h * w, eps, gain, *sx, *sy, g.stride(0),
            sc.stride(0), sc.stride(1), sh.stride(0), sh.stride(1),
            CENTER=center, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
            SILU=act == "silu", **settings,
        )  # fmt: skip
    return out


def _check(x: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    check_input("x", x, (4,))
    if x.shape[1] > MAX_CHANNELS:
        raise ValueError(f"x {tuple(x.shape)} has more than {MAX_CHANNELS} channels")
    g = per_channel("g", g, x, x.shape[1])
    if out is not None:
        check_out(out, x.shape, x)
    return g


def channel_layer_norm(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    eps: float | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The seed's LayerNorm over channels: ``(x - mean_c) / sqrt(var_c + eps) * g``.

    x [N, C, H, W] (contiguous or channels_last), g [C] or [1, C, 1, 1] (x's dtype or float32);
    eps defaults to the library's 1e-5 in fp32 and 1e-3 otherwise.
    """
    g_flat = _check(x, g, out)
    eps = layer_norm_eps(x.dtype) if eps is None else eps
    if not use_triton(backend, x, _channel_norm_kernel):
        y = _channel_layer_norm_eager(x, g_flat, eps)
        return y if out is None else out.copy_(y)
    return _launch(x, g_flat, None, None, out, center=True, eps=eps, gain=1.0, act=None)


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
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """denoising-diffusion-pytorch 2.x's RMSNorm, then scale/shift and SiLU:
    ``act(F.normalize(x, dim=1) * g * sqrt(C) * (1 + scale) + shift)``.

    x [N, C, H, W] (contiguous or channels_last), g [C] or [1, C, 1, 1], scale and shift
    [N or 1, C] or [N or 1, C, 1, 1]; parameters in x's dtype or float32; ``act`` None or "silu".
    """
    g_flat = _check(x, g, out)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    sc = None if scale is None else per_sample_channel("scale", scale, x)
    sh = None if shift is None else per_sample_channel("shift", shift, x)
    if not use_triton(backend, x, _channel_norm_kernel):
        y = channel_rms_norm_reference(x, g, scale=scale, shift=shift, act=act)
        return y if out is None else out.copy_(y)
    gain = math.sqrt(x.shape[1])
    return _launch(x, g_flat, sc, sh, out, center=False, eps=RMS_EPS, gain=gain, act=act)


def channel_layer_norm_reference(
    x: torch.Tensor, g: torch.Tensor, *, eps: float | None = None
) -> torch.Tensor:
    """The seed's ``LayerNorm.forward``, in x's dtype (pass ``eps`` to emulate another dtype's)."""
    eps = layer_norm_eps(x.dtype) if eps is None else eps
    var = torch.var(x, dim=1, unbiased=False, keepdim=True)
    mean = torch.mean(x, dim=1, keepdim=True)
    return (x - mean) * (var + eps).rsqrt() * g.to(x.dtype).reshape(1, -1, 1, 1)


def channel_rms_norm_reference(
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    act: str | None = None,
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
    return y
