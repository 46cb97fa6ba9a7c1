"""denoising-diffusion-pytorch 1.x onto the fast modules.

- ``FastBlock``: weight-standardised conv (folded) -> one fused GroupNorm + scale/shift + SiLU;
  where the GroupNorm kernel runs (CUDA), the conv's bias is the kernel's pre-bias instead of an
  add of its own after the conv;
- ``FastResnetBlock``: its (scale, shift), a slice of the step's time row;
- ``FastLinearAttention``: PreNorm channel LayerNorm, 1x1 conv, the linear-attention kernel,
  1x1 conv and LayerNorm, plus the residual;
- ``FastAttention``: the middle's full attention through ``F.scaled_dot_product_attention``;
- ``Downsample``'s pixel-unshuffle + 1x1 conv as one 2x2 stride-2 conv (the same sums).

For ONNX Runtime (``onnx_form``, fed ``onnx_time_rows``): ``AffineBlock``, the norm's affine and
the time scale/shift as one multiply-add; ``TokenLinearAttention`` and ``TokenAttention``, the
attention blocks on the [B, H * W, C] token view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...models import dd_pytorch_v1 as ref
from ...models.convs import conv_holding
from ..modules import (
    GroupNormAct,
    TimeSlice,
    Upsample,
    channel_layer_norm,
    frozen,
    image_view,
    linear_attention,
    sdpa,
    take_conv_bias,
    token_view,
)

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
        pre_bias = take_conv_bias(self.proj) if bias_in_norm else None
        self.norm = GroupNormAct(block.norm, "silu", pre_bias)

    @property
    def pre_bias(self):
        return self.norm.pre_bias

    def forward(self, x, scale=None, shift=None):
        return self.norm(self.proj(x), scale, shift)


class FastResnetBlock(nn.Module):
    """``ref.ResnetBlock`` with its time MLP replaced by its slice of the time row (scale, then
    shift)."""

    def __init__(self, block: ref.ResnetBlock, time: TimeSlice, bias_in_norm: bool = False):
        super().__init__()
        self.block1 = FastBlock(block.block1, bias_in_norm)
        self.block2 = FastBlock(block.block2, bias_in_norm)
        self.res_conv = block.res_conv
        self.time = time

    def forward(self, x, time_row):
        scale, shift = self.time(time_row).chunk(2, dim=1)  # views
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
    """``Residual(PreNorm(LayerNorm, Attention))`` through scaled_dot_product_attention."""

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
        qkv = self.to_qkv(_layer_norm(x, self.norm))
        return self.to_out(sdpa(qkv, self.heads, self.scale)) + x


class AffineBlock(nn.Module):
    """``ref.Block`` for ONNX Runtime: GroupNorm's affine and the time scale/shift as one
    per-channel multiply-add, ``(x * w + b) * (1 + scale) + shift = x * A + B``. The time rows
    carry ``A = w * (1 + scale)`` and ``B = b * (1 + scale) + shift`` (``onnx_time_rows``, made
    once per chain): two passes over the feature map and six small ops per block fewer."""

    def __init__(self, block: ref.Block):
        super().__init__()
        self.proj = block.proj
        self.groups, self.eps = block.norm.num_groups, block.norm.eps
        self.weight = frozen(block.norm.weight.reshape(1, -1, 1, 1))
        self.bias = frozen(block.norm.bias.reshape(1, -1, 1, 1))

    def forward(self, x, scale_shift=None):
        """``scale_shift``: (A, B) of ``onnx_time_rows``, or None (the norm's own affine)."""
        a, b = (self.weight, self.bias) if scale_shift is None else scale_shift
        return F.silu(F.group_norm(self.proj(x), self.groups, None, None, self.eps) * a + b)


def onnx_time_rows(
    reference: ref.Unet, conditioning: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The time rows ``onnx_form``'s network reads: each ResnetBlock's (scale, shift) rows
    [n, 2C] of ``reference.time_conditioning`` as its ``AffineBlock``'s (A, B)."""
    rows = {}
    for name, row in conditioning.items():
        norm = reference.get_submodule(name).block1.norm
        scale, shift = row.float().chunk(2, dim=1)
        weight, bias = norm.weight.detach().float(), norm.bias.detach().float()
        rows[name] = torch.cat((weight * (1 + scale), bias * (1 + scale) + shift), dim=1)
    return rows


class TokenLinearAttention(nn.Module):
    """``Residual(PreNorm(LayerNorm, LinearAttention))`` on the [B, N, C] token view (N = H * W):
    the same function in the ops ONNX Runtime runs fastest, 2.1x faster than the reference's
    form on the CIFAR-10 U-Net's 32x32 block.

    - Both channel LayerNorms are one fused LayerNormalization each (the reference's form
      traces to eight ops over the channel axis); the PreNorm gain is folded into the
      projections.
    - q is projected onto the tokens ([B, N, h * d], its softmax over d on the last axis), k and
      v onto the channels ([B, h, d, N], k's softmax over N on the last axis): no transposes
      but the view's two.
    - The output contraction and to_out's 1x1 conv are one product: ``q @ M`` with
      ``M[h * d, C] = context @ W_out`` (per head), made per step from the d x d contexts;
      both scales (q's and v's 1 / N) are folded into W_out."""

    def __init__(self, residual: ref.Residual):
        super().__init__()
        attention = residual.fn.fn
        qkv, hidden = _take_projection(self, residual)
        self.q = frozen(qkv[:hidden].t())  # [C, h * d]
        self.kv = frozen(qkv[hidden:])  # [2 * h * d, C]
        out_conv, out_norm = attention.to_out
        out = out_conv.weight[:, :, 0, 0].t() * attention.scale  # [h * e, C]
        self.out = frozen(out.reshape(self.heads, self.dim_head, self.channels))
        self.out_bias = frozen(out_conv.bias)
        self.out_gain = frozen(out_norm.g.reshape(-1))

    def forward(self, x):
        b, c, h, d = x.shape[0], self.channels, self.heads, self.dim_head
        n = x.shape[2] * x.shape[3]
        normed = _normed_tokens(x, c)
        q = (normed @ self.q).reshape(b, n, h, d).softmax(dim=-1).reshape(b, n, h * d)
        k, v = (self.kv @ normed.transpose(1, 2)).reshape(b, 2, h, d, n).unbind(1)
        context = k.softmax(dim=-1) @ v.transpose(-1, -2)  # [B, h, d, e]
        m = (context @ (self.out * (1.0 / n))).reshape(b, h * d, c)  # v's 1 / N, folded
        eps = ref.dtype_eps(x.dtype)
        return _add_to_image(F.layer_norm(q @ m + self.out_bias, (c,), self.out_gain, None, eps), x)


class TokenAttention(nn.Module):
    """``Residual(PreNorm(LayerNorm, Attention))``, the middle's full attention, on the token view
    for ONNX Runtime: one fused LayerNormalization, the PreNorm gain and q's scale folded into the
    projection, softmax along the last axis, MatMuls instead of Einsums."""

    def __init__(self, residual: ref.Residual):
        super().__init__()
        attention = residual.fn.fn
        qkv, hidden = _take_projection(self, residual)
        qkv = torch.cat((qkv[:hidden] * attention.scale, qkv[hidden:]))
        self.qkv = frozen(qkv.t())  # [C, 3 * h * d]
        self.out = frozen(attention.to_out.weight[:, :, 0, 0].t())  # [h * d, C]
        self.out_bias = frozen(attention.to_out.bias)

    def forward(self, x):
        b, h, d = x.shape[0], self.heads, self.dim_head
        n = x.shape[2] * x.shape[3]
        qkv = _normed_tokens(x, self.channels) @ self.qkv
        q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, N, d]
        out = (q @ k.transpose(-1, -2)).softmax(dim=-1) @ v  # [B, h, N, d]
        return _add_to_image(out.transpose(1, 2).reshape(b, n, h * d) @ self.out + self.out_bias, x)


def _take_projection(block: nn.Module, residual: ref.Residual) -> tuple[torch.Tensor, int]:
    """Set ``block``'s heads, channels and dim_head from ``Residual(PreNorm(LayerNorm,
    attention))``; return its qkv projection [3 * h * d, C] with the LayerNorm's gain folded in
    (it scales the channels the projection sums: (W * g) x = W (g x)), and h * d."""
    attention = residual.fn.fn
    qkv = attention.to_qkv.weight[:, :, 0, 0] * residual.fn.norm.g.reshape(1, -1)
    hidden = qkv.shape[0] // 3
    block.heads, block.channels = attention.heads, qkv.shape[1]
    block.dim_head = hidden // attention.heads
    return qkv, hidden


def _normed_tokens(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The channel LayerNorm (no gain) of x [B, C, H, W] on its token view [B, H * W, C]."""
    return F.layer_norm(token_view(x, channels), (channels,), None, None, ref.dtype_eps(x.dtype))


def _add_to_image(tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``tokens`` [B, H * W, C] back on x's layout, plus x (the residual)."""
    return image_view(tokens, x) + x


def onnx_form(folded: ref.Unet) -> None:
    """Swap, in the folded network ``folded``, the blocks that ONNX Runtime runs faster in
    another form (the same function, given ``onnx_time_rows``' time rows): the blocks' norms,
    every stage's linear attention, the middle's attention, and the downsamplings'
    pixel-unshuffle + 1x1 conv as one strided conv (the unshuffle traces to a Transpose that took
    2% of the default model's step)."""
    for block in [m for m in folded.modules() if isinstance(m, ref.ResnetBlock)]:
        block.block1, block.block2 = AffineBlock(block.block1), AffineBlock(block.block2)
    swap_stage_blocks(folded, TokenLinearAttention, TokenAttention)


def swap_stage_blocks(folded: nn.Module, stage_attention, mid_attention) -> None:
    """The walk both denoising-diffusion-pytorch versions' U-Nets share: each stage's attention
    becomes ``stage_attention(it)``, the middle's ``mid_attention(it)``, and each downsampling's
    pixel-unshuffle + 1x1 conv one strided conv (``unshuffle_conv``)."""
    for stage in (*folded.downs, *folded.ups):
        stage[2] = stage_attention(stage[2])
    folded.mid_attn = mid_attention(folded.mid_attn)
    for stage in folded.downs:
        if not isinstance(stage[3], nn.Conv2d):  # the last stage's is a plain conv
            stage[3] = unshuffle_conv(stage[3])


def unshuffle_conv(downsample: nn.Sequential) -> nn.Conv2d:
    """``Rearrange('b c (h p1) (w p2) -> b (c p1 p2) h w') + Conv2d(4c, o, 1)`` as the equivalent
    ``Conv2d(c, o, 2, stride=2)``: input channel c * 4 + p1 * 2 + p2 is tap (p1, p2) of c."""
    conv = downsample[1]
    out_channels, in4 = conv.weight.shape[:2]
    return conv_holding(conv.weight.reshape(out_channels, in4 // 4, 2, 2), conv.bias, stride=2)


def _resample(module: nn.Module) -> nn.Module:
    """The engine's version of a stage's last module (down- or upsampling, or a conv)."""
    if isinstance(module, nn.Sequential) and isinstance(module[1], nn.Conv2d):
        if isinstance(module[0], nn.Upsample):
            return Upsample(module[1])
        return unshuffle_conv(module)
    return module


class FastUnetV1(nn.Module):
    """``forward(x, time_row, x_self_cond=None)`` equals the reference's forward at the
    timestep whose row of the time table ``time_row`` is."""

    def __init__(self, folded: ref.Unet, slices: dict[str, tuple[int, int]], bias_in_norm: bool):
        super().__init__()
        self.self_condition = folded.self_condition

        def resnet(name: str) -> FastResnetBlock:
            block = folded.get_submodule(name)
            return FastResnetBlock(block, TimeSlice(*slices[name]), bias_in_norm)

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

    def forward(self, x, t, x_self_cond=None):
        if self.self_condition:
            if x_self_cond is None:
                x_self_cond = torch.zeros_like(x)
            x = torch.cat((x_self_cond, x), dim=1)
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


def build(folded: ref.Unet, slices: dict[str, tuple[int, int]], bias_in_norm: bool) -> nn.Module:
    """The engine's network of a folded 1.x Unet (see ddpm_fast.models, the engine side)."""
    return FastUnetV1(folded, slices, bias_in_norm)
