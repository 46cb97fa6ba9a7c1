"""One reverse step of any sampler from the network's output, fused, with its noise drawn inside
the kernel. For x [B, C, H, W] (float32, the chain's state), the previous step's x0 (the
multistep solvers' history) and the network's output [B, C or 2C, H, W] at chain step k, the
kernel computes ``ddpm_fast.samplers.rule``'s update with the step's row ``coeffs[k]``, whose
columns are ``rule.ROW``: the kernel reads them at offsets taken from that list by name, and
runs ``rule``'s own functions (``triton.jit`` of them).

``sigma`` is the row's, or with ``learned=True`` exp(log_var / 2) (``rule.learned_log_var`` of
the output's second half of channels). ``z`` is ``tl.randn(key[b], (k + 1) * C*H*W + element)``:
the counter-based Philox stream of ``ddpm_fast.noise`` (key = sample_index << 32 | seed; stream
step 0 is x_T), so the kernel needs no generator state and runs the same inside a CUDA graph. The
step index k is read from a device tensor, never from the host.

The PyTorch reference takes ``z`` as an argument (the Philox stream in PyTorch lives in
``ddpm_fast.noise``).
"""

from __future__ import annotations

import types

import torch

from ..samplers import rule
from ._launch import (
    HAS_TRITON,
    cast_to,
    cdiv,
    check_grid,
    check_input,
    check_out,
    device_guard,
    jit,
    program_offset,
    spatial_strides,
    tl,
    use_triton,
)

# The columns of a coefficient row, and each one's offset (a constexpr of the kernel).
COEFFICIENTS = rule.ROW
NUM_COEFFICIENTS = len(COEFFICIENTS)
COL_A = tl.constexpr(COEFFICIENTS.index("a"))
COL_B = tl.constexpr(COEFFICIENTS.index("b"))
COL_X0_MAX = tl.constexpr(COEFFICIENTS.index("x0_max"))
COL_EPS_X0_MAX = tl.constexpr(COEFFICIENTS.index("eps_x0_max"))
COL_X0_FROM_XT = tl.constexpr(COEFFICIENTS.index("x0_from_xt"))
COL_X0_FROM_EPS = tl.constexpr(COEFFICIENTS.index("x0_from_eps"))
COL_C_X0 = tl.constexpr(COEFFICIENTS.index("c_x0"))
COL_C_XT = tl.constexpr(COEFFICIENTS.index("c_xt"))
COL_C_X0_PREV = tl.constexpr(COEFFICIENTS.index("c_x0_prev"))
COL_C_EPS = tl.constexpr(COEFFICIENTS.index("c_eps"))
COL_SIGMA = tl.constexpr(COEFFICIENTS.index("sigma"))
COL_LOG_VAR_MIN = tl.constexpr(COEFFICIENTS.index("log_var_min"))
COL_LOG_VAR_MAX = tl.constexpr(COEFFICIENTS.index("log_var_max"))
COL_NOISE_ON = tl.constexpr(COEFFICIENTS.index("noise_on"))
BLOCK = 1024
MAX_COUNTER = 2**31


def _jit_rule(fn):
    """``triton.jit`` of one of ``rule``'s functions: the same code, with triton.language among
    its globals (Triton's interpreter patches the module it finds there)."""
    if not HAS_TRITON:
        return fn
    scope = {**fn.__globals__, "tl": tl}
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__module__, copy.__qualname__, copy.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
    return jit(copy)


# The rule's arithmetic, compiled by Triton from the same Python functions the reference runs.
_estimate_x0 = _jit_rule(rule.estimate_x0)
_estimate_eps = _jit_rule(rule.estimate_eps)
_combine = _jit_rule(rule.combine)
_learned_log_var = _jit_rule(rule.learned_log_var)
_add_noise = _jit_rule(rule.add_noise)


