"""The engine's U-Net: the reference network (denoising-diffusion-pytorch 1.x) with its weights
folded, its time conditioning precomputed for the chain's timesteps, and its modules swapped for
the fused kernels. ``FastUnet(reference, timesteps)(x, step)`` computes
``reference(x, timesteps[step])``; ``step`` is an int64 device tensor, so the forward needs no
host value and captures in a CUDA graph.

Each swap is its own class built from the reference module it replaces:

- ``FastBlock``: weight-standardised conv (folded) -> one fused GroupNorm + scale/shift + SiLU;
  where the GroupNorm kernel runs (CUDA), the conv's bias is the kernel's pre-bias instead of an
  add of its own after the conv;
- ``FastResnetBlock``: its (scale, shift), a slice of the step's row of one table of every
  block's conditioning at every chain timestep (one gather a step for the whole network);
- ``FastLinearAttention``: PreNorm channel LayerNorm, 1x1 conv, the linear-attention kernel,
  1x1 conv and LayerNorm, plus the residual;
- ``FastAttention``: the middle's full attention through ``F.scaled_dot_product_attention``;
- ``Downsample``'s pixel-unshuffle + 1x1 conv as one 2x2 stride-2 conv (the same sums).

Half precision: convolutions, matmuls and activations in the engine's dtype but the last conv
(``final_conv``, fp32: the output the sampler amplifies); the norms' statistics in fp32 (the
kernels'); the epsilons are the fp32 reference's, since fp32 is the truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..folding import fold_weights, time_conditioning
from ..kernels.channel_norm import channel_layer_norm
from ..kernels.group_norm import group_norm, runs_kernel
from ..kernels.linear_attention import linear_attention
from ..models import dd_pytorch_v1 as ref

# The fp32 reference's epsilon for its LayerNorms (the library's dtype_eps).
LAYER_NORM_EPS = ref.dtype_eps(torch.float32)


class FastBlock(nn.Module):
    """``ref.Block``: conv -> GroupNorm -> x * (1 + scale) + shift -> SiLU, the last three fused.

    ``bias_in_norm``: the conv runs without its bias, which the fused GroupNorm adds as its
    pre-bias (the same sum, one launch fewer where the kernel runs; on the PyTorch path the conv
    adds it for free)."""

    def __init__(self, block: ref.Block, bias_in_norm: bool = False):
        super().__init__()
        self.proj = block.proj  # already a plain conv holding the standardised weight
        self.groups = block.norm.num_groups
        self.eps = block.norm.eps
        self.weight = block.norm.weight
        self.bias = block.norm.bias
        self.pre_bias = None
        if bias_in_norm and self.proj.bias is not None:
            self.pre_bias = nn.Parameter(self.proj.bias.detach().reshape(1, -1).clone(), False)
            self.proj.bias = None

    def forward(self, x, scale=None, shift=None):
        return group_norm(
            self.proj(x), self.groups, self.weight, self.bias, pre_bias=self.pre_bias,
            scale=scale, shift=shift, eps=self.eps, act="silu",
        )  # fmt: skip


class FastResnetBlock(nn.Module):
    """``ref.ResnetBlock`` with its time MLP replaced by columns ``[start, start + 2 * dim_out)``
    of the network's time row (scale, then shift)."""

    def __init__(self, block: ref.ResnetBlock, start: int, bias_in_norm: bool = False):
        super().__init__()
        self.block1 = FastBlock(block.block1, bias_in_norm)
        self.block2 = FastBlock(block.block2, bias_in_norm)
        self.res_conv = block.res_conv
        self.dim_out = block.block1.norm.num_channels
        self.start = start

    def forward(self, x, time_row):
        mid, end = self.start + self.dim_out, self.start + 2 * self.dim_out
        scale, shift = time_row[:, self.start : mid], time_row[:, mid:end]  # views
        h = self.block1(x, scale, shift)
        h = self.block2(h)
        return h + self.res_conv(x)


def _layer_norm(x: torch.Tensor, norm: ref.LayerNorm) -> torch.Tensor:
    return channel_layer_norm(x, norm.g, eps=LAYER_NORM_EPS)


class FastLinearAttention(nn.Module):
    """``Residual(PreNorm(LayerNorm, LinearAttention))``."""

    def __init__(self, residual: ref.Residual):
        super().__init__()
        prenorm = residual.fn
        attention = prenorm.fn
        self.norm = prenorm.norm
        self.heads = attention.heads
        self.scale = attention.scale
        self.to_qkv = attention.to_qkv
        self.to_out = attention.to_out[0]
        self.out_norm = attention.to_out[1]

    def forward(self, x):
        h, w = x.shape[-2:]
        qkv = self.to_qkv(_layer_norm(x, self.norm))
        out = linear_attention(qkv, self.heads, q_scale=self.scale, v_scale=1.0 / (h * w))
        return _layer_norm(self.to_out(out), self.out_norm) + x


class FastAttention(nn.Module):
    """``Residual(PreNorm(LayerNorm, Attention))`` through scaled_dot_product_attention (whose
    default scale, dim_head ** -0.5, is the reference's)."""

    def __init__(self, residual: ref.Residual):
        super().__init__()
        prenorm = residual.fn
        attention = prenorm.fn
        self.norm = prenorm.norm
        self.heads = attention.heads
        self.scale = attention.scale
        self.to_qkv = attention.to_qkv
        self.to_out = attention.to_out

    def forward(self, x):
        b, _, h, w = x.shape
        qkv = self.to_qkv(_layer_norm(x, self.norm))
        # [B, 3 * heads * d, H, W] -> 3 x [B, heads, H * W, d]. In NCHW the d axis is strided
        # (H * W apart), which sends SDPA to its math path: one copy makes each head's [H * W, d]
        # contiguous (channels_last already is).
        qkv = qkv.reshape(b, 3, self.heads, -1, h * w).transpose(-1, -2)
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        q, k, v = qkv.unbind(1)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(-1, -2).reshape(b, -1, h, w)
        return self.to_out(out) + x


