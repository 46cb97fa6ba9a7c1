"""What one engine step launches on a GPU, counted without one, and a roofline cost model of it.

``count_step`` runs the engine's fast network and its sampler update on the meta device (shapes
only, no arithmetic: any batch in a second) the way the CUDA path makes them: every kernel
launcher forced to its Triton kernel, each kernel replaced by a stand-in that records the launch
and the tensors it was given, and ``scaled_dot_product_attention`` one launch (CUDA's fused
kernels; on the meta device it would decompose). ATen ops are recorded through a dispatch mode
(all but views and allocations; a convolution with a bias is two launches, as cuDNN adds its
bias in a kernel of its own). Each launch gets the bytes it moves (its tensors' sizes, inputs
and outputs, each once: a lower bound) and its FLOPs (convolutions, matmuls and attention
exactly, anything else one per output element).

``predict`` sets a step on a GPU at the sum over its launches of max(bytes / bandwidth, FLOPs /
peak) plus a launch cost each (the gap between two kernels of a CUDA graph plus a small kernel's
ramp). The parameters are the GPU's: dense peaks from the data sheets, and the bandwidth a copy
reaches and the launch cost, which the GPU suite is to measure (``GPUS``: estimates until then).
``throughput_batch`` picks a run's batch from it (``batch_size="auto"`` on CUDA: the largest that
fits memory, but no larger than where the predicted throughput stops growing).
benchmarks/gpu_cost.py prints the table; tests/test_engine.py counts launches with it.
"""

from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .network import FastUnet, cast_convolutions

SKIPPED = ("detach", "alias")
GPU_SMS = 132  # an H100 SXM's and an H200's streaming multiprocessors
ALLOCATIONS = ("empty", "new_empty")  # no kernel: memory only


@dataclass
class Launch:
    name: str
    bytes: int
    flops: int


@dataclass
class StepLaunches:
    """The launches of one step, in order."""

    launches: list[Launch] = field(default_factory=list)

    def counts(self) -> collections.Counter:
        return collections.Counter(launch.name for launch in self.launches)

    @property
    def total(self) -> int:
        return len(self.launches)

    @property
    def bytes(self) -> int:
        return sum(launch.bytes for launch in self.launches)

    @property
    def flops(self) -> int:
        return sum(launch.flops for launch in self.launches)


def _tensors(values) -> list[torch.Tensor]:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(_tensors(value))
    return found


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _flops(name: str, args, out) -> int:
    outputs = _tensors([out])
    produced = sum(t.numel() for t in outputs)
    if name == "convolution":
        x, weight, transposed = args[0], args[1], args[6]
        if transposed:  # weight [I, O / groups, k, k]: each input value meets every tap
            return 2 * x.numel() * math.prod(weight.shape[1:])
        return 2 * produced * math.prod(weight.shape[1:])
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        a = args[1] if name in ("addmm", "baddbmm") else args[0]  # (bias,) a, b
        return 2 * produced * a.shape[-1]
    return produced


class _Recorder(TorchDispatchMode):
    def __init__(self, step: StepLaunches):
        super().__init__()
        self.step = step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name.startswith(ALLOCATIONS) or name in SKIPPED:
            return out
        moved = _nbytes(_tensors(args)) + _nbytes(_tensors([out]))
        self.step.launches.append(Launch(name, moved, _flops(name, args, out)))
        if name == "convolution" and args[2] is not None:
            y = _tensors([out])[0]
            self.step.launches.append(Launch("convolution bias", 2 * _nbytes([y]), y.numel()))
        return out


@contextlib.contextmanager
def _triton_stand_ins(step: StepLaunches, sms: int):
    """Every kernel launcher takes its Triton kernel, which records its launch and runs nothing,
    and plans its grid for a GPU of ``sms`` multiprocessors (whether a reduction is split in two
    launches depends on it)."""
    from ..kernels import channel_norm, group_norm, linear_attention, projection, sampler_step

    class Kernel:
        def __init__(self, name: str):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tensors = _tensors([*args, *kwargs.values()])
                largest = max((t.numel() for t in tensors), default=0)
                step.launches.append(Launch(f"triton {self.name}", _nbytes(tensors), 10 * largest))

            return launch

    def attention(q, k, v, *args, **kwargs):  # one fused (flash) kernel on CUDA
        # which writes its output tokens-major: [B, H * W, heads, d] in memory
        b, heads, n, _ = q.shape
        out = torch.empty(b, n, heads, v.shape[-1], dtype=q.dtype, device=q.device)
        out = out.transpose(1, 2)
        flops = 4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
        step.launches.append(Launch("scaled_dot_product_attention", _nbytes([q, k, v, out]), flops))
        return out

    saved = [(F, "scaled_dot_product_attention", F.scaled_dot_product_attention)]
    F.scaled_dot_product_attention = attention
    for module in (channel_norm, group_norm, linear_attention, projection, sampler_step):
        names = [n for n in dir(module) if n.startswith("_") and n.endswith("_kernel")]
        for name in ("use_triton", "sm_count", *names):
            saved.append((module, name, getattr(module, name, None)))
        module.use_triton = lambda backend, x, kernel: True
        module.sm_count = lambda device: sms
        for name in names:
            setattr(module, name, Kernel(name.strip("_")))
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def count_step(
    pipeline, batch: int, dtype: torch.dtype = torch.float32, sms: int = GPU_SMS
) -> StepLaunches:
    """The launches of one engine step of ``pipeline``'s network at ``batch`` in ``dtype`` as
    the CUDA path makes them on a GPU of ``sms`` multiprocessors (convolutions in ``dtype``,
    channels_last in half precision)."""
    network = gpu_network(pipeline, dtype)
    return count_network(network, (batch, *pipeline.image_shape()), dtype, sms)


