"""The fast modules every family's engine mapping is built from (``engine/families/``).

- ``GroupNormAct``: GroupNorm (+ a pre-bias added first) + ``x * (1 + scale) + shift`` + SiLU in
  one launch of the group_norm kernel (PyTorch where it does not run);
- ``channel_layer_norm`` / ``linear_attention``: the kernels, re-exported;
- ``sdpa``: full attention of a [B, 3 * heads * d, H, W] qkv map through
  ``F.scaled_dot_product_attention`` (``sdpa_heads``: its output as SDPA gives it);
- ``projection``: the kernel, re-exported: a 1x1 conv with the channel norms, bias and residual
  around it in one launch;
- ``TimeSlice``: columns ``[start, start + width)`` of the engine's per-step time row;
  ``TimedNorm``: a ResBlock's second GroupNorm + SiLU fused with its time conditioning (scale and
  shift, or a pre-bias);
- ``Upsample``: nearest-neighbour x2 + conv; ``unshuffle_conv``: a pixel-unshuffle + 1x1 conv
  as one strided conv; ``resample``: the engine's form of a stage's last module;
- ``StagedUnet``, ``FastResnetBlock``, ``swap_stage_blocks``: what the two
  denoising-diffusion-pytorch mappings share (their U-Net is
  :class:`ddpm_fast.models.dd_pytorch_common.Unet`): the engine's U-Net walk, its ResnetBlock
  reading the time row, and the walk that swaps a folded network's attentions and downsamplings
  for another form;
- ``frozen``, ``token_view``, ``image_view``: what the families' ONNX Runtime forms
  (``onnx_form``) share: weights as frozen parameters, and a [B, C, H, W] map as [B, H * W, C]
  tokens and back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.channel_norm import channel_layer_norm
from ..kernels.group_norm import edge_bias_of, group_norm
from ..kernels.linear_attention import linear_attention
from ..kernels.projection import projection
from ..models.convs import conv_holding

__all__ = [
    "FastResnetBlock",
    "GroupNormAct",
    "StagedUnet",
    "TimeSlice",
    "TimedNorm",
    "Upsample",
    "channel_layer_norm",
    "frozen",
    "image_view",
    "linear_attention",
    "pointwise_conv",
    "projection",
    "resample",
    "sdpa",
    "sdpa_heads",
    "swap_stage_blocks",
    "take_conv_bias",
    "token_view",
    "unshuffle_conv",
]


class GroupNormAct(nn.Module):
    """``act(GroupNorm(x + pre_bias) * (1 + scale) + shift)`` from a reference ``nn.GroupNorm``;
    ``act`` "silu" or None. ``pre_bias`` [1, C] (a conv's bias moved here, or a per-step time
    bias passed at the call) is added before the statistics, as the kernel does."""

    def __init__(self, norm: nn.GroupNorm, act: str | None = "silu", pre_bias=None):
        super().__init__()
        self.groups = norm.num_groups
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias
        self.act = act
        self.pre_bias = None
        if pre_bias is not None:
            self.pre_bias = nn.Parameter(pre_bias.detach().reshape(1, -1).clone(), False)
        self.edge_bias = None

    def add_edge_bias(self, edge_bias: torch.Tensor) -> None:
        """Add to the kernel's edge bias ([C, 3, 3]: a conv bias moved through the 3x3 conv
        before this norm, see :func:`ddpm_fast.kernels.group_norm.group_norm`)."""
        if self.edge_bias is not None:
            edge_bias = self.edge_bias + edge_bias
        self.edge_bias = nn.Parameter(edge_bias.detach().float().contiguous(), False)

    def forward(self, x, scale=None, shift=None, pre_bias=None, **epilogue):
        """``epilogue``: the kernel's ``residual``, ``residual_bias``, ``out``, ``also_out``."""
        if pre_bias is None:
            pre_bias = self.pre_bias
        return group_norm(
            x, self.groups, self.weight, self.bias, pre_bias=pre_bias, edge_bias=self.edge_bias,
            scale=scale, shift=shift, eps=self.eps, act=self.act, **epilogue,
        )  # fmt: skip


