"""GroupNorm with everything around it, in one pass over the statistics and one over the output:

    y = act( GN_affine(x + pre_bias[n, c]) * (1 + scale[n, c]) + shift[n, c] )

``pre_bias``, ``scale``, ``shift``, the affine ``weight``/``bias`` are each optional; ``act`` is
SiLU or none. The seed's blocks are GroupNorm -> scale/shift -> SiLU; the original DDPM's add the
time embedding before the second GroupNorm (``pre_bias``), then SiLU.

Statistics are fp32 and stable for inputs with a large mean relative to their spread. Every
value is first shifted by ``k``, the mean of the first tile of the program's chunk (an estimate
of the mean: ``x - k`` is exact in fp32 for values within a factor two of ``k``, and one outlier
moves ``k`` by its share of a tile only); the pre-bias is added after the shift. Each tile's
per-channel mean and centred sum of squares are merged with Chan's formula, and the output is
``((x - k + b) - mean) * rstd``, so the mean is never rounded at the magnitude of the input.

At batch 1 the N x G programs of the one-kernel path leave a big GPU idle: then the reduction over
H x W is split in chunks (``_group_norm_partial_kernel`` writes each chunk's statistics, and
``_group_norm_apply_kernel`` merges them and normalises its chunk). :func:`plan_split` chooses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._launch import (
    OPS_NAMESPACE,
    OptionalTensor,
    add_residual,
    cast_to,
    cdiv,
    check_input,
    check_out,
    check_param,
    check_residual,
    check_split,
    device_guard,
    jit,
    next_power_of_2,
    none_if_empty,
    num_warps,
    per_sample_channel,
    plan_split,
    silu,
    sm_count,
    spatial_strides,
    tile_shape,
    tl,
    traced,
    use_triton,
    write_outputs,
)

ACTIVATIONS = (None, "silu")
# Elements of the smallest tile a split reduction shrinks to (a program's worth of work).
MIN_SPLIT_TILE = 256
# A group of at most this many values is never split by itself (group_norm_settings).
MIN_SPLIT_GROUP = 32768


@jit
def _channel_vector(
    ptr, off, stride, Cg, other: tl.constexpr, BLOCK_C: tl.constexpr, HAS: tl.constexpr
):
    """A per-channel vector of the group in fp32, or ``other`` everywhere when absent."""
    if HAS:
        offs_c = tl.arange(0, BLOCK_C)
        v = tl.load(ptr + off + offs_c * stride, mask=offs_c < Cg, other=other).to(tl.float32)
    else:
        v = tl.full([BLOCK_C], other, tl.float32)
    return v


@jit
def _edge_bias(eb_ptr, offs_c, mask_c, offs_s, H, W, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """[BLOCK_C, BLOCK_S]: what a 3x3, zero-padded conv adds to its output for a constant input
    at each position: ``sum of T[c, ky, kx]`` over the taps that land inside the H x W image
    (``eb_ptr`` + c * 9: T of channel c, row major)."""
    y = offs_s // W
    x = offs_s % W
    rows = ((y > 0).to(tl.float32), tl.full([BLOCK_S], 1.0, tl.float32), (y < H - 1).to(tl.float32))
    cols = ((x > 0).to(tl.float32), tl.full([BLOCK_S], 1.0, tl.float32), (x < W - 1).to(tl.float32))
    e = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for ky in tl.static_range(3):
        for kx in tl.static_range(3):
            t = tl.load(eb_ptr + offs_c * 9 + ky * 3 + kx, mask=mask_c, other=0.0)
            e += t.to(tl.float32)[:, None] * (rows[ky] * cols[kx])[None, :]
    return e


@jit
def _chunk_stats(
    x_base, sxC, sxS, pb, k, Cg, s_begin, s_end, eb_base, H, W,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_EDGE: tl.constexpr,
):  # fmt: skip
    """Mean and centred sum of squares of ``(x - k) + pb (+ edge bias)`` over the group's channels
    and positions ``[s_begin, s_end)``: per-channel tiles merged with Chan's formula, then across
    channels."""
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < Cg
    mean_c = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_c = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < s_end)[None, :]
        ptrs = x_base + offs_c[:, None] * sxC + offs_s[None, :] * sxS
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        v = (v - k) + pb[:, None]
        if HAS_EDGE:
            v += _edge_bias(eb_base, offs_c, mask_c, offs_s, H, W, BLOCK_C, BLOCK_S)
        v = tl.where(mask, v, 0.0)
        n_a = (s0 - s_begin).to(tl.float32)
        n_b = tl.minimum(s_end - s0, BLOCK_S).to(tl.float32)
        tile_mean = tl.sum(v, axis=1) / n_b
        d = tl.where(mask, v - tile_mean[:, None], 0.0)
        delta = tile_mean - mean_c
        n_ab = n_a + n_b
        mean_c += delta * (n_b / n_ab)
        m2_c += tl.sum(d * d, axis=1) + delta * delta * (n_a * n_b / n_ab)
    mean = tl.sum(mean_c, axis=0) / Cg
    dm = tl.where(mask_c, mean_c - mean, 0.0)
    m2 = tl.sum(m2_c, axis=0) + (s_end - s_begin).to(tl.float32) * tl.sum(dm * dm, axis=0)
    return mean, m2


@jit
def _apply_chunk(
    x_base,
    y_base,
    y2_base,
    r_base,
    sxC,
    sxS,
    syC,
    syS,
    sy2C,
    sy2S,
    srC,
    srS,
    pb,
    rb,
    k,
    mean,
    a,
    b,
    Cg,
    s_begin,
    s_end,
    eb_base,
    H,
    W,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SILU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_OUT2: tl.constexpr,
    HAS_EDGE: tl.constexpr,
):
    """y = act((((x - k) + pb) - mean) * a + b) (+ residual + rb) over positions
    ``[s_begin, s_end)``, stored in y (and in y2)."""
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < Cg
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < s_end)[None, :]
        v = tl.load(x_base + offs_c[:, None] * sxC + offs_s[None, :] * sxS, mask=mask, other=0.0)
        v = v.to(tl.float32) - k + pb[:, None]
        if HAS_EDGE:
            v += _edge_bias(eb_base, offs_c, mask_c, offs_s, H, W, BLOCK_C, BLOCK_S)
        y = (v - mean) * a[:, None] + b[:, None]
        if SILU:
            y = silu(y)
        if HAS_RESIDUAL:
            r_ptrs = r_base + offs_c[:, None] * srC + offs_s[None, :] * srS
            y += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32) + rb[:, None]
        y_ptrs = y_base + offs_c[:, None] * syC + offs_s[None, :] * syS
        tl.store(y_ptrs, cast_to(y, y_base.dtype.element_ty), mask=mask)
        if HAS_OUT2:
            y2_ptrs = y2_base + offs_c[:, None] * sy2C + offs_s[None, :] * sy2S
            tl.store(y2_ptrs, cast_to(y, y2_base.dtype.element_ty), mask=mask)


@jit
def _group_setup(
    x_ptr,
    pb_ptr,
    G,
    Cg,
    sxN,
    sxC,
    spbN,
    spbC,
    BLOCK_C: tl.constexpr,
    HAS_PRE_BIAS: tl.constexpr,
):
    """Sample, first channel, the group's base pointer and its pre-bias vector."""
    pid = tl.program_id(0)
    n = (pid // G).to(tl.int64)
    c0 = (pid % G) * Cg
    x_base = x_ptr + n * sxN + c0 * sxC
    pb = _channel_vector(pb_ptr, n * spbN + c0 * spbC, spbC, Cg, 0.0, BLOCK_C, HAS_PRE_BIAS)
    return n, c0, x_base, pb


@jit
def _shift_estimate(
    x_base, sxC, sxS, Cg, s_begin, s_end, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr
):
    """``k``: the mean of the chunk's first tile, which the statistics subtract from x."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = s_begin + tl.arange(0, BLOCK_S)
    mask = (offs_c < Cg)[:, None] & (offs_s < s_end)[None, :]
    ptrs = x_base + offs_c[:, None] * sxC + offs_s[None, :] * sxS
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    total = tl.sum(tl.sum(x, axis=1), axis=0)
    return total / tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)


@jit
def _output_coefficients(
    w_ptr,
    b_ptr,
    sc_ptr,
    sh_ptr,
    n,
    c0,
    Cg,
    rstd,
    sscN,
    sscC,
    sshN,
    sshC,
    BLOCK_C: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    """Per-channel (a, b) with y = (x_centred) * a + b: the affine, the scale and the shift."""
    w = _channel_vector(w_ptr, c0, 1, Cg, 1.0, BLOCK_C, HAS_WEIGHT)
    bias = _channel_vector(b_ptr, c0, 1, Cg, 0.0, BLOCK_C, HAS_BIAS)
    scale = _channel_vector(sc_ptr, n * sscN + c0 * sscC, sscC, Cg, 0.0, BLOCK_C, HAS_SCALE)
    shift = _channel_vector(sh_ptr, n * sshN + c0 * sshC, sshC, Cg, 0.0, BLOCK_C, HAS_SHIFT)
    return rstd * w * (1.0 + scale), bias * (1.0 + scale) + shift


@jit
def _group_norm_fused_kernel(
    x_ptr,
    y_ptr,
    y2_ptr,
    pb_ptr,
    eb_ptr,
    w_ptr,
    b_ptr,
    sc_ptr,
    sh_ptr,
    r_ptr,
    rb_ptr,
    G,
    Cg,
    HW,
    W,
    eps,
    sxN,
    sxC,
    sxS,
    syN,
    syC,
    syS,
    srN,
    srC,
    srS,
    sy2N,
    sy2C,
    sy2S,
    spbN,
    spbC,
    sscN,
    sscC,
    sshN,
    sshC,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_PRE_BIAS: tl.constexpr,
    HAS_EDGE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_RES_BIAS: tl.constexpr,
    HAS_OUT2: tl.constexpr,
):
    """One program per (sample, group): statistics over all of H x W, then the output."""
    n, c0, x_base, pb = _group_setup(
        x_ptr, pb_ptr, G, Cg, sxN, sxC, spbN, spbC, BLOCK_C, HAS_PRE_BIAS
    )
    s_begin = tl.program_id(1) * HW  # 0, as a tensor
    s_end = s_begin + HW
    k = _shift_estimate(x_base, sxC, sxS, Cg, s_begin, s_end, BLOCK_C, BLOCK_S)
    eb_base = eb_ptr + c0 * 9
    mean, m2 = _chunk_stats(
        x_base, sxC, sxS, pb, k, Cg, s_begin, s_end, eb_base, HW // W, W, BLOCK_C, BLOCK_S,
        HAS_EDGE,
    )  # fmt: skip
    rstd = 1.0 / tl.sqrt(m2 / (Cg * HW * 1.0) + eps)
    a, b = _output_coefficients(
        w_ptr, b_ptr, sc_ptr, sh_ptr, n, c0, Cg, rstd, sscN, sscC, sshN, sshC,
        BLOCK_C, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT,
    )  # fmt: skip
    y_base = y_ptr + n * syN + c0 * syC
    y2_base = y2_ptr + n * sy2N + c0 * sy2C
    r_base = r_ptr + n * srN + c0 * srC
    rb = _channel_vector(rb_ptr, c0, 1, Cg, 0.0, BLOCK_C, HAS_RES_BIAS)
    _apply_chunk(
        x_base, y_base, y2_base, r_base, sxC, sxS, syC, syS, sy2C, sy2S, srC, srS, pb, rb, k,
        mean, a, b, Cg, s_begin, s_end, eb_ptr + c0 * 9, HW // W, W, BLOCK_C, BLOCK_S, SILU,
        HAS_RESIDUAL, HAS_OUT2, HAS_EDGE,
    )  # fmt: skip


@jit
def _group_norm_partial_kernel(
    x_ptr,
    pb_ptr,
    eb_ptr,
    ws_ptr,
    G,
    Cg,
    HW,
    W,
    chunk,
    sxN,
    sxC,
    sxS,
    spbN,
    spbC,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_PRE_BIAS: tl.constexpr,
    HAS_EDGE: tl.constexpr,
):
    """Program (sample x group, chunk): the chunk's shift k, and the mean (less k) and centred
    sum of squares of its values, into ws."""
    _n, c0, x_base, pb = _group_setup(
        x_ptr, pb_ptr, G, Cg, sxN, sxC, spbN, spbC, BLOCK_C, HAS_PRE_BIAS
    )
    s_begin = tl.program_id(1) * chunk
    s_end = tl.minimum(s_begin + chunk, HW)
    k = _shift_estimate(x_base, sxC, sxS, Cg, s_begin, s_end, BLOCK_C, BLOCK_S)
    eb_base = eb_ptr + c0 * 9
    mean, m2 = _chunk_stats(
        x_base, sxC, sxS, pb, k, Cg, s_begin, s_end, eb_base, HW // W, W, BLOCK_C, BLOCK_S,
        HAS_EDGE,
    )  # fmt: skip
    ws = ws_ptr + (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * 3
    tl.store(ws, k)
    tl.store(ws + 1, mean)
    tl.store(ws + 2, m2)


@jit
def _group_norm_apply_kernel(
    x_ptr,
    y_ptr,
    y2_ptr,
    pb_ptr,
    eb_ptr,
    w_ptr,
    b_ptr,
    sc_ptr,
    sh_ptr,
    r_ptr,
    rb_ptr,
    ws_ptr,
    G,
    Cg,
    HW,
    W,
    chunk,
    eps,
    sxN,
    sxC,
    sxS,
    syN,
    syC,
    syS,
    srN,
    srC,
    srS,
    sy2N,
    sy2C,
    sy2S,
    spbN,
    spbC,
    sscN,
    sscC,
    sshN,
    sshC,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_PRE_BIAS: tl.constexpr,
    HAS_EDGE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_RES_BIAS: tl.constexpr,
    HAS_OUT2: tl.constexpr,
):
    """Program (sample x group, chunk): merge all chunks' statistics, normalise this chunk."""
    n, c0, x_base, pb = _group_setup(
        x_ptr, pb_ptr, G, Cg, sxN, sxC, spbN, spbC, BLOCK_C, HAS_PRE_BIAS
    )
    num_chunks = tl.num_programs(1)
    ws = ws_ptr + tl.program_id(0) * num_chunks * 3
    k = tl.load(ws + tl.program_id(1) * 3)  # this chunk's shift, as its statistics used it
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < num_chunks
    # every chunk's mean, moved to this chunk's shift (k_i - k: exact for nearby shifts)
    means = tl.load(ws + offs_p * 3 + 1, mask=mask_p, other=0.0)
    means += tl.where(mask_p, tl.load(ws + offs_p * 3, mask=mask_p, other=0.0) - k, 0.0)
    m2s = tl.load(ws + offs_p * 3 + 2, mask=mask_p, other=0.0)
    counts = tl.where(mask_p, tl.minimum(HW - offs_p * chunk, chunk), 0) * 1.0
    mean = tl.sum(counts * means, axis=0) / (HW * 1.0)
    dm = means - mean
    m2 = tl.sum(m2s, axis=0) + (Cg * 1.0) * tl.sum(counts * dm * dm, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / (Cg * HW * 1.0) + eps)
    a, b = _output_coefficients(
        w_ptr, b_ptr, sc_ptr, sh_ptr, n, c0, Cg, rstd, sscN, sscC, sshN, sshC,
        BLOCK_C, HAS_WEIGHT, HAS_BIAS, HAS_SCALE, HAS_SHIFT,
    )  # fmt: skip
    s_begin = tl.program_id(1) * chunk
    s_end = tl.minimum(s_begin + chunk, HW)
    y_base = y_ptr + n * syN + c0 * syC
    y2_base = y2_ptr + n * sy2N + c0 * sy2C
    r_base = r_ptr + n * srN + c0 * srC
    rb = _channel_vector(rb_ptr, c0, 1, Cg, 0.0, BLOCK_C, HAS_RES_BIAS)
    _apply_chunk(
        x_base, y_base, y2_base, r_base, sxC, sxS, syC, syS, sy2C, sy2S, srC, srS, pb, rb, k,
        mean, a, b, Cg, s_begin, s_end, eb_ptr + c0 * 9, HW // W, W, BLOCK_C, BLOCK_S, SILU,
        HAS_RESIDUAL, HAS_OUT2, HAS_EDGE,
    )  # fmt: skip


def runs_kernel(x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether :func:`group_norm` on ``x`` runs the Triton kernel (else its PyTorch path), where a
    pre-bias costs nothing: a caller may then move a convolution's bias into it."""
    return use_triton(backend, x, _group_norm_fused_kernel)


def group_norm_settings(
    batch: int,
    channels: int,
    groups: int,
    positions: int,
    device: torch.device,
    split: int | None = None,
    sms: int | None = None,
) -> dict:
    """Launch settings: tile, warps and the split of H x W (``chunks`` of ``chunk`` positions).

    Where the N x G programs would leave the GPU (``sms`` multiprocessors: the device's) idle and
    a group takes more than one tile, or ``split`` asks for chunks, the tile shrinks along H x W
    (by itself down to :data:`MIN_SPLIT_TILE` elements) so that there are that many chunks to
    cut: at batch 1, 8 groups of 32 channels at 64 x 64 make 256 programs of 32 x 64 rather than
    8 of 32 x 128. A group that fits one tile, or of at most :data:`MIN_SPLIT_GROUP` values, is
    not split: its program is short, and the split's second kernel would cost a launch (about
    3 us in a CUDA graph: one multiprocessor reads and writes a group of 32,768 fp32 values in
    about that time)."""
    block_c, block_s = tile_shape(channels // groups, positions)
    sms = sm_count(device) if sms is None else sms
    programs = batch * groups
    wanted = split if split is not None else cdiv(2 * sms, programs)
    small = positions <= block_s or (channels // groups) * positions <= MIN_SPLIT_GROUP
    if split is None and small:
        split = wanted = 1  # a short program: a split would cost a launch for little
    if wanted > 1:  # a forced split may go down to 2 positions a tile
        floor = 2 if split is not None else max(2, MIN_SPLIT_TILE // block_c)
        block_s = min(block_s, max(floor, next_power_of_2(cdiv(positions, wanted))))
    chunks, chunk = plan_split(programs, positions, block_s, sms, split)
    return {
        "BLOCK_C": block_c,
        "BLOCK_S": block_s,
        "num_warps": num_warps(block_c * block_s),
        "chunks": chunks,
        "chunk": chunk,
    }


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    pre_bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-5,
    act: str | None = None,
    edge_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    also_out: torch.Tensor | None = None,
    split: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``act(GroupNorm(x + pre_bias) * (1 + scale) + shift) (+ residual + residual_bias)`` for
    x [N, C, H, W], fused.

    ``weight``/``bias`` [C] are GroupNorm's affine; ``pre_bias``, ``scale``, ``shift`` are
    [N or 1, C] or [N or 1, C, 1, 1] (views such as ``chunk(2, dim=1)`` of one tensor are fine);
    ``act`` is ``"silu"`` or None. ``edge_bias`` [C, 3, 3] (float32) is a pre-bias that varies
    at the image's border: what a 3x3 zero-padded conv makes of a per-channel constant input
    (the bias of the conv before it, moved through it: tap (ky, kx) adds ``edge_bias[c, ky, kx]``
    where it lands inside the image). ``residual`` [N, C, H, W] (any layout whose H x W is one
    strided axis) is added after the activation, with ``residual_bias`` [C] (a residual conv's
    bias): a ResBlock's skip sum in the same pass. Parameters are x's dtype or float32; the
    output is x's dtype, in ``out`` when given (which may be float32, or a channel slice of a
    larger tensor: a concatenation written in place); ``also_out``, a second tensor of the same
    kind that gets the same values (a U-Net's skip, written into its concatenation as it is
    made). ``split`` forces the number of chunks
    H x W is cut into (None: chosen from the shape and the GPU). ``backend``: see
    :mod:`ddpm_fast.kernels._launch`.
    """
    check_input("x", x, (4,))
    n, c, h, w = x.shape
    if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(
            f"num_groups must be a positive divisor of the {c} channels of x {tuple(x.shape)}, "
            f"got {num_groups}"
        )
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    check_split(split)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_param(name, t, x)
            if tuple(t.shape) != (c,):
                raise ValueError(
                    f"{name} must be [{c}] for x {tuple(x.shape)}, got {tuple(t.shape)}"
                )
    per_sample = {"pre_bias": pre_bias, "scale": scale, "shift": shift}
    per_sample = {k: per_sample_channel(k, t, x) for k, t in per_sample.items() if t is not None}
    check_residual(residual, residual_bias, x)
    check_edge_bias(edge_bias, x)
    if out is not None:
        check_out(out, x.shape, x, torch.float32)
    if also_out is not None:
        check_out(also_out, x.shape, x, torch.float32)

    if traced():  # torch.compile / torch.export: one op of their graph
        y = torch.ops.ddpm_fast.group_norm(
            x, num_groups, weight, bias, pre_bias, scale, shift, eps, act or "", edge_bias,
            residual, residual_bias, split or 0, backend or "",
        )  # fmt: skip
        return write_outputs(y, out, also_out)

    if not use_triton(backend, x, _group_norm_fused_kernel):
        if edge_bias is not None:
            x = x + edge_bias_map(edge_bias, h, w).to(x.dtype)
        y = group_norm_eager(
            x, num_groups, weight, bias, pre_bias=pre_bias, scale=scale, shift=shift, eps=eps,
            act=act,
        )  # fmt: skip
        return write_outputs(add_residual(y, residual, residual_bias), out, also_out)

    if out is None:
        out = torch.empty_like(x)  # keeps channels_last
    if x.numel() == 0:
        return out
    sx, sy = spatial_strides("x", x), spatial_strides("out", out)
    settings = group_norm_settings(n, c, num_groups, h * w, x.device, split)
    pb, sc, sh = (per_sample.get(k, x) for k in ("pre_bias", "scale", "shift"))
    params = {
        "HAS_PRE_BIAS": pre_bias is not None,
        "HAS_EDGE": edge_bias is not None,
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "HAS_SCALE": scale is not None,
        "HAS_SHIFT": shift is not None,
        "SILU": act == "silu",
        "BLOCK_C": settings["BLOCK_C"],
        "BLOCK_S": settings["BLOCK_S"],
        "num_warps": settings["num_warps"],
    }
    vector_strides = (pb.stride(0), pb.stride(1), sc.stride(0), sc.stride(1))
    vector_strides += (sh.stride(0), sh.stride(1))
    params["HAS_RESIDUAL"] = residual is not None
    params["HAS_RES_BIAS"] = residual_bias is not None
    r = x if residual is None else residual
    rb = x if residual_bias is None else residual_bias
    sr = spatial_strides("residual", r)
    params["HAS_OUT2"] = also_out is not None
    y2 = out if also_out is None else also_out
    sy2 = spatial_strides("also_out", y2)
    weight = x if weight is None else weight
    bias = x if bias is None else bias
    eb = x if edge_bias is None else edge_bias
    cg, hw, chunks, chunk = c // num_groups, h * w, settings["chunks"], settings["chunk"]
    with device_guard(x):
        if chunks == 1:
            _group_norm_fused_kernel[(n * num_groups, 1)](
                x, out, y2, pb, eb, weight, bias, sc, sh, r, rb, num_groups, cg, hw, w, eps,
                *sx, *sy, *sr, *sy2, *vector_strides, **params,
            )  # fmt: skip
            return out
        ws = torch.empty(n * num_groups, chunks, 3, device=x.device, dtype=torch.float32)
        grid = (n * num_groups, chunks)
        _group_norm_partial_kernel[grid](
            x, pb, eb, ws, num_groups, cg, hw, w, chunk, *sx, pb.stride(0), pb.stride(1),
            BLOCK_C=params["BLOCK_C"], BLOCK_S=params["BLOCK_S"],
            HAS_PRE_BIAS=params["HAS_PRE_BIAS"], HAS_EDGE=params["HAS_EDGE"],
            num_warps=params["num_warps"],
        )  # fmt: skip
        _group_norm_apply_kernel[grid](
            x, out, y2, pb, eb, weight, bias, sc, sh, r, rb, ws, num_groups, cg, hw, w, chunk,
            eps, *sx, *sy, *sr, *sy2, *vector_strides, BLOCK_P=max(2, next_power_of_2(chunks)),
            **params,
        )  # fmt: skip
    return out


def group_norm_eager(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    pre_bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-5,
    act: str | None = None,
) -> torch.Tensor:
    """The launcher's PyTorch path: the reference, except that a scale and shift shared by the
    whole batch (as a sampler's step gives: one timestep) fold into GroupNorm's affine,
    ``w (1 + s)`` and ``b (1 + s) + shift``, and SiLU runs in place: two passes over x fewer."""
    shared = pre_bias is None and all(t is None or t.shape[0] == 1 for t in (scale, shift))
    if not shared or (scale is None and shift is None):
        return group_norm_reference(
            x, num_groups, weight, bias, pre_bias=pre_bias, scale=scale, shift=shift, eps=eps,
            act=act,
        )  # fmt: skip
    c = x.shape[1]
    w = torch.ones(c, device=x.device) if weight is None else weight.float()
    b = torch.zeros(c, device=x.device) if bias is None else bias.float()
    if scale is not None:
        factor = scale.float().reshape(c) + 1
        w, b = w * factor, b * factor
    if shift is not None:
        b = b + shift.float().reshape(c)
    y = F.group_norm(x, num_groups, w.to(x.dtype), b.to(x.dtype), eps)
    return F.silu(y, inplace=True) if act == "silu" else y


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    pre_bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    eps: float = 1e-5,
    act: str | None = None,
    edge_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unfused PyTorch sequence of :func:`group_norm`, computed in x's dtype."""
    c = x.shape[1]
    if edge_bias is not None:
        x = x + edge_bias_map(edge_bias, *x.shape[2:]).to(x.dtype)

    def vector(t: torch.Tensor) -> torch.Tensor:
        return t.to(x.dtype).reshape(t.shape[0], c, 1, 1)

    if pre_bias is not None:
        x = x + vector(pre_bias)
    weight = None if weight is None else weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        y = y * (vector(scale) + 1)
    if shift is not None:
        y = y + vector(shift)
    if act == "silu":
        y = F.silu(y)
    return add_residual(y, residual, residual_bias)


def check_edge_bias(edge_bias: torch.Tensor | None, x: torch.Tensor) -> None:
    """An edge bias is float32 [C, 3, 3], contiguous, on x's device."""
    if edge_bias is None:
        return
    c = x.shape[1]
    if not isinstance(edge_bias, torch.Tensor) or tuple(edge_bias.shape) != (c, 3, 3):
        raise ValueError(f"edge_bias must be [{c}, 3, 3] for x {tuple(x.shape)}")
    if edge_bias.dtype != torch.float32 or not edge_bias.is_contiguous():
        raise TypeError("edge_bias must be contiguous float32")
    if edge_bias.device != x.device:
        raise ValueError(f"edge_bias is on {edge_bias.device} but the input is on {x.device}")


def edge_bias_map(edge_bias: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The [1, C, H, W] map of an edge bias: tap (ky, kx) counts where row y + ky - 1 and column
    x + kx - 1 are inside the image (zero padding)."""

    def inside(size: int) -> torch.Tensor:  # [3, size]: tap k lands inside at position i
        i = torch.arange(size, device=edge_bias.device)
        offsets = torch.arange(3, device=edge_bias.device)[:, None] - 1
        return ((i + offsets >= 0) & (i + offsets < size)).to(edge_bias.dtype)

    return torch.einsum("cyx,yh,xw->chw", edge_bias, inside(h), inside(w))[None]


def edge_bias_of(conv_weight: torch.Tensor, bias_in: torch.Tensor) -> torch.Tensor:
    """The edge bias of a 3x3 zero-padded conv (weight [O, I, 3, 3]) whose input carries the
    per-channel constant ``bias_in`` [I]: ``T[o, ky, kx] = sum_i W[o, i, ky, kx] bias_in[i]``."""
    t = torch.einsum("oiyx,i->oyx", conv_weight.detach().double(), bias_in.detach().double())
    return t.float().contiguous()


# The launcher as a custom op (torch.compile / torch.export see one op; see _launch.traced): its
# implementation is the launcher, into an output allocated as its fake implementation does.


@torch.library.custom_op(f"{OPS_NAMESPACE}::group_norm", mutates_args=())
def group_norm_op(
    x: Tensor,
    num_groups: int,
    weight: OptionalTensor,
    bias: OptionalTensor,
    pre_bias: OptionalTensor,
    scale: OptionalTensor,
    shift: OptionalTensor,
    eps: float,
    act: str,
    edge_bias: OptionalTensor,
    residual: OptionalTensor,
    residual_bias: OptionalTensor,
    split: int,
    backend: str,
) -> Tensor:
    return group_norm(
        x, num_groups, weight, bias, pre_bias=pre_bias, scale=scale, shift=shift, eps=eps,
        act=none_if_empty(act), edge_bias=edge_bias, residual=residual, residual_bias=residual_bias,
        out=torch.empty_like(x), split=none_if_empty(split), backend=none_if_empty(backend),
    )  # fmt: skip


@group_norm_op.register_fake
def _(x, *args) -> Tensor:
    return torch.empty_like(x)
