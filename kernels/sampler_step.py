"""One reverse step of a DDPM/DDIM chain from the network's output, fused, with its noise drawn
inside the kernel. For x [B, C, H, W] (float32, the chain's state) and the network's output
[B, C or 2C, H, W] at chain step k, with the step's row of coefficients ``coeffs[k]``:

    x0     = clamp(a x - b out, -1, 1)            (pred_noise, pred_v; pred_x0 is a = 0, b = -1)
    eps    = (x0_from_xt x - x0) / x0_from_eps    (re-derived after clipping, as DDIM does)
    x_next = c_x0 x0 + c_xt x + c_eps eps + noise_on sigma z

``sigma`` is the row's, or with ``learned=True`` exp(log_var / 2) where log_var interpolates
(log_var_min, log_var_max) by (v + 1) / 2 and v is the output's second half of channels.
``z`` is ``tl.randn(key[b], (k + 1) * C*H*W + element)``: the counter-based Philox stream of
``ddpm_fast.noise`` (key = sample_index << 32 | seed; stream step 0 is x_T), so the kernel needs
no generator state and runs the same inside a CUDA graph. The step index k is read from a
device tensor, never from the host.

The PyTorch reference takes ``z`` as an argument (the Philox stream in PyTorch lives in
``ddpm_fast.noise``).
"""

from __future__ import annotations

import torch

from ._launch import (
    cdiv,
    check_grid,
    check_input,
    device_guard,
    jit,
    program_offset,
    tl,
    use_triton,
)

# The columns of a coefficient row.
COEFFICIENTS = (
    "a",
    "b",
    "x0_from_xt",
    "x0_from_eps",
    "c_x0",
    "c_xt",
    "c_eps",
    "sigma",
    "log_var_min",
    "log_var_max",
    "noise_on",
)
NUM_COEFFICIENTS = len(COEFFICIENTS)
BLOCK = 1024
MAX_COUNTER = 2**31


@jit
def _sampler_step_kernel(
    out_ptr,
    x_ptr,
    coef_ptr,
    step_ptr,
    keys_ptr,
    z_ptr,
    x_next_ptr,
    x0_ptr,
    numel,
    out_stride,
    NCOEF: tl.constexpr,
    LEARNED: tl.constexpr,
    DRAW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (block of a sample's C*H*W elements, sample). DRAW: draw z with tl.randn, else
    read it from z_ptr. Samples' offsets are int64: a batch may hold more than 2**31 values."""
    n = tl.program_id(1)
    base = program_offset(1, numel)
    out_base = program_offset(1, out_stride)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    k = tl.load(step_ptr).to(tl.int32)
    row = coef_ptr + k * NCOEF
    a = tl.load(row + 0)
    b = tl.load(row + 1)
    x0_from_xt = tl.load(row + 2)
    x0_from_eps = tl.load(row + 3)
    c_x0 = tl.load(row + 4)
    c_xt = tl.load(row + 5)
    c_eps = tl.load(row + 6)
    noise_on = tl.load(row + 10)

    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
    o = tl.load(out_ptr + out_base + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = a * x - b * o
    x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    x_next = c_x0 * x0 + c_xt * x
    eps = (x0_from_xt * x - x0) / x0_from_eps
    x_next = x_next + c_eps * eps
    if LEARNED:
        v = tl.load(out_ptr + out_base + numel + offs, mask=mask, other=0.0)
        frac = (v.to(tl.float32) + 1.0) * 0.5
        log_var = frac * tl.load(row + 9) + (1.0 - frac) * tl.load(row + 8)
        sigma = tl.exp(0.5 * log_var)
    else:
        sigma = tl.load(row + 7)
    if DRAW:
        key = tl.load(keys_ptr + n)
        z = tl.randn(key, (k + 1) * numel + offs)
    else:
        z = tl.load(z_ptr + base + offs, mask=mask, other=0.0)
    x_next = x_next + noise_on * (sigma * z)
    tl.store(x_next_ptr + base + offs, x_next, mask=mask)
    tl.store(x0_ptr + base + offs, x0, mask=mask)


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
    z: torch.Tensor | None = None,
    learned: bool = False,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_next, x0) of chain step ``step`` (an int64 tensor of one element on x's device).

    The kernel draws z from ``keys`` (int64 [B]: sample_index << 32 | seed) unless ``z`` is
    given; the PyTorch reference needs ``z``. ``out`` = (x_next, x0) buffers (may alias
    nothing that is read). ``backend``: see :mod:`ddpm_fast.kernels._launch`.
    """
    _check(model_output, x, coeffs, learned)
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
            model_output, x, coeffs[step.reshape(1)][0], z, learned=learned
        )
        if out is None:
            return x_next, x0
        return out[0].copy_(x_next), out[1].copy_(x0)

    if z is None and (keys is None or tuple(keys.shape) != (b,) or keys.dtype != torch.int64):
        raise ValueError(f"keys must be int64 [{b}] when z is not given")
    x_next, x0 = out if out is not None else (torch.empty_like(x), torch.empty_like(x))
    model_output = model_output.contiguous()
    with device_guard(x):
        _sampler_step_kernel[check_grid((cdiv(numel, BLOCK), b), "sampler_step")](
            model_output, x, coeffs, step, keys if z is None else x, x if z is None else z,
            x_next, x0, numel, model_output.stride(0), NCOEF=NUM_COEFFICIENTS, LEARNED=learned,
            DRAW=z is None, BLOCK=BLOCK, num_warps=4,
        )  # fmt: skip
    return x_next, x0


def sampler_step_reference(
    model_output: torch.Tensor,
    x: torch.Tensor,
    row: torch.Tensor,
    z: torch.Tensor,
    *,
    learned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused PyTorch sequence, for one coefficient row [NUM_COEFFICIENTS] (float32)."""
    c = dict(zip(COEFFICIENTS, row.unbind(), strict=True))
    channels = x.shape[1]
    out = model_output[:, :channels].float()
    x0 = (c["a"] * x - c["b"] * out).clamp(-1.0, 1.0)
    x_next = c["c_x0"] * x0 + c["c_xt"] * x
    x_next = x_next + c["c_eps"] * ((c["x0_from_xt"] * x - x0) / c["x0_from_eps"])
    if learned:
        frac = (model_output[:, channels:].float() + 1.0) * 0.5
        sigma = (0.5 * (frac * c["log_var_max"] + (1.0 - frac) * c["log_var_min"])).exp()
    else:
        sigma = c["sigma"]
    return x_next + c["noise_on"] * (sigma * z), x0