@jit
def _sampler_step_kernel(
    out_ptr,
    x_ptr,
    x0_prev_ptr,
    coef_ptr,
    step_ptr,
    keys_ptr,
    z_ptr,
    x_next_ptr,
    x0_ptr,
    xc_ptr,
    numel,
    out_stride,
    HW,
    sxcN,
    sxcC,
    sxcS,
    NCOEF: tl.constexpr,
    LEARNED: tl.constexpr,
    DRAW: tl.constexpr,
    HAS_CAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (block of a sample's C*H*W elements, sample). DRAW: draw z with tl.randn, else
    read it from z_ptr. Samples' offsets are int64: a batch may hold more than 2**31 values.
    x0_ptr may be x0_prev_ptr: each element is read before it is written, by the same program."""
    n = tl.program_id(1)
    base = program_offset(1, numel)
    out_base = program_offset(1, out_stride)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    k = tl.load(step_ptr).to(tl.int32)
    row = coef_ptr + k * NCOEF
    x0_max = tl.load(row + COL_X0_MAX)
    eps_x0_max = tl.load(row + COL_EPS_X0_MAX)

    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
    x0_prev = tl.load(x0_prev_ptr + base + offs, mask=mask, other=0.0)
    o = tl.load(out_ptr + out_base + offs, mask=mask, other=0.0).to(tl.float32)
    raw = _estimate_x0(tl.load(row + COL_A), tl.load(row + COL_B), x, o)
    x0 = tl.minimum(tl.maximum(raw, -x0_max), x0_max)
    eps_x0 = tl.minimum(tl.maximum(raw, -eps_x0_max), eps_x0_max)
    eps = _estimate_eps(tl.load(row + COL_X0_FROM_XT), tl.load(row + COL_X0_FROM_EPS), x, eps_x0)
    x_next = _combine(
        tl.load(row + COL_C_X0), tl.load(row + COL_C_XT), tl.load(row + COL_C_X0_PREV),
        tl.load(row + COL_C_EPS), x0, x, x0_prev, eps,
    )  # fmt: skip
    if LEARNED:
        v = tl.load(out_ptr + out_base + numel + offs, mask=mask, other=0.0).to(tl.float32)
        log_var = _learned_log_var(
            v, tl.load(row + COL_LOG_VAR_MIN), tl.load(row + COL_LOG_VAR_MAX)
        )
        sigma = tl.exp(0.5 * log_var)
    else:
        sigma = tl.load(row + COL_SIGMA)
    if DRAW:
        key = tl.load(keys_ptr + n)
        z = tl.randn(key, (k + 1) * numel + offs)
    else:
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0)
    x_next = _add_noise(x_next, tl.load(row + COL_NOISE_ON), sigma, z)
    tl.store(x_next_ptr + base + offs, x_next, mask=mask)
    tl.store(x0_ptr + base + offs, x0, mask=mask)
    if HAS_CAST:  # the next step's network input, in its dtype and layout
        xc = xc_ptr + program_offset(1, sxcN) + (offs // HW) * sxcC + (offs % HW) * sxcS
        tl.store(xc, cast_to(x_next, xc_ptr.dtype.element_ty), mask=mask)


def _check(
    model_output: torch.Tensor, x: torch.Tensor, coeffs: torch.Tensor, learned: bool
) -> None:
    check_input("x", x, (4,))
    check_input("model_output", model_output, (4,))
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be contiguous float32 (the chain's state), got {x.dtype}")
    b, c, h, w = x.shape
    # A network with learned variance outputs 2C channels; only ``learned`` chains read the rest.
    wants = [(b, 2 * c, h, w)] if learned else [(b, c, h, w), (b, 2 * c, h, w)]
    if tuple(model_output.shape) not in wants:
        raise ValueError(
            f"model_output must be {' or '.join(map(str, wants))} for x {tuple(x.shape)} "
            f"(learned={learned}), got {tuple(model_output.shape)}"
        )
    if coeffs.dim() != 2 or coeffs.shape[1] != NUM_COEFFICIENTS or coeffs.dtype != torch.float32:
        raise ValueError(
            f"coeffs must be float32 [steps, {NUM_COEFFICIENTS}], got {tuple(coeffs.shape)} "
            f"{coeffs.dtype}"
        )
    for name, t in (("model_output", model_output), ("coeffs", coeffs)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def draws_noise(x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether :func:`sampler_step` on ``x`` runs the kernel, which draws z itself (else the
    PyTorch reference runs, and needs z)."""
    return use_triton(backend, x, _sampler_step_kernel)


def sampler_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    coeffs: torch.Tensor,
    step: torch.Tensor,
    keys: torch.Tensor | None = None,
    *,
    x0_prev: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    learned: bool = False,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    also_out: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_next, x0) of chain step ``step`` (an int64 tensor of one element on x's device).

    ``x0_prev``: the previous step's x0 (None: zeros). The kernel draws z from ``keys`` (int64
    [B]: sample_index << 32 | seed) unless ``z`` is given; the PyTorch reference needs ``z``.
    ``out`` = (x_next, x0) buffers: x0 may be ``x0_prev`` itself (the engine's chain state);
    otherwise they may alias nothing that is read. ``also_out``: x_next written again, in this
    tensor's dtype and layout (x's shape): the next step's network input, with no cast of its
    own. ``backend``: see :mod:`ddpm_fast.kernels._launch`.
    """
    _check(model_output, x, coeffs, learned)
    if also_out is not None:
        check_out(also_out, x.shape, also_out)
        if also_out.device != x.device:
            raise ValueError(f"also_out is on {also_out.device} but x is on {x.device}")
    if x0_prev is None:
        x0_prev = torch.zeros_like(x)
    elif x0_prev.shape != x.shape or x0_prev.dtype != torch.float32 or not x0_prev.is_contiguous():
        raise ValueError(
            f"x0_prev must be contiguous float32 {tuple(x.shape)}, got {x0_prev.dtype} "
            f"{tuple(x0_prev.shape)}"
        )
    elif x0_prev.device != x.device:
        raise ValueError(f"x0_prev is on {x0_prev.device} but x is on {x.device}")
    if step.numel() != 1 or step.dtype != torch.int64 or step.device != x.device:
        raise ValueError(f"step must be one int64 on {x.device}, got {step.dtype} {step.shape}")
    b = x.shape[0]
    numel = x[0].numel()
    if numel and (coeffs.shape[0] + 1) * numel > MAX_COUNTER:
        raise ValueError(
            f"{coeffs.shape[0] + 1} steps of {numel} values exceed the 2**31 Philox counters"
        )
    if z is not None and (tuple(z.shape) != tuple(x.shape) or z.dtype != torch.float32):
        raise ValueError(f"z must be float32 {tuple(x.shape)}, got {z.dtype} {tuple(z.shape)}")
    if not draws_noise(x, backend):
        if z is None:
            raise ValueError("the PyTorch reference of sampler_step needs z")
        x_next, x0 = sampler_step_reference(
            model_output, x, coeffs[step.reshape(1)][0], z, x0_prev=x0_prev, learned=learned
        )
        if also_out is not None:
            also_out.copy_(x_next)
        if out is None:
            return x_next, x0
        return out[0].copy_(x_next), out[1].copy_(x0)

    if z is None and (keys is None or tuple(keys.shape) != (b,) or keys.dtype != torch.int64):
        raise ValueError(f"keys must be int64 [{b}] when z is not given")
    x_next, x0 = out if out is not None else (torch.empty_like(x), torch.empty_like(x))
    model_output = model_output.contiguous()
    xc = x_next if also_out is None else also_out
    xc_strides = spatial_strides("also_out", xc)
    with device_guard(x):
        _sampler_step_kernel[check_grid((cdiv(numel, BLOCK), b), "sampler_step")](
            model_output, x, x0_prev, coeffs, step, keys if z is None else x, x if z is None else z,
            x_next, x0, xc, numel, model_output.stride(0), x.shape[2] * x.shape[3], *xc_strides,
            NCOEF=NUM_COEFFICIENTS, LEARNED=learned, DRAW=z is None,
            HAS_CAST=also_out is not None, BLOCK=BLOCK, num_warps=4,
        )  # fmt: skip
    return x_next, x0


def sampler_step_reference(
    model_output: torch.Tensor,
    x: torch.Tensor,
    row: torch.Tensor,
    z: torch.Tensor,
    *,
    x0_prev: torch.Tensor | None = None,
    learned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused PyTorch sequence of ``rule``, for one coefficient row [NUM_COEFFICIENTS]
    (float32)."""
    c = dict(zip(COEFFICIENTS, row.unbind(), strict=True))
    channels = x.shape[1]
    out = model_output[:, :channels].float()
    raw = rule.estimate_x0(c["a"], c["b"], x, out)
    x0 = torch.minimum(torch.maximum(raw, -c["x0_max"]), c["x0_max"])
    eps_x0 = torch.minimum(torch.maximum(raw, -c["eps_x0_max"]), c["eps_x0_max"])
    eps = rule.estimate_eps(c["x0_from_xt"], c["x0_from_eps"], x, eps_x0)
    x0_prev = torch.zeros_like(x) if x0_prev is None else x0_prev
    x_next = rule.combine(c["c_x0"], c["c_xt"], c["c_x0_prev"], c["c_eps"], x0, x, x0_prev, eps)
    if learned:
        v = model_output[:, channels:].float()
        sigma = (0.5 * rule.learned_log_var(v, c["log_var_min"], c["log_var_max"])).exp()
    else:
        sigma = c["sigma"]
    return rule.add_noise(x_next, c["noise_on"], sigma, z), x0
