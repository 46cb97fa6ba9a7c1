"""The kernels' launchers as PyTorch custom ops (``torch.library.custom_op``), so that
torch.compile and torch.export see each launch as one op of their graph, with its shapes from a
fake implementation, instead of tracing into the launcher's Python.

Each op is functional: it returns a new tensor, allocated the same way by its implementation and
by its fake one (shape, dtype and strides: what inductor plans with); a launcher's ``out`` and
``also_out`` become copies of that result in the compiled graph, where inductor may fuse them.
The implementation is the launcher itself, which dispatches as always (the Triton kernel on CUDA,
the PyTorch path elsewhere: that is the op's CPU implementation). A launcher calls its op when
torch.compile or torch.export traces it (:func:`traced`) and runs directly otherwise; the ops
exist once this module is imported (the launchers' modules import it).
"""

# ruff: noqa: UP045
# No ``from __future__ import annotations``, and Optional[Tensor] rather than Tensor | None:
# custom_op infers its schema from the annotations, and torch 2.4 reads only the typing forms.
from typing import Optional

import torch
from torch import Tensor

NAMESPACE = "ddpm_fast"


def traced() -> bool:
    """Whether torch.compile or torch.export is tracing the caller."""
    return torch.compiler.is_compiling()


def _none(value):
    """The launchers' None, which the ops' schemas spell as an empty string or 0."""
    return value or None


@torch.library.custom_op(f"{NAMESPACE}::group_norm", mutates_args=())
def group_norm_op(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    pre_bias: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    eps: float,
    act: str,
    edge_bias: Optional[Tensor],
    residual: Optional[Tensor],
    residual_bias: Optional[Tensor],
    split: int,
    backend: str,
) -> Tensor:
    from .group_norm import group_norm

    return group_norm(
        x, num_groups, weight, bias, pre_bias=pre_bias, scale=scale, shift=shift, eps=eps,
        act=_none(act), edge_bias=edge_bias, residual=residual, residual_bias=residual_bias,
        out=_like(x), split=_none(split), backend=_none(backend),
    )  # fmt: skip


@torch.library.custom_op(f"{NAMESPACE}::channel_norm", mutates_args=())
def channel_norm_op(
    x: Tensor,
    g: Tensor,
    rms: bool,
    eps: float,
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    act: str,
    pre_bias: Optional[Tensor],
    residual: Optional[Tensor],
    residual_bias: Optional[Tensor],
    backend: str,
) -> Tensor:
    from .channel_norm import channel_layer_norm, channel_rms_norm

    around = {"pre_bias": pre_bias, "residual": residual, "residual_bias": residual_bias}
    if rms:
        return channel_rms_norm(
            x, g, scale=scale, shift=shift, act=_none(act), out=_like(x),
            backend=_none(backend), **around,
        )  # fmt: skip
    return channel_layer_norm(x, g, eps=eps, out=_like(x), backend=_none(backend), **around)


@torch.library.custom_op(f"{NAMESPACE}::linear_attention", mutates_args=())
def linear_attention_op(
    qkv: Tensor,
    heads: int,
    mem_kv: Optional[Tensor],
    q_scale: float,
    v_scale: float,
    split: int,
    backend: str,
    out_channels: int,
) -> Tensor:
    from .linear_attention import linear_attention

    return linear_attention(
        qkv, heads, mem_kv=mem_kv, q_scale=q_scale, v_scale=v_scale,
        out=_attention_out(qkv, out_channels), split=_none(split), backend=_none(backend),
    )  # fmt: skip


@torch.library.custom_op(f"{NAMESPACE}::projection", mutates_args=())
def projection_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    norm_in: str,
    g_in: Optional[Tensor],
    eps_in: float,
    norm_out: str,
    g_out: Optional[Tensor],
    eps_out: float,
    residual: Optional[Tensor],
    x_heads: bool,
    height: int,
    width: int,
    backend: str,
) -> Tensor:
    from .projection import projection

    out = _projection_out(x, weight, height, width)
    return projection(
        x, weight, bias, norm_in=_none(norm_in), g_in=g_in, eps_in=eps_in,
        norm_out=_none(norm_out), g_out=g_out, eps_out=eps_out, residual=residual,
        x_heads=x_heads, spatial=(height, width), out=out, backend=_none(backend),
    )  # fmt: skip


def _like(x: Tensor) -> Tensor:
    """A norm's output: x's shape, dtype and layout (channels_last stays channels_last)."""
    return torch.empty_like(x)


def _attention_out(qkv: Tensor, channels: int) -> Tensor:
    """Linear attention's output: [B, channels, ...] in qkv's memory format."""
    from .linear_attention import _memory_format

    shape = (qkv.shape[0], channels, *qkv.shape[2:])
    return torch.empty(shape, dtype=qkv.dtype, device=qkv.device, memory_format=_memory_format(qkv))


def _projection_out(x: Tensor, weight: Tensor, height: int, width: int) -> Tensor:
    """The projection's output: [N, O, H, W] channels_last, x's dtype."""
    shape = (x.shape[0], weight.shape[0], height, width)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@group_norm_op.register_fake
def _(x, *args) -> Tensor:
    return _like(x)


@channel_norm_op.register_fake
def _(x, *args) -> Tensor:
    return _like(x)


@linear_attention_op.register_fake
def _(qkv, heads, mem_kv, q_scale, v_scale, split, backend, out_channels) -> Tensor:
    return _attention_out(qkv, out_channels)


@projection_op.register_fake
def _(x, weight, *args) -> Tensor:
    height, width = args[-3], args[-2]
    return _projection_out(x, weight, height, width)
