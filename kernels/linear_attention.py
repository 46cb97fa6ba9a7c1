"""Linear attention of denoising-diffusion-pytorch (1.x and 2.x), from the 1x1 conv's output
``qkv`` [B, 3*h*d, N] (or [B, 3*h*d, H, W], N = H*W) to ``out`` [B, h*d, N] (or [B, h*d, H, W]).
Per batch and head, with q, k, v of shape [d, N]:

    q = softmax_d(q) * q_scale                  (q_scale = d ** -0.5)
    k = softmax_n([mem_k | k]),  v = [mem_v | v] * v_scale
    context[d, e] = sum_n k[d, n] v[e, n]
    out[e, n] = sum_d context[d, e] q[d, n]

``mem_kv`` [2, h, d, M] are 2.x's memory keys and values, prepended to k and v. 1.x has no memory
and divides v by N: pass ``v_scale=1 / N`` to compute its ``LinearAttention`` exactly.

Two kernels, each one pass over the positions, fp32 throughout (one, ``_one_pass_kernel``, doing
both where the positions are not split): ``_context_kernel`` runs an
online softmax over a chunk of positions (per-row running max and sum, the context rescaled as
the max grows) and writes the chunk's (max, sum, context); ``_output_kernel`` merges the chunks
and the memory (``BLOCK_M`` slots at a time, so that shared memory holds any number), then computes
softmax(q) and ``context^T q`` for its chunk of positions. At small batch the positions are cut in
several chunks so that the GPU fills (:func:`plan_split`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._launch import (
    OPS_NAMESPACE,
    OptionalTensor,
    cast_to,
    check_input,
    check_out,
    check_param,
    check_split,
    device_guard,
    jit,
    next_power_of_2,
    none_if_empty,
    num_warps,
    plan_split,
    sm_count,
    spatial_strides,
    tl,
    traced,
    use_triton,
    write_outputs,
)

MAX_HEAD_DIM = 128
# Up to this many positions (16 x 16) a head's context and output run in one program, one launch:
# at batch 1 that leaves most of a GPU idle, for a few microseconds less than a second launch.
ONE_PASS_POSITIONS = 256
MAX_MEMORY = 256
# d x BLOCK_M: a tile of memory keys (and of values) of the output kernel: 32 slots at d = 128
# (90,112 B of shared memory for sm_90 with 16 warps; 64 slots take 164,864 B, 256 take 655,616 B).
MEMORY_TILE_ELEMENTS = 4096


@jit
def _context_pass(
    k_base, v_base, D, s_begin, s_end, sC, sN, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Online softmax_n(k) v^T over positions ``[s_begin, s_end)``: (max, sum, context)."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    m_i = tl.full([BLOCK_D], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_D], tl.float32)
    ctx = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_N):
        offs_n = s0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < s_end
        k_ptrs = k_base + offs_d[:, None] * sC + offs_n[None, :] * sN
        kt = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        kt = tl.where(mask_n[None, :], kt, float("-inf"))  # padded d rows stay finite
        m_new = tl.maximum(m_i, tl.max(kt, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(kt - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_ptrs = v_base + offs_n[:, None] * sN + offs_d[None, :] * sC
        vt = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        ctx = ctx * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
        m_i = m_new
    return m_i, l_i, ctx


@jit
def _context_kernel(
    qkv_ptr,
    m_ptr,
    l_ptr,
    ctx_ptr,
    heads,
    D,
    HD,
    N,
    chunk,
    sB,
    sC,
    sN,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (batch x head, chunk): softmax_n(k) v^T over the chunk, as (max, sum, context)."""
    pid = tl.program_id(0)
    b = (pid // heads).to(tl.int64)
    head = pid % heads
    k_base = qkv_ptr + b * sB + (HD + head * D) * sC
    v_base = qkv_ptr + b * sB + (2 * HD + head * D) * sC
    offs_d = tl.arange(0, BLOCK_D)
    s_begin = tl.program_id(1) * chunk
    s_end = tl.minimum(s_begin + chunk, N)
    m_i, l_i, ctx = _context_pass(k_base, v_base, D, s_begin, s_end, sC, sN, BLOCK_D, BLOCK_N)
    w = pid * tl.num_programs(1) + tl.program_id(1)
    tl.store(m_ptr + w * BLOCK_D + offs_d, m_i)
    tl.store(l_ptr + w * BLOCK_D + offs_d, l_i)
    ctx_ptrs = ctx_ptr + w * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :]
    tl.store(ctx_ptrs, ctx)