def gpu_network(pipeline, dtype: torch.dtype) -> FastUnet:
    """``pipeline``'s fast network as the CUDA path prepares it, on the meta device (counted at
    any batch without being built again)."""
    network = FastUnet(pipeline.network, torch.arange(0, 1000, 100), fuse=True)
    cast_convolutions(network, dtype)
    if dtype != torch.float32:
        network = network.to(memory_format=torch.channels_last)
    return network.to("meta")


def count_network(
    network: FastUnet, shape: tuple[int, ...], dtype=torch.float32, sms: int = GPU_SMS
) -> StepLaunches:
    """The launches of one step of a prepared fast network (as ``PreparedChain`` holds it) on
    inputs of ``shape``: the network, then the sampler update."""
    from ..kernels import sampler_step

    channels_last = dtype != torch.float32
    network = network.to("meta")
    batch = shape[0]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.zeros(shape, device="meta")
    x0 = torch.zeros(shape, device="meta")
    step_index = torch.zeros(1, dtype=torch.int64, device="meta")
    coeffs = torch.zeros(1, sampler_step.NUM_COEFFICIENTS, device="meta")
    keys = torch.zeros(batch, dtype=torch.int64, device="meta")
    labels = {"class_labels": keys} if network.class_conditional else {}
    self_cond = x.to(dtype) if network.self_condition else None
    recorded = StepLaunches()
    # The chain state's copy of x in the network's dtype and layout, which the step kernel
    # writes (PreparedChain.new_state): no cast a step.
    x_in = torch.empty(shape, dtype=dtype, device="meta", memory_format=memory_format)
    converts = dtype != torch.float32 or channels_last
    with torch.no_grad(), _triton_stand_ins(recorded, sms), _Recorder(recorded):
        out = network(x_in if converts else x, step_index, self_cond, **labels)
        sampler_step.sampler_step(
            out, x, coeffs, step_index, keys, x0_prev=x0, out=(x, x0),
            also_out=x_in if converts else None,
        )  # fmt: skip
    return recorded


@dataclass(frozen=True)
class Gpu:
    """A GPU's roofline: bandwidth (bytes/s) and dense peaks (FLOP/s) per dtype, and the cost of
    one launch inside a CUDA graph (s)."""

    name: str
    bandwidth: float
    peak: dict
    launch_s: float


# Until the suite measures them: HBM bandwidth as a copy reaches it (nominal 3.35 / 4.8 TB/s),
# dense peaks from the data sheets (fp32 without TF32: the CUDA cores), 3 us a launch.
GPUS = {
    "H100": Gpu("H100 SXM", 3.0e12, {"fp32": 67e12, "bf16": 790e12, "fp16": 790e12}, 3e-6),
    "H200": Gpu("H200 SXM", 4.3e12, {"fp32": 67e12, "bf16": 790e12, "fp16": 790e12}, 3e-6),
}
# throughput_batch: the smallest batch within this share of the best predicted images per second.
THROUGHPUT_SHARE = 0.95
MATMULS = ("convolution", "mm", "addmm", "bmm", "baddbmm", "scaled_dot_product_attention")


@dataclass
class Prediction:
    step_s: float
    launch_s: float  # of which: launches
    memory_bound: int  # launches limited by bandwidth


def predict(step: StepLaunches, gpu: Gpu, dtype: str) -> Prediction:
    """The step's time on ``gpu``: each launch at its roofline time plus the launch cost."""
    total, memory_bound = 0.0, 0
    for launch in step.launches:
        matmul = launch.name in MATMULS
        peak = gpu.peak[dtype] if matmul else gpu.peak["fp32"]
        memory_s, compute_s = launch.bytes / gpu.bandwidth, launch.flops / peak
        memory_bound += memory_s >= compute_s
        total += max(memory_s, compute_s)
    launches = step.total * gpu.launch_s
    return Prediction(total + launches, launches, memory_bound)


def gpu_for(name: str) -> Gpu:
    """The cost model's parameters for a CUDA device of this name: an H200's, else an H100's (the
    estimate for any other GPU too, until the suite measures one)."""
    return GPUS["H200"] if "H200" in name else GPUS["H100"]


def throughput_batch(
    pipeline, fits: int, dtype: torch.dtype, gpu: Gpu, share: float = THROUGHPUT_SHARE
) -> int:
    """A run's batch by the cost model: at most ``fits`` (what the device's memory holds), and
    the smallest power of two (or ``fits``) whose predicted images per second on ``gpu`` are
    within ``share`` of the best of them: past that point a larger batch holds more memory and
    gains little (at batch 1 the launches dominate a step; from some batch on it grows with the
    batch)."""
    if fits < 1:
        raise ValueError(f"fits must be a positive batch, got {fits}")
    candidates = sorted({1 << k for k in range(fits.bit_length()) if 1 << k <= fits} | {fits})
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    network, shape = gpu_network(pipeline, dtype), pipeline.image_shape()
    rates = {}
    for batch in candidates:
        step = count_network(network, (batch, *shape), dtype)
        rates[batch] = batch / predict(step, gpu, precision).step_s
    best = max(rates.values())
    return next(batch for batch in candidates if rates[batch] >= share * best)
