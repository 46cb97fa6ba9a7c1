"""``Engine``: a Pipeline whose chains run on the fast path, with the same ``sample`` contract.

For each chain (sampler spec, device) it prepares once: a ``FastUnet`` (folded weights, the time
conditioning of every timestep the chain visits, fused modules) in the engine's dtype, and the
fused step's coefficient table on the device. Each denoising step is then the network plus one
``sampler_step`` kernel, reading the step index from a device tensor that the step itself
advances. On CUDA the step is captured as a CUDA graph per (batch, height, width) and replayed
for every step of the chain: no host sync, no host-side indexing inside the loop. Elsewhere the
same step runs eagerly on PyTorch, with the noise drawn by ``ddpm_fast.noise``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..export.philox import keyed_noise as keyed_noise_numpy
from ..flops import forward_flops
from ..generator_noise import GeneratorNoise
from ..kernels.sampler_step import draws_noise, sampler_step
from ..noise import keyed_noise, philox_keys
from ..options import check_int
from ..pipeline import Pipeline, resolve_device
from ..samplers import SamplerSpec, StepTables, rule
from .coefficients import coefficient_table
from .cpu_conv import use_cpu_convolutions
from .graph import CapturedStep, new_graph_pool
from .guided_step import StepGuidance, step_guidance
from .network import FastUnet, cast_convolutions
from .onnx_executor import ExecutorSessions, OrtChain, check_executor, resolve_executor
from .step_cost import gpu_for, throughput_batch
from .threads import (
    MAX_THREADS,
    ThreadGovernor,
    ThreadPlan,
    plan_threads,
    run_planned,
    torch_threads,
)

# Prepared chains an engine keeps (each a folded network copy with its time tables and graphs).
MAX_CHAINS = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# An ONNX file is one protobuf (2 GB at most); the executor file holds the weights inside it.
MAX_EXECUTOR_WEIGHT_BYTES = 2**31 - 2**27


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


@dataclass
class ChainState:
    """The device buffers one step reads and writes: the chain's state x and the clipped x0
    (fp32: the self-conditioning input and the multistep solvers' x0_prev of the next step),
    the step index, the noise keys, a class-conditional network's labels, and the step's noise
    where it is given, not drawn by the kernel (``noise="torch-generator"``)."""

    x: torch.Tensor
    x0: torch.Tensor
    step: torch.Tensor
    keys: torch.Tensor
    labels: torch.Tensor
    z: torch.Tensor
    x_in: torch.Tensor | None = None  # x in the network's dtype and layout, where they differ

    @classmethod
    def empty(cls, shape: tuple[int, ...], device: torch.device) -> ChainState:
        return cls(
            x=torch.zeros(shape, device=device),
            x0=torch.zeros(shape, device=device),
            step=torch.zeros(1, dtype=torch.int64, device=device),
            keys=torch.zeros(shape[0], dtype=torch.int64, device=device),
            labels=torch.zeros(shape[0], dtype=torch.int64, device=device),
            z=torch.zeros(shape, device=device),
        )

    def reset(
        self, x_t: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor | None = None
    ) -> None:
        self.x.copy_(x_t)
        if self.x_in is not None:
            self.x_in.copy_(x_t)
        self.x0.zero_()
        self.step.zero_()
        self.keys.copy_(keys)
        self.z.zero_()
        if labels is not None:
            self.labels.copy_(labels)


class PreparedChain:
    """The fast network and coefficient table of one chain on one device."""

    def __init__(self, engine: Engine, tables: StepTables, spec: SamplerSpec, device):
        self.device = device
        self.dtype = engine.dtype
        self.steps = len(tables)
        self.learned = tables.learned
        self.noise_on = [tables.adds_noise(k) for k in range(self.steps)]
        network = FastUnet(engine.network, tables.timesteps.to(device))
        cast_convolutions(network, self.dtype)
        if device.type == "cpu" and not engine.compile:
            use_cpu_convolutions(network)
        self.channels_last = engine.channels_last_on(device)
        if self.channels_last:
            network = network.to(memory_format=torch.channels_last)
        self.network = network.to(device)
        if engine.compile:
            # inductor fuses the glue between the kernels, each one custom op of its graph
            # (torch.ops.ddpm_fast.*); the engine's CUDA graph captures the compiled step.
            self.network = torch.compile(self.network, fullgraph=True, dynamic=False)
        table = coefficient_table(tables, spec, engine.diffusion.objective)
        self.coeffs = table.to(device)
        self.graphs: dict[tuple[int, ...], CapturedStep | None] = {}
        self._invariant: dict[tuple, bool] = {}
        self.thread_plans: dict[tuple[int, ...], ThreadPlan] = {}
        self.governors: dict[tuple[int, ...], ThreadGovernor] = {}  # kept: what they learnt

    @torch.no_grad()
    def thread_invariant(self, shape: tuple[int, ...], threads: int) -> bool:
        """Whether the network gives the same bits for this input shape on ``threads`` threads
        as on one (oneDNN and PyTorch pick some algorithms by thread count), checked once with a
        random input: the algorithms depend on the shapes, not on the values."""
        key = (shape, threads)
        if key not in self._invariant:
            generator = torch.Generator().manual_seed(0)
            x = self.network_input(torch.randn(shape, generator=generator).to(self.device))
            step = torch.zeros(1, dtype=torch.int64, device=self.device)
            x_self_cond = torch.zeros_like(x) if self.network.self_condition else None
            labels = self.labels_input(torch.zeros(shape[0], dtype=torch.int64, device=self.device))
            outputs = []
            for count in (threads, 1):
                with torch_threads(count):
                    outputs.append(self.network(x, step, x_self_cond, **labels))
            self._invariant[key] = torch.equal(*outputs)
        return self._invariant[key]

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.to(self.dtype, memory_format=memory_format)

    def labels_input(self, labels: torch.Tensor) -> dict:
        """The network's class-label argument: {} for an unconditional network."""
        return {"class_labels": labels} if self.network.class_conditional else {}

    def step(
        self, state: ChainState, z: torch.Tensor | None = None,
        guidance: StepGuidance | None = None,
    ) -> None:  # fmt: skip
        """One denoising step on ``state``, in place; ``z`` is the noise where the kernel does
        not draw it (the PyTorch path); ``guidance`` moves the step by a classifier's gradient
        at its input."""
        g = None if guidance is None else guidance.gradient(state.x, state.step)
        self_cond = self.network_input(state.x0) if self.network.self_condition else None
        labels = self.labels_input(state.labels)
        x_in = self.network_input(state.x) if state.x_in is None else state.x_in
        out = self.network(x_in, state.step, self_cond, **labels)
        sampler_step(
            out, state.x, self.coeffs, state.step, state.keys, x0_prev=state.x0, z=z,
            learned=self.learned, out=(state.x, state.x0), also_out=state.x_in,
        )  # fmt: skip
        if guidance is not None:  # after the noise: the same sum, in another order
            state.x.copy_(rule.add_guidance(state.x, guidance.guide(out, state.step), g))
            if state.x_in is not None:
                state.x_in.copy_(state.x)
        state.step.add_(1)

    def new_state(self, shape: tuple[int, ...]) -> ChainState:
        """A chain state on this chain's device; where the step kernel runs (the GPU path) and
        the network takes x in another dtype or layout, with the buffer the kernel writes it to
        for the next step (``x_in``: no cast of its own a step)."""
        state = ChainState.empty(shape, self.device)
        probe = torch.empty(0, device=self.device)
        converts = self.dtype != torch.float32 or self.channels_last
        if converts and draws_noise(probe):
            state.x_in = self.network_input(state.x).clone()
        return state

    def run_eager(
        self, x, keys, seed: int, indices: range, on_step, labels=None, noise=None,
        guidance=None,
    ) -> torch.Tensor:  # fmt: skip
        """The chain from x_T = ``x``, step by step without a graph; ``noise``: the steps' noise
        (``of_step(k)``) where it is not the Philox stream; ``guidance``: a classifier's."""
        state = self.new_state(tuple(x.shape))
        state.reset(x, keys, labels)
        # The kernel draws the Philox z itself; the PyTorch path, and any other noise, is given.
        kernel_draws = noise is None and draws_noise(x)
        z = None if kernel_draws else torch.zeros_like(x)
        for k in range(self.steps):
            if noise is not None and self.noise_on[k]:
                z = noise.of_step(k)
            elif not kernel_draws and self.noise_on[k]:
                z = keyed_noise(seed, indices, k + 1, tuple(x.shape[1:]), device=x.device)
            self.step(state, z, guidance)
            on_step(k + 1)
        return state.x


class Engine(Pipeline):
    """A pipeline on the fast path: ``Engine(pipeline, dtype="fp32", cuda_graph=None)``.

    ``dtype``: "fp32" (the default: matches the reference within fp32's tolerance; TF32 is off),
    "bf16" or "fp16" (convolutions and matmuls in half precision, norm statistics and the
    chain's state in fp32). ``cuda_graph``: capture each step as a CUDA graph (default: on CUDA
    devices); a failed capture falls back to eager with one warning. ``channels_last``: the
    network's memory format (default: on the CPU, and on CUDA in half precision).
    ``cpu_executor``: what runs fp32 chains on the CPU: "onnxruntime" (the step exported once,
    see ``engine.onnx_executor``), "torch" (the engine's own PyTorch step) or "auto" (the
    first where onnx and onnxruntime are installed); default: $DDPM_FAST_CPU_EXECUTOR, else auto.
    ``compile``: the fast network through ``torch.compile`` (inductor, the kernels as custom
    ops it sees; inside the engine's CUDA graph), for the engine's PyTorch step (CUDA, or the CPU
    with ``cpu_executor="torch"``); off by default: each new chain and batch shape compiles first
    (the tiny test U-Net on a 2-core CPU: about 50 s cold, 7 s from inductor's cache).
    ``sample``/``sample_batches`` take the reference Pipeline's arguments and give the same images
    for the same seed, within the dtype's tolerance.
    """

    backend = "engine"

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        dtype: str | torch.dtype = "fp32",
        cuda_graph: bool | None = None,
        channels_last: bool | None = None,
        threads: int | None = None,
        cpu_executor: str | None = None,
        compile: bool = False,
    ):
        super().__init__(
            pipeline.network, pipeline.diffusion, source=pipeline.source, notes=pipeline.notes
        )
        self.dtype = resolve_dtype(dtype)
        self.precision = next(name for name, d in DTYPES.items() if d == self.dtype)
        self.cuda_graph = cuda_graph
        self.channels_last = channels_last
        if threads is not None:
            threads = check_int("threads", threads, minimum=1, maximum=MAX_THREADS)
        self.threads = threads
        self.cpu_executor = check_executor(cpu_executor)
        if not isinstance(compile, bool):
            raise ConfigError(f"compile must be True or False, got {compile!r}")
        self.compile = compile
        if self.cpu_executor == "onnxruntime":
            self.executor()  # a ConfigError now, not at the first chain, where it cannot run
        self._flops_per_sample: dict[tuple[int, ...], int] = {}
        self._chains: dict[tuple, PreparedChain | OrtChain] = {}
        self._executor_sessions: ExecutorSessions | None = None
        self._graph_pool = None
        self._warned = False

    def channels_last_on(self, device: torch.device) -> bool:
        if self.channels_last is not None:
            return self.channels_last
        # CPU: oneDNN's convolutions and the norms' PyTorch paths run NHWC without copies.
        return device.type == "cpu" or self.dtype != torch.float32

    def _uses_graphs(self, device: torch.device) -> bool:
        if device.type != "cuda":
            if self.cuda_graph:
                raise ConfigError(f"cuda_graph=True needs a CUDA device, not {device}")
            return False
        return self.cuda_graph is not False

    def auto_batch_size(self, num: int, device: torch.device | str | None = None) -> int:
        """As the pipeline's (the largest batch the device's free memory holds), and on CUDA no
        larger than where the cost model's predicted images per second stop growing
        (:func:`ddpm_fast.engine.step_cost.throughput_batch`, within 5% of its best)."""
        fits = super().auto_batch_size(num, device)
        device = resolve_device(device, self.device)
        if device.type != "cuda" or fits <= 1:
            return fits
        gpu = gpu_for(torch.cuda.get_device_name(device))
        return throughput_batch(self, fits, self.dtype, gpu)

    def prepare(
        self, tables: StepTables, spec: SamplerSpec, device, torch_step: bool = False
    ) -> PreparedChain:
        """The prepared chain for ``spec`` on ``device``: built on first use, then cached. Each
        holds a folded copy of the network (and its graphs), so only the most recently used
        MAX_CHAINS are kept. ``torch_step``: the engine's own PyTorch step, not ONNX Runtime's
        (guided chains: ONNX Runtime cannot differentiate the classifier)."""
        device = torch.device(device)
        on_ort = device.type == "cpu" and not torch_step and self.executor()[0] == "onnxruntime"
        key = (spec, str(device), on_ort)
        chain = self._chains.pop(key, None)
        if chain is None and on_ort:
            chain = OrtChain(self, tables, spec)
        chain = chain or PreparedChain(self, tables, spec, device)
        self._chains[key] = chain  # most recent last
        while len(self._chains) > MAX_CHAINS:
            self._chains.pop(next(iter(self._chains)))
        return chain

    def ort_chain(self, spec: SamplerSpec) -> OrtChain | None:
        """The chain of ``spec`` that ran on ONNX Runtime on the CPU, if one did (the CLI's warm
        start records its tables)."""
        chain = self._chains.get((spec, "cpu", True))
        return chain if isinstance(chain, OrtChain) else None

    def executor_sessions(self) -> ExecutorSessions:
        """The ONNX Runtime sessions that every CPU chain of this engine shares."""
        if self._executor_sessions is None:
            self._executor_sessions = ExecutorSessions(self)
        return self._executor_sessions

    def executor(self) -> tuple[str, str]:
        """What runs this engine's chains on the CPU ("onnxruntime" or "torch"), and why."""
        if self.num_classes is not None:  # the executor file takes no labels (yet)
            if self.cpu_executor == "onnxruntime":
                raise ConfigError(
                    "cpu_executor 'onnxruntime' does not run class-conditional models; use "
                    "'torch' or 'auto'"
                )
            return "torch", "class-conditional models run on PyTorch on the CPU"
        if 4 * self.num_parameters() > MAX_EXECUTOR_WEIGHT_BYTES:
            if self.cpu_executor == "onnxruntime":
                raise ConfigError(
                    "cpu_executor 'onnxruntime': this network's fp32 weights exceed the 2 GB of "
                    "one ONNX file; use 'torch' or 'auto'"
                )
            return "torch", "its fp32 weights exceed the 2 GB of one ONNX file"
        return resolve_executor(self.cpu_executor, self.dtype)

    def _guidance(self, classifier, scale, tables, labels):
        """The engine's guidance of a chain: device tables that the step indexes by its step
        tensor (``engine.guided_step``), None unguided."""
        if classifier is None:
            return None
        t_scale = self.classifier_timestep_scale()
        return step_guidance(
            classifier, scale, tables, t_scale, labels, labels.device, self.config.channels
        )

    def _initial_noise(
        self, seed: int, indices: range, shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        """x_T, as ``Pipeline``'s; drawn with NumPy where ONNX Runtime runs the chain, as its
        steps' noise is (``table_chain``): the same numbers to within an ulp, and the same bits
        as the CLI's warm start, which draws without torch."""
        if torch.device(device).type == "cpu" and self.executor()[0] == "onnxruntime":
            return torch.from_numpy(keyed_noise_numpy(seed, indices, 0, shape))
        return super()._initial_noise(seed, indices, shape, device)

    def _run_chain(
        self,
        x: torch.Tensor,
        tables: StepTables,
        spec: SamplerSpec,
        *,
        seed: int,
        indices: range,
        on_step: Callable[[int], None],
        class_labels: torch.Tensor | None = None,
        noise: GeneratorNoise | None = None,
        guidance=None,
    ) -> torch.Tensor:
        chain = self.prepare(tables, spec, x.device, torch_step=guidance is not None)
        keys = philox_keys(seed, indices, device=x.device)
        labels = class_labels
        run = (seed, indices, on_step, labels, noise, guidance)
        with _exact_fp32(self.dtype, x.device):
            if not self._uses_graphs(x.device):  # raises for cuda_graph=True off CUDA
                if x.device.type == "cpu":
                    return self._run_on_cpu(chain, x, keys, *run)
                return chain.run_eager(x, keys, *run)
            captured = self._captured(chain, tuple(x.shape), noise is not None, guidance)
            if captured is None:
                return chain.run_eager(x, keys, *run)
            state = captured.state
            state.reset(x, keys, labels if guidance is None else guidance.labels)
            for k in range(chain.steps):
                if noise is not None and chain.noise_on[k]:
                    # Drawn on the device before the replay that reads it: no host sync.
                    state.z.copy_(noise.of_step(k), non_blocking=True)
                captured.replay()
                on_step(k + 1)
            return state.x.clone()

    def thread_plan(self, shape: tuple[int, ...], chain: PreparedChain | None = None) -> ThreadPlan:
        """How a CPU chain of the batch ``shape`` [B, C, H, W] uses the cores (see
        ``engine.threads``). Without a prepared ``chain`` (``info``), whether the network keeps
        its bits on one thread is not known yet, unless a chain prepared earlier ran this shape:
        then its plan is the answer."""
        if chain is None:
            for prepared in reversed(self._chains.values()):
                if tuple(shape) in prepared.thread_plans:
                    return prepared.thread_plans[tuple(shape)]
        # ONNX Runtime releases the interpreter lock for the whole step: any batch splits, and
        # the network's size (a counted forward: seconds, cold) is not needed.
        on_ort = self.executor()[0] == "onnxruntime"
        sample = tuple(shape[1:])
        if sample not in self._flops_per_sample and not on_ort:
            self._flops_per_sample[sample] = forward_flops(self.network, sample)
        return plan_threads(
            batch=shape[0],
            flops_per_sample=self._flops_per_sample.get(sample),
            threads=self.threads,
            thread_invariant=None if chain is None else lambda n: chain.thread_invariant(shape, n),
            split_min_flops=0 if on_ort else None,
        )

    def _run_on_cpu(
        self, chain, x, keys, seed, indices, on_step, labels=None, noise=None, guidance=None
    ) -> torch.Tensor:
        """The eager chain on the CPU, under the thread plan for this batch (``run_planned``).
        The chains read their thread count from PyTorch's, which the plan sets. The parts of a
        split batch read their rows of a given ``noise`` and ``guidance``."""
        plan = self._cpu_plan(chain, tuple(x.shape))
        if noise is not None:
            noise.split(max(plan.workers, 1))

        def run(rows: slice, threads, rows_on_step) -> torch.Tensor:
            part = range(indices.start + rows.start, indices.start + rows.stop)
            part_labels = None if labels is None else labels[rows]
            part_noise = None if noise is None else noise.rows(rows)
            part_guidance = None if guidance is None else guidance.rows(rows)
            return chain.run_eager(
                x[rows], keys[rows], seed, part, rows_on_step, part_labels, part_noise,
                part_guidance,
            )  # fmt: skip

        with torch_threads(plan.threads):
            return run_planned(plan, run, tuple(x.shape), on_step, chain.governors)

    def _cpu_plan(self, chain: PreparedChain, shape: tuple[int, ...]) -> ThreadPlan:
        if shape not in chain.thread_plans:
            chain.thread_plans[shape] = self.thread_plan(shape, chain)
        return chain.thread_plans[shape]

    def _captured(
        self, chain: PreparedChain, shape: tuple[int, ...], given_noise: bool = False,
        guidance: StepGuidance | None = None,
    ) -> CapturedStep | None:  # fmt: skip
        """The chain's step captured for this batch shape, or None where capture failed; with
        ``given_noise`` the step reads its noise from the state's z (which the chain fills
        before each replay), else the kernel draws the Philox noise; with ``guidance`` the
        classifier's forward and backward are in the graph (its labels the state's)."""
        key = (*shape, given_noise, None if guidance is None else guidance.key)
        if key not in chain.graphs:
            if self._graph_pool is None:
                self._graph_pool = new_graph_pool()
            state = chain.new_state(shape)
            z = state.z if given_noise else None
            guided = None if guidance is None else guidance.with_labels(state.labels)
            try:
                chain.graphs[key] = CapturedStep(
                    lambda: chain.step(state, z, guided), state, self._graph_pool
                )
            except Exception as error:  # any capture failure: eager still gives the same images
                chain.graphs[key] = None
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"CUDA graph capture failed ({type(error).__name__}: {error}); "
                        "ddpm-fast runs the engine eagerly instead",
                        RuntimeWarning,
                        stacklevel=4,
                    )
        return chain.graphs[key]


def _exact_fp32(dtype: torch.dtype, device: torch.device):
    """fp32 means fp32: cuDNN's TF32 convolutions (on by default) are switched off."""
    if dtype == torch.float32 and device.type == "cuda":
        return torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled,
            benchmark=torch.backends.cudnn.benchmark,
            deterministic=torch.backends.cudnn.deterministic,
            allow_tf32=False,
        )
    return contextlib.nullcontext()