def pointwise_conv(weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A linear map over channels (``weight`` [O, I], ``bias`` [O]) as a 1x1 conv."""
    return conv_holding(weight.detach()[:, :, None, None].contiguous(), bias.detach().contiguous())


class TimedNorm(nn.Module):
    """The second GroupNorm + SiLU of a ResBlock whose time conditioning ``cond`` (its columns
    of the time row) either scales and shifts the normalised map (``scale_shift``: cond is
    [scale, shift]) or is added before the norm. In that second form the family's
    ``time_tables`` has added the conv before's bias to the block's time table, so it is taken
    off the conv here; with scale-shift the bias becomes the kernel's pre-bias where
    ``fuse``."""

    def __init__(self, norm: nn.GroupNorm, conv_before: nn.Conv2d, scale_shift: bool,
                 fuse: bool):  # fmt: skip
        super().__init__()
        self.scale_shift = scale_shift
        pre_bias = None
        if not scale_shift:
            take_conv_bias(conv_before)
        elif fuse:
            pre_bias = take_conv_bias(conv_before)
        self.norm = GroupNormAct(norm, "silu", pre_bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.scale_shift:
            scale, shift = cond.chunk(2, dim=1)
            return self.norm(h, scale, shift)
        return self.norm(h, pre_bias=cond)


def take_conv_bias(conv: nn.Conv2d) -> nn.Parameter | None:
    """``conv``'s bias, removed from it (the next fused kernel adds it), as a parameter without
    grad: the module that keeps it moves it with its other weights."""
    bias = conv.bias
    if bias is None:
        return None
    conv.bias = None
    return nn.Parameter(bias.detach(), requires_grad=False)


def sdpa(qkv: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor:
    """Full attention of ``qkv`` [B, 3 * heads * d, H, W] (q, k, v blocks, each heads x d, head
    major) -> [B, heads * d, H, W]. ``scale`` None: SDPA's default, d ** -0.5."""
    b, _, h, w = qkv.shape
    return sdpa_heads(qkv, heads, scale).transpose(-1, -2).reshape(b, -1, h, w)


def sdpa_heads(qkv: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor:
    """:func:`sdpa` before its output is laid back on the image: [B, heads, H * W, d] (CUDA's
    fused kernels write it tokens-major, [B, H * W, heads, d] in memory)."""
    b, _, h, w = qkv.shape
    # [B, 3 * heads * d, H, W] -> 3 x [B, heads, H * W, d]. In NCHW the d axis is strided
    # (H * W apart), which sends SDPA to its math path: one copy makes each head's [H * W, d]
    # contiguous (channels_last already is).
    qkv = qkv.reshape(b, 3, heads, -1, h * w).transpose(-1, -2)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    q, k, v = qkv.unbind(1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class TimeSlice(nn.Module):
    """Columns ``[start, start + width)`` of the time row [1, D] (a view)."""

    def __init__(self, start: int, width: int):
        super().__init__()
        self.start, self.width = start, width

    def forward(self, time_row: torch.Tensor) -> torch.Tensor:
        return time_row[:, self.start : self.start + self.width]


class Upsample(nn.Module):
    """Nearest-neighbour x2, then ``conv``."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# Which taps of a 3-tap conv each tap of the 4-tap transposed conv sums, along one axis.
_UPSAMPLE_TAPS = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float64)


def upsample_transposed(conv: nn.Conv2d) -> nn.ConvTranspose2d:
    """Nearest x2 then ``conv`` (3x3, stride 1, padding 1) as one ``ConvTranspose2d(4, stride=2,
    padding=1)``: output pixel 2i + a sees input pixels i - 1 + a and i + a, with the 3x3 taps that
    land on each summed (along an axis: even outputs w0 on x[i-1] and w1 + w2 on x[i]; odd outputs
    w0 + w1 on x[i] and w2 on x[i+1]). One launch instead of two, and 16 products for every 4
    outputs instead of 36."""
    weight = conv.weight.detach().double()  # [O, I, 3, 3]
    taps = _UPSAMPLE_TAPS.to(weight.device)
    kernel = torch.einsum("ay,oiyx,bx->ioab", taps, weight, taps)  # [I, O, 4, 4]
    up = nn.ConvTranspose2d(
        conv.in_channels, conv.out_channels, 4, stride=2, padding=1, bias=conv.bias is not None
    )
    up.weight = nn.Parameter(kernel.to(conv.weight.dtype).contiguous(), requires_grad=False)
    if conv.bias is not None:
        up.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
    return up


def fits_transposed(conv: nn.Module) -> bool:
    """Whether ``conv`` is the 3x3, stride-1, padding-1 conv :func:`upsample_transposed` takes."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def unshuffle_conv(downsample: nn.Sequential) -> nn.Conv2d:
    """``Rearrange('b c (h p1) (w p2) -> b (c p1 p2) h w') + Conv2d(4c, o, 1)`` as the equivalent
    ``Conv2d(c, o, 2, stride=2)``: input channel c * 4 + p1 * 2 + p2 is tap (p1, p2) of c."""
    conv = downsample[1]
    out_channels, in4 = conv.weight.shape[:2]
    return conv_holding(conv.weight.reshape(out_channels, in4 // 4, 2, 2), conv.bias, stride=2)


def resample(module: nn.Module, fuse: bool = False) -> nn.Module:
    """The engine's version of a denoising-diffusion-pytorch stage's last module (its
    ``Upsample`` or ``Downsample``, or a plain conv at the innermost stage); ``fuse``: an
    upsampling as one transposed conv."""
    if isinstance(module, nn.Sequential) and isinstance(module[1], nn.Conv2d):
        if isinstance(module[0], nn.Upsample):
            if fuse and fits_transposed(module[1]):
                return upsample_transposed(module[1])
            return Upsample(module[1])
        return unshuffle_conv(module)
    return module


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


class FastResnetBlock(nn.Module):
    """A denoising-diffusion-pytorch ``ResnetBlock`` (either version) with its time MLP replaced
    by its slice of the time row (scale, then shift); ``fast_block`` makes the family's fast
    Block of each of its two Blocks, whose forward is ``(x, scale=None, shift=None,
    **epilogue)`` (the norm kernel's ``residual``, ``residual_bias``, ``out``, ``also_out``).

    ``fuse``: the residual sum (and the residual conv's bias) in the second Block's norm kernel,
    and the output written where the caller says (``out``, ``also_out``): no add of its own."""

    writes_out = True

    def __init__(self, block: nn.Module, time: TimeSlice, fast_block, fuse: bool = False):
        super().__init__()
        self.block1 = fast_block(block.block1)
        self.block2 = fast_block(block.block2)
        self.res_conv = block.res_conv
        self.time = time
        self.fuse = fuse
        self.in_channels = self.block1.proj.in_channels
        self.out_channels = self.block2.proj.out_channels
        self.res_bias = None
        if fuse and isinstance(self.res_conv, nn.Conv2d):
            self.res_bias = take_conv_bias(self.res_conv)

    def takes_input_bias(self) -> bool:
        """Whether :meth:`take_input_bias` can: the first Block's norm takes an edge bias after
        its 3x3 zero-padded conv, and the residual is the input itself or a 1x1 conv of it."""
        proj = self.block1.proj
        conv3 = (proj.kernel_size, proj.stride, proj.padding, proj.dilation, proj.groups)
        res = self.res_conv
        res_ok = isinstance(res, nn.Identity) or (
            isinstance(res, nn.Conv2d) and res.kernel_size == (1, 1) and res.groups == 1
        )
        edge_ok = getattr(self.block1, "takes_edge_bias", False)
        return self.fuse and edge_ok and conv3 == ((3, 3), (1, 1), (1, 1), (1, 1), 1) and res_ok

    def take_input_bias(self, bias_in: torch.Tensor) -> None:
        """The block's input carries the per-channel constant ``bias_in`` [in_channels] (a conv
        bias taken off its producer): the first conv's share goes into its norm as an edge bias,
        the residual's into ``res_bias``. The same sums; the producer's bias add is gone."""
        bias_in = bias_in.detach().double()
        self.block1.add_edge_bias(edge_bias_of(self.block1.proj.weight, bias_in))
        if isinstance(self.res_conv, nn.Conv2d):
            delta = self.res_conv.weight.detach().double()[:, :, 0, 0] @ bias_in
        else:
            delta = bias_in
        if self.res_bias is not None:
            delta = delta + self.res_bias.detach().double()
        self.res_bias = nn.Parameter(delta.float(), requires_grad=False)

    def forward(self, x, time_row, out=None, also_out=None):
        scale, shift = self.time(time_row).chunk(2, dim=1)  # views
        h = self.block1(x, scale, shift)
        if self.fuse:
            return self.block2(
                h, residual=self.res_conv(x), residual_bias=self.res_bias, out=out,
                also_out=also_out,
            )  # fmt: skip
        return write_to(self.block2(h) + self.res_conv(x), out, also_out)


def write_to(y: torch.Tensor, out: torch.Tensor | None, also_out: torch.Tensor | None):
    """``y`` copied into the outputs a caller gave (a module whose last op cannot write them)."""
    if also_out is not None:
        also_out.copy_(y)
    return y if out is None else out.copy_(y)


def call_writing(module: nn.Module, *args, out=None, also_out=None) -> torch.Tensor:
    """``module(*args)`` written into ``out`` / ``also_out``: by its last kernel where the
    module says it can (``writes_out``), else by a copy."""
    if getattr(module, "writes_out", False):
        return module(*args, out=out, also_out=also_out)
    return write_to(module(*args), out, also_out)


def _empty_like_layout(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An empty tensor of ``shape`` in x's dtype, device and memory format."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last and not x.is_contiguous() else None
    return torch.empty(
        shape, dtype=x.dtype, device=x.device,
        memory_format=memory_format or torch.contiguous_format,
    )  # fmt: skip


class StagedUnet(nn.Module):
    """The engine's form of a folded denoising-diffusion-pytorch U-Net (either version):
    ``forward(x, time_row, x_self_cond=None)`` equals the reference's forward at the timestep
    whose row of the time table ``time_row`` is.

    A family gives ``resnet(name)``, the fast ResnetBlock of the reference's block ``name``
    (reading its slice of the time row), and ``attention(module)`` / ``mid_attention(module)``,
    the fast form of a stage's and of the middle's attention, each with its residual.

    ``fuse`` (the kernels' form, where they run): each skip is written into its place in the
    concatenation the up path reads as it is made (``also_out`` of the kernel that makes it),
    and each up block's first ResnetBlock writes its output into the second's concatenation,
    so that the only concatenations left are of convolutions' outputs; upsamplings are one
    transposed conv each."""

    def __init__(self, folded: nn.Module, resnet, attention, mid_attention, fuse: bool = False):
        super().__init__()
        self.self_condition = folded.self_condition
        self.fuse = fuse

        def stage(name: str, modules: nn.ModuleList) -> nn.ModuleList:
            """[block1, block2, attention, resampling] of the stage ``name`` ("downs.0", ...)."""
            return nn.ModuleList(
                [
                    resnet(f"{name}.0"),
                    resnet(f"{name}.1"),
                    attention(modules[2]),
                    resample(modules[3], fuse),
                ]
            )

        self.init_conv = folded.init_conv
        self.downs = nn.ModuleList(stage(f"downs.{i}", m) for i, m in enumerate(folded.downs))
        self.mid_block1 = resnet("mid_block1")
        self.mid_attn = mid_attention(folded.mid_attn)
        self.mid_block2 = resnet("mid_block2")
        self.ups = nn.ModuleList(stage(f"ups.{i}", m) for i, m in enumerate(folded.ups))
        self.final_res_block = resnet("final_res_block")
        self.final_conv = folded.final_conv
        if fuse:
            self._forward_conv_biases()
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
        if self.fuse:
            return self._fused_forward(x, t)
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

    def _forward_conv_biases(self) -> None:
        """Each conv whose output only ResnetBlocks read (the first conv, the resamplings) hands
        its bias to those blocks (``take_input_bias``): no bias add of its own, as cuDNN's
        would be. Where one of its readers cannot take it, the conv keeps it."""
        final_offset = self.final_res_block.in_channels - self.init_conv.out_channels
        feeds = [(self.init_conv, [(self.downs[0][0], 0), (self.final_res_block, final_offset)])]
        for i, stage in enumerate(self.downs):
            reader = self.downs[i + 1][0] if i + 1 < len(self.downs) else self.mid_block1
            feeds.append((stage[3], [(reader, 0)]))
        for i, stage in enumerate(self.ups):
            reader = self.ups[i + 1][0] if i + 1 < len(self.ups) else self.final_res_block
            feeds.append((stage[3], [(reader, 0)]))
        for conv, readers in feeds:
            bias = getattr(conv, "bias", None)
            if bias is None or not all(block.takes_input_bias() for block, _ in readers):
                continue
            for block, offset in readers:
                bias_in = torch.zeros(block.in_channels, dtype=torch.float64)
                bias_in[offset : offset + bias.numel()] = bias.detach().double()
                block.take_input_bias(bias_in)
            conv.bias = None

    def _skip_readers(self) -> list[FastResnetBlock]:
        """The up path's ResnetBlocks in the order they read the skips (the reverse of the order
        the down path makes them)."""
        return [block for stage in self.ups for block in stage[:2]]

    def _fused_forward(self, x, t):
        readers = self._skip_readers()
        concatenations = []  # [x | skip] of each reader, in the order the skips are made

        def skip_slot(skip_channels: int) -> torch.Tensor:
            """Where the next skip goes: the last ``skip_channels`` of its reader's input."""
            reader = readers[len(readers) - 1 - len(concatenations)]
            b, _, h, w = x.shape
            buffer = _empty_like_layout(x, (b, reader.in_channels, h, w))
            concatenations.append(buffer)
            return buffer[:, reader.in_channels - skip_channels :]

        r = x
        for block1, block2, attn, downsample in self.downs:
            x = block1(x, t, also_out=skip_slot(block1.out_channels))
            slot = skip_slot(block2.out_channels)
            if isinstance(attn, nn.Identity):
                x = block2(x, t, also_out=slot)
            else:
                x = call_writing(attn, block2(x, t), also_out=slot)
            x = downsample(x)
        x = self.mid_block1(x, t)
        x = self.mid_attn(x)
        first = concatenations.pop()
        x = self.mid_block2(x, t, out=first[:, : x.shape[1]])
        for i, (block1, block2, attn, upsample) in enumerate(self.ups):
            if i:  # the upsampling conv's output: copied into its place
                first = concatenations.pop()
                first[:, : x.shape[1]].copy_(x)
            second = concatenations.pop()
            x = block1(first, t, out=second[:, : block1.out_channels])
            x = attn(block2(second, t))
            x = upsample(x)
        x = self.final_res_block(torch.cat((x, r), dim=1), t)
        return last_conv(self.final_conv, x)


def last_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The network's last conv, in fp32 on its input made fp32 (``keeps_fp32``): a 1x1 conv is one
    projection kernel (bias included, the half input read as it is) into an fp32 NCHW map."""
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        return conv(x.float())
    out = torch.empty(x.shape[0], conv.out_channels, *x.shape[2:], device=x.device)
    return projection(x, conv.weight, conv.bias, out=out)


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """A contiguous copy of ``tensor`` as a parameter without grad."""
    return nn.Parameter(tensor.detach().contiguous().clone(), requires_grad=False)


def token_view(x: torch.Tensor, channels: int) -> torch.Tensor:
    """x [B, C, H, W] as tokens [B, H * W, C] (``channels`` a Python int: traced graphs keep
    the norms' shapes constant)."""
    return x.reshape(x.shape[0], channels, -1).transpose(1, 2)


def image_view(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Tokens [B, H * W, C] back on the [B, C, H, W] layout of ``like``."""
    return tokens.transpose(1, 2).reshape(like.shape)