@jit
def _memory_keys(mem_base, offs_d, mask_d, m0, M, smD, smM, BLOCK_M: tl.constexpr):
    """Memory keys [BLOCK_D, BLOCK_M] of slots ``m0 + [0, BLOCK_M)`` in fp32: -inf past the last
    slot, 0 in the padded rows of d (whose max and exp stay finite)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    ptrs = mem_base + offs_d[:, None] * smD + offs_m[None, :] * smM
    mk = tl.load(ptrs, mask=mask_d[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
    return tl.where(mask_m[None, :], mk, float("-inf"))


@jit
def _output_pass(
    q_base, o_base, ctx, q_scale, D, s_begin, s_end, sC, sN, soC, soN,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out = ctx^T (softmax_d(q) * q_scale) over positions ``[s_begin, s_end)``."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    for s0 in range(s_begin, s_end, BLOCK_N):
        offs_n = s0 + tl.arange(0, BLOCK_N)
        mask = (offs_n < s_end)[:, None] & mask_d[None, :]
        qt = tl.load(q_base + offs_n[:, None] * sN + offs_d[None, :] * sC, mask=mask, other=0.0)
        qt = tl.where(mask_d[None, :], qt.to(tl.float32), float("-inf"))
        qt = tl.exp(qt - tl.max(qt, axis=1)[:, None])
        qt = qt * (q_scale / tl.sum(qt, axis=1))[:, None]
        o = tl.dot(qt, ctx, input_precision="ieee")
        o_ptrs = o_base + offs_n[:, None] * soN + offs_d[None, :] * soC
        tl.store(o_ptrs, cast_to(o, o_base.dtype.element_ty), mask=mask)


@jit
def _output_kernel(
    qkv_ptr,
    mem_ptr,
    m_ptr,
    l_ptr,
    ctx_ptr,
    out_ptr,
    heads,
    D,
    N,
    M,
    S,
    chunk,
    q_scale,
    v_scale,
    sB,
    sC,
    sN,
    smT,
    smH,
    smD,
    smM,
    soB,
    soC,
    soN,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_MEM: tl.constexpr,
):
    """Program (batch x head, chunk): merge the S context partials and the memory, then
    out = context^T (softmax_d(q) * q_scale) over the chunk's positions."""
    pid = tl.program_id(0)
    b = (pid // heads).to(tl.int64)
    head = pid % heads
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    m = tl.full([BLOCK_D], float("-inf"), tl.float32)
    for i in range(S):
        m = tl.maximum(m, tl.load(m_ptr + (pid * S + i) * BLOCK_D + offs_d))
    mem_base = mem_ptr + head * smH
    if HAS_MEM:  # the memory keys' max, a tile of BLOCK_M slots at a time
        for m0 in range(0, M, BLOCK_M):
            mk = _memory_keys(mem_base, offs_d, mask_d, m0, M, smD, smM, BLOCK_M)
            m = tl.maximum(m, tl.max(mk, axis=1))
    l_sum = tl.zeros([BLOCK_D], tl.float32)
    ctx = tl.zeros([BLOCK_D, BLOCK_D], tl.float32)
    for i in range(S):
        w = pid * S + i
        alpha = tl.exp(tl.load(m_ptr + w * BLOCK_D + offs_d) - m)
        l_sum += tl.load(l_ptr + w * BLOCK_D + offs_d) * alpha
        ctx_ptrs = ctx_ptr + w * BLOCK_D * BLOCK_D + offs_d[:, None] * BLOCK_D + offs_d[None, :]
        ctx += tl.load(ctx_ptrs) * alpha[:, None]
    if HAS_MEM:  # then their softmax weights and values, tile by tile
        for m0 in range(0, M, BLOCK_M):
            mk = _memory_keys(mem_base, offs_d, mask_d, m0, M, smD, smM, BLOCK_M)
            p = tl.exp(mk - m[:, None])
            l_sum += tl.sum(p, axis=1)
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mv_ptrs = mem_base + smT + offs_m[:, None] * smM + offs_d[None, :] * smD
            mask = (offs_m < M)[:, None] & mask_d[None, :]
            mv = tl.load(mv_ptrs, mask=mask, other=0.0).to(tl.float32)
            ctx += tl.dot(p, mv, input_precision="ieee")
    ctx = tl.where(mask_d[:, None], ctx * (v_scale / l_sum)[:, None], 0.0)

    q_base = qkv_ptr + b * sB + head * D * sC
    o_base = out_ptr + b * soB + head * D * soC
    s_begin = tl.program_id(1) * chunk
    s_end = tl.minimum(s_begin + chunk, N)
    _output_pass(
        q_base, o_base, ctx, q_scale, D, s_begin, s_end, sC, sN, soC, soN, BLOCK_D, BLOCK_N
    )


@jit
def _one_pass_kernel(
    qkv_ptr,
    mem_ptr,
    out_ptr,
    heads,
    D,
    HD,
    N,
    M,
    q_scale,
    v_scale,
    sB,
    sC,
    sN,
    smT,
    smH,
    smD,
    smM,
    soB,
    soC,
    soN,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_MEM: tl.constexpr,
):
    """Program (batch x head): the context over all positions, then the output, in one launch
    (the two kernels' work where the positions are not split: small images)."""
    pid = tl.program_id(0)
    b = (pid // heads).to(tl.int64)
    head = pid % heads
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    k_base = qkv_ptr + b * sB + (HD + head * D) * sC
    v_base = qkv_ptr + b * sB + (2 * HD + head * D) * sC
    m, l_sum, ctx = _context_pass(k_base, v_base, D, 0, N, sC, sN, BLOCK_D, BLOCK_N)
    mem_base = mem_ptr + head * smH
    if HAS_MEM:  # the memory keys join the softmax: a new max, the context rescaled to it
        m_all = m
        for m0 in range(0, M, BLOCK_M):
            mk = _memory_keys(mem_base, offs_d, mask_d, m0, M, smD, smM, BLOCK_M)
            m_all = tl.maximum(m_all, tl.max(mk, axis=1))
        alpha = tl.exp(m - m_all)
        l_sum = l_sum * alpha
        ctx = ctx * alpha[:, None]
        for m0 in range(0, M, BLOCK_M):
            mk = _memory_keys(mem_base, offs_d, mask_d, m0, M, smD, smM, BLOCK_M)
            p = tl.exp(mk - m_all[:, None])
            l_sum += tl.sum(p, axis=1)
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mv_ptrs = mem_base + smT + offs_m[:, None] * smM + offs_d[None, :] * smD
            mask = (offs_m < M)[:, None] & mask_d[None, :]
            mv = tl.load(mv_ptrs, mask=mask, other=0.0).to(tl.float32)
            ctx += tl.dot(p, mv, input_precision="ieee")
    ctx = tl.where(mask_d[:, None], ctx * (v_scale / l_sum)[:, None], 0.0)
    q_base = qkv_ptr + b * sB + head * D * sC
    o_base = out_ptr + b * soB + head * D * soC
    _output_pass(q_base, o_base, ctx, q_scale, D, 0, N, sC, sN, soC, soN, BLOCK_D, BLOCK_N)


def linear_attention_settings(
    batch_heads: int,
    dim_head: int,
    positions: int,
    device: torch.device,
    split: int | None = None,
    memory: int = 1,
) -> dict:
    """Launch settings: tiles (``tl.dot`` wants every side >= 16) and the split of the positions
    into ``chunks`` of ``chunk`` for the context and the output kernels (one chunk: both in one
    kernel, which images of at most :data:`ONE_PASS_POSITIONS` pixels always take). The memory
    slots go
    ``BLOCK_M`` at a time: the [d, BLOCK_M] x [BLOCK_M, d] fp32 product's operands take shared
    memory: 256 slots at d = 128 in one tile would take 655,616 B (an H100/H200 has 232,448)."""
    block_d = max(16, next_power_of_2(dim_head))
    block_n = max(16, min(next_power_of_2(positions), 2048 // block_d, 128))
    block_m = max(16, min(next_power_of_2(memory), MEMORY_TILE_ELEMENTS // block_d))
    if split is None and positions <= ONE_PASS_POSITIONS:
        split = 1  # one program a head is short: one launch beats filling the GPU
    chunks, chunk = plan_split(batch_heads, positions, block_n, sm_count(device), split)
    return {
        "BLOCK_D": block_d,
        "BLOCK_N": block_n,
        "BLOCK_M": block_m,
        "num_warps": num_warps(max(block_d * block_n, block_d * block_d)),
        "chunks": chunks,
        "chunk": chunk,
    }


def linear_attention(
    qkv: torch.Tensor,
    heads: int,
    *,
    mem_kv: torch.Tensor | None = None,
    q_scale: float | None = None,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
    split: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Linear attention from qkv [B, 3*h*d, N or H, W] to [B, h*d, N or H, W] (module docstring).

    ``mem_kv`` [2, h, d, M] (qkv's dtype or float32) prepends memory keys/values (2.x);
    ``q_scale`` defaults to d ** -0.5; 1.x's LinearAttention is ``v_scale=1 / (H * W)``.
    ``split`` forces the number of chunks the positions are cut into (None: from the shape and
    the GPU). ``backend``: see :mod:`ddpm_fast.kernels._launch`.
    """
    check_input("qkv", qkv, (3, 4))
    b, c = qkv.shape[:2]
    spatial = tuple(qkv.shape[2:])
    if not isinstance(heads, int) or heads < 1 or c % (3 * heads):
        raise ValueError(
            f"qkv {tuple(qkv.shape)} must have 3 * heads * dim_head channels; heads={heads} "
            f"does not divide {c} / 3"
        )
    d = c // (3 * heads)
    if d > MAX_HEAD_DIM:
        raise ValueError(f"dim_head {d} of qkv {tuple(qkv.shape)} is over {MAX_HEAD_DIM}")
    if mem_kv is not None:
        check_param("mem_kv", mem_kv, qkv)
        ok = mem_kv.dim() == 4 and tuple(mem_kv.shape[:3]) == (2, heads, d)
        if not ok or not 1 <= mem_kv.shape[3] <= MAX_MEMORY:
            raise ValueError(
                f"mem_kv must be [2, {heads}, {d}, M] with 1 <= M <= {MAX_MEMORY} for qkv "
                f"{tuple(qkv.shape)} and heads={heads}, got {tuple(mem_kv.shape)}"
            )
    check_split(split)
    out_shape = (b, heads * d, *spatial)
    if out is not None:
        check_out(out, out_shape, qkv)
    q_scale = d**-0.5 if q_scale is None else float(q_scale)

    if traced():  # torch.compile / torch.export: one op of their graph
        y = torch.ops.ddpm_fast.linear_attention(
            qkv, heads, mem_kv, q_scale, float(v_scale), split or 0, backend or "", heads * d
        )
        return write_outputs(y, out, None)

    if not use_triton(backend, qkv, _context_kernel):
        y = linear_attention_reference(
            qkv, heads, mem_kv=mem_kv, q_scale=q_scale, v_scale=v_scale, scale_context=True
        )
        return y if out is None else out.copy_(y)

    if out is None:
        out = torch.empty(
            out_shape, dtype=qkv.dtype, device=qkv.device, memory_format=_memory_format(qkv)
        )
    n = out.shape[2:].numel()
    if out.numel() == 0:
        return out
    sq, so = spatial_strides("qkv", qkv), spatial_strides("out", out)
    memory = 1 if mem_kv is None else mem_kv.shape[3]
    settings = linear_attention_settings(b * heads, d, n, qkv.device, split, memory)
    block_d, block_n, chunks, chunk = (
        settings[k] for k in ("BLOCK_D", "BLOCK_N", "chunks", "chunk")
    )
    mem = qkv if mem_kv is None else mem_kv
    mem_strides = mem.stride() if mem_kv is not None else (0, 0, 0, 0)
    warps = settings["num_warps"]
    if chunks == 1:
        with device_guard(qkv):
            _one_pass_kernel[(b * heads,)](
                qkv, mem, out, heads, d, heads * d, n, memory, q_scale, float(v_scale), *sq,
                *mem_strides, *so, BLOCK_D=block_d, BLOCK_N=block_n,
                BLOCK_M=settings["BLOCK_M"], HAS_MEM=mem_kv is not None, num_warps=warps,
            )  # fmt: skip
        return out
    partials = b * heads * chunks
    ws_m = torch.empty(partials, block_d, device=qkv.device, dtype=torch.float32)
    ws_l = torch.empty_like(ws_m)
    ws_ctx = torch.empty(partials, block_d, block_d, device=qkv.device, dtype=torch.float32)
    with device_guard(qkv):
        grid = (b * heads, chunks)
        _context_kernel[grid](
            qkv, ws_m, ws_l, ws_ctx, heads, d, heads * d, n, chunk, *sq,
            BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps,
        )  # fmt: skip
        _output_kernel[grid](
            qkv, mem, ws_m, ws_l, ws_ctx, out, heads, d, n, memory, chunks, chunk,
            q_scale, float(v_scale), *sq, *mem_strides, *so,
            BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_M=settings["BLOCK_M"],
            HAS_MEM=mem_kv is not None, num_warps=warps,
        )  # fmt: skip
    return out


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if (
        t.dim() == 4
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def linear_attention_reference(
    qkv: torch.Tensor,
    heads: int,
    *,
    mem_kv: torch.Tensor | None = None,
    q_scale: float | None = None,
    v_scale: float = 1.0,
    scale_context: bool = False,
) -> torch.Tensor:
    """denoising-diffusion-pytorch's ``LinearAttention.forward`` between to_qkv and to_out, in
    qkv's dtype (1.x: ``v_scale=1 / (H * W)``; 2.x: ``mem_kv``). ``scale_context``: apply both
    scales to the small d x d context instead of to q and v (the launcher's PyTorch path; the
    same products in another order)."""
    b, c = qkv.shape[:2]
    spatial = qkv.shape[2:]
    d = c // (3 * heads)
    q, k, v = qkv.reshape(b, 3, heads, d, -1).unbind(1)
    if mem_kv is not None:
        mk, mv = mem_kv.to(qkv.dtype).unsqueeze(1).expand(2, b, *mem_kv.shape[1:]).unbind(0)
        k = torch.cat((mk, k), dim=-1)
        v = torch.cat((mv, v), dim=-1)
    q = q.softmax(dim=-2)
    k = k.softmax(dim=-1)
    q_scale = d**-0.5 if q_scale is None else q_scale
    if not scale_context:
        q = q * q_scale
        if v_scale != 1.0:
            v = v * v_scale
    context = torch.einsum("b h d n, b h e n -> b h d e", k, v)
    if scale_context:
        context = context * (q_scale * v_scale)
    out = torch.einsum("b h d e, b h d n -> b h e n", context, q)
    return out.reshape(b, heads * d, *spatial)


# The launcher as a custom op (torch.compile / torch.export see one op; see _launch.traced): its
# implementation is the launcher, into an output allocated as its fake implementation does.


@torch.library.custom_op(f"{OPS_NAMESPACE}::linear_attention", mutates_args=())
def linear_attention_op(
    qkv: Tensor,
    heads: int,
    mem_kv: OptionalTensor,
    q_scale: float,
    v_scale: float,
    split: int,
    backend: str,
    out_channels: int,
) -> Tensor:
    return linear_attention(
        qkv, heads, mem_kv=mem_kv, q_scale=q_scale, v_scale=v_scale,
        out=_attention_out(qkv, out_channels), split=none_if_empty(split),
        backend=none_if_empty(backend),
    )  # fmt: skip


def _attention_out(qkv: Tensor, channels: int) -> Tensor:
    """The op's output: [B, channels, ...] in qkv's memory format."""
    shape = (qkv.shape[0], channels, *qkv.shape[2:])
    return torch.empty(shape, dtype=qkv.dtype, device=qkv.device, memory_format=_memory_format(qkv))


@linear_attention_op.register_fake
def _(qkv, heads, mem_kv, q_scale, v_scale, split, backend, out_channels) -> Tensor:
    return _attention_out(qkv, out_channels)