def unshuffle_conv(downsample: nn.Sequential) -> nn.Conv2d:
    """``Rearrange('b c (h p1) (w p2) -> b (c p1 p2) h w') + Conv2d(4c, o, 1)`` as the equivalent
    ``Conv2d(c, o, 2, stride=2)``: input channel c * 4 + p1 * 2 + p2 is tap (p1, p2) of c."""
    conv = downsample[1]
    out_channels, in4 = conv.weight.shape[:2]
    folded = torch.nn.utils.skip_init(
        nn.Conv2d, in4 // 4, out_channels, 2, stride=2, device=conv.weight.device
    )
    with torch.no_grad():
        folded.weight.copy_(conv.weight.reshape(out_channels, in4 // 4, 2, 2))
        folded.bias.copy_(conv.bias)
    return folded.to(conv.weight.dtype).requires_grad_(False)


class Upsample(nn.Module):
    def __init__(self, upsample: nn.Sequential):
        super().__init__()
        self.conv = upsample[1]

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _resample(module: nn.Module) -> nn.Module:
    """The engine's version of a stage's last module (down- or upsampling, or a conv)."""
    if isinstance(module, nn.Sequential) and isinstance(module[1], nn.Conv2d):
        if isinstance(module[0], nn.Upsample):
            return Upsample(module)
        return unshuffle_conv(module)
    return module


class FastUnet(nn.Module):
    """The engine's network for one chain: ``forward(x, step, x_self_cond=None)`` equals
    ``reference(x, timesteps[step], x_self_cond)``.

    ``bias_in_norm``: the Blocks' conv biases go into the fused GroupNorm (default: where its
    kernel runs for tensors on ``timesteps``' device)."""

    def __init__(
        self, reference: ref.Unet, timesteps: torch.Tensor, bias_in_norm: bool | None = None
    ):
        super().__init__()
        if not isinstance(reference, ref.Unet):
            raise TypeError(f"FastUnet takes a {ref.FAMILY} Unet, got {type(reference).__name__}")
        self.config = reference.config
        self.self_condition = reference.self_condition
        self.channels = reference.channels
        if bias_in_norm is None:
            bias_in_norm = runs_kernel(torch.empty(0, device=timesteps.device))
        folded = fold_weights(reference)
        tables = time_conditioning(reference, timesteps)
        # Every block's (scale, shift) side by side: [steps, sum of 2 * dim_out].
        self.register_buffer("time_table", torch.cat(list(tables.values()), dim=1).contiguous())
        starts, start = {}, 0
        for name, table in tables.items():
            starts[name], start = start, start + table.shape[1]

        def resnet(name: str) -> FastResnetBlock:
            return FastResnetBlock(folded.get_submodule(name), starts[name], bias_in_norm)

        def stage(name: str, modules: nn.ModuleList) -> nn.ModuleList:
            """[block1, block2, attention, resampling] of the stage ``name`` ("downs.0", ...)."""
            return nn.ModuleList(
                [
                    resnet(f"{name}.0"),
                    resnet(f"{name}.1"),
                    FastLinearAttention(modules[2]),
                    _resample(modules[3]),
                ]
            )

        self.init_conv = folded.init_conv
        self.downs = nn.ModuleList(stage(f"downs.{i}", m) for i, m in enumerate(folded.downs))
        self.mid_block1 = resnet("mid_block1")
        self.mid_attn = FastAttention(folded.mid_attn)
        self.mid_block2 = resnet("mid_block2")
        self.ups = nn.ModuleList(stage(f"ups.{i}", m) for i, m in enumerate(folded.ups))
        self.final_res_block = resnet("final_res_block")
        self.final_conv = folded.final_conv
        # Half precision: the last conv stays fp32 (one small conv). Near t = T the sampler takes
        # x0 = sqrt(1 / abar) x - sqrt(1 / abar - 1) out, ~157 x the output's bf16 rounding; on
        # the default model's bf16 chains (DDIM 50) this halves the images' rms error.
        self.final_conv.keeps_fp32 = True
        self.eval().requires_grad_(False)

    def forward(self, x, step, x_self_cond=None):
        if self.self_condition:
            if x_self_cond is None:
                x_self_cond = torch.zeros_like(x)
            x = torch.cat((x_self_cond, x), dim=1)
        t = self.time_table.index_select(0, step)  # [1, sum of 2 * dim_out], on the device
        x = self.init_conv(x)
        r = x
        h = []
        for block1, block2, attn, downsample in self.downs:
            x = block1(x, t)
            h.append(x)
            x = block2(x, t)
            x = attn(x)
            h.append(x)
            x = downsample(x)
        x = self.mid_block1(x, t)
        x = self.mid_attn(x)
        x = self.mid_block2(x, t)
        for block1, block2, attn, upsample in self.ups:
            x = block1(torch.cat((x, h.pop()), dim=1), t)
            x = block2(torch.cat((x, h.pop()), dim=1), t)
            x = attn(x)
            x = upsample(x)
        x = self.final_res_block(torch.cat((x, r), dim=1), t)
        return self.final_conv(x.float())
