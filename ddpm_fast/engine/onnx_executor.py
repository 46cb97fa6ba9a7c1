"""ONNX Runtime as the engine's executor on the CPU.

On the CPU the engine's own PyTorch step pays Python and dispatch costs on each of its few hundred
ops per step; ONNX Runtime runs the same step, network and update rule, as one graph, and was
measured faster than it (benchmarks/results/cpu-executor-*). So where onnxruntime is installed,
an fp32 chain on the CPU runs there (``cpu_executor="auto"``). The engine still owns the rest: its
thread plan (one session per thread count; the batch split runs one-thread sessions side by side),
its noise (the Philox stream of every path, drawn with NumPy: ``table_chain``, which also runs the
loop) and the chain's tables.

What runs is the engine's *executor file* (never to be confused with the deployment step file of
``ddpm-fast export --what step``): ``export.graph.StepUpdate``, the folded network and
``samplers.rule``'s update, with the step's time row (every block's time projection, a row of the
chain's table, so the time MLPs stay out of the graph) and coefficient row as inputs, so one file
serves every chain (sampler, steps, eta) of a model at one image size. Where the family's engine
mapping has an ``onnx_form`` (1.x and 2.x), its blocks are swapped for forms ONNX Runtime runs
faster, the same function: attention on the token view, norms as fused ops or convs. Beside the
file the export writes its Winograd form, which sessions of larger batches open (``winograd``).

The file is exported once and kept in the cache folder under a key of everything it depends on
(the weights' hash, the config, the image size, the inputs it takes, the ddpm-fast, torch and
onnx versions, and a digest of ddpm-fast's source): a changed model, a new version or an edited
checkout gets a new file, never a stale one. It is written to a temporary name and renamed into
place, so a crash leaves no half-written file; a file that does not load is exported again.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..export.format import OnnxFileError
from ..files import temporary_name
from ..folding import fold_weights, time_conditioning
from ..machine import StaleEntry, cache_dir, mark_used, prune_cache, writable_folder
from ..models import family_of
from ..options import CPU_EXECUTORS, EXECUTOR_ENV
from ..samplers import ROW, SamplerSpec, StepTables
from ..version import __version__, source_digest
from . import winograd
from .coefficients import coefficient_table
from .families import mapping
from .table_chain import (
    SEAL_SUFFIX,
    ChainTables,
    TableChain,
    executor_session,
    input_names,
    read_seal,
    seal_path,
    write_seal,
)

log = logging.getLogger("ddpm_fast.engine")

OPSET = 17
MAX_SESSIONS = 6  # per engine: each holds its own packed copy of the weights
EXECUTOR_FOLDER = "executor-files"
# Executor files kept in the cache, the most recently used: a new version or an edited checkout
# exports new ones (the CIFAR-10 U-Net's is 134 MB), so old ones must go.
MAX_EXECUTOR_FILES = 8
# and no more bytes than this, Winograd forms counted: a CIFAR-10 U-Net's pair is 347 MB, and
# a larger model's would fill the disk at 8 files. The most recent file is always kept.
MAX_EXECUTOR_BYTES = 2 << 30
FILE_FORMAT = "executor-file-4"  # bump when the graph's inputs or outputs change
INSTALL_HINT = "pip install 'ddpm-fast[onnx]'"


def check_executor(executor: str | None) -> str:
    """``executor``, or where None the environment's DDPM_FAST_CPU_EXECUTOR, else "auto"."""
    where = "cpu_executor"
    if executor is None:
        executor, where = os.environ.get(EXECUTOR_ENV) or "auto", EXECUTOR_ENV
    if executor not in CPU_EXECUTORS:
        raise ConfigError(f"{where} must be one of {', '.join(CPU_EXECUTORS)}, got {executor!r}")
    return executor


def missing_packages() -> list[str]:
    """The packages the executor needs that are not installed."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


def resolve_executor(requested: str, dtype: torch.dtype) -> tuple[str, str]:
    """Which executor runs a CPU chain ("onnxruntime" or "torch"), and why."""
    if requested == "torch":
        return "torch", "cpu_executor='torch'"
    missing = missing_packages()
    if requested == "onnxruntime":
        if dtype != torch.float32:
            raise ConfigError("cpu_executor 'onnxruntime' runs fp32 chains only")
        if missing:
            raise ConfigError(
                f"cpu_executor 'onnxruntime' needs {' and '.join(missing)}: {INSTALL_HINT}"
            )
        return "onnxruntime", "cpu_executor='onnxruntime'"
    if dtype != torch.float32:
        return "torch", "bf16/fp16 run on PyTorch"
    if missing:
        return "torch", f"{' and '.join(missing)} not installed ({INSTALL_HINT})"
    return "onnxruntime", "onnxruntime installed: faster on the CPU than the PyTorch path"


class _TableStep(nn.Module):
    """The exported graph: ``StepUpdate.update``, fed the step's time row (every block's time
    projection, a row of the chain's table) and coefficient row, so the time MLPs stay out of
    the graph."""

    def __init__(self, update: nn.Module):
        super().__init__()
        self.step = update

    def forward(self, x_t, time_row, coef_row, adds_noise, noise, *history):
        return self.step.update(x_t, time_row, coef_row, adds_noise, noise, *history)


def file_key(pipeline, image_hw: tuple[int, int], learned: bool, carries_x0_prev: bool) -> str:
    """The cache key of an executor file: everything the graph depends on."""
    import onnx

    identity = pipeline.identity()
    parts = {
        "format": FILE_FORMAT,
        "weights_sha256": identity["weights_sha256"],
        "family": identity["family"],
        "network": identity["network"],
        "image_hw": list(image_hw),
        "learned": learned,
        "carries_x0_prev": carries_x0_prev,
        "row": list(ROW),  # the coefficient row the graph reads (a new column: a new file)
        "versions": [__version__, torch.__version__, onnx.__version__, OPSET],
        "source": source_digest(),  # a changed module of a checkout or a patched install
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def onnx_network(pipeline) -> nn.Module:
    """The folded float32 network of ``pipeline`` with the blocks that its family's engine
    mapping has a faster form for on ONNX Runtime swapped in (``onnx_form``; the same
    function, checked against the reference by the chain tests)."""
    network = fold_weights(pipeline.network).to("cpu", torch.float32)
    fast = mapping(family_of(network).FAMILY)
    if hasattr(fast, "onnx_form"):
        fast.onnx_form(network)
    return network


def export_executor_file(
    pipeline, spec: SamplerSpec, learned: bool, image_hw: tuple[int, int], path: Path, key: str
) -> None:
    """Write the step graph for images of ``image_hw`` to ``path`` (atomically), its Winograd form
    beside it, and last their seal for ``key`` (``table_chain.write_seal``)."""
    from ..export.graph import StepUpdate, trace_to_onnx

    update = StepUpdate(pipeline, spec, learned, network=onnx_network(pipeline)).eval()
    generator = torch.Generator().manual_seed(0)
    shape = (2, pipeline.config.channels, *image_hw)
    width = max((end for _, end in update.time_slices.values()), default=0)
    inputs = [
        torch.randn(shape, generator=generator),
        torch.randn(1, width, generator=generator),
        torch.rand(len(ROW), generator=generator),
        torch.ones(1, dtype=torch.bool),
        torch.randn(shape, generator=generator),
    ]
    names = input_names(spec.carries_x0_prev, pipeline.config.self_condition)
    inputs += [torch.rand(shape, generator=generator) * 2 - 1 for _ in names[len(inputs) :]]
    rows = ("time_row", "coef_row", "adds_noise")
    batched = [n for n in (*names, "x_prev", "x0") if n not in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    seal_path(path).unlink(missing_ok=True)  # unsealed while its files change
    tmp = temporary_name(path)
    try:
        outputs = ["x_prev", "x0"]
        trace_to_onnx(_TableStep(update), tuple(inputs), tmp, names, outputs, batched, OPSET)
        winograd.write_variant(tmp, winograd.variant_path(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_seal(path, key, image_hw, names)


class ExecutorSessions:
    """An engine's executor files and their ONNX Runtime sessions, shared by all its chains: a
    chain of another sampler or length reads the same file (its time and coefficient rows are
    inputs), so it opens no session of its own (seconds for a large model) and holds no second
    packed copy of the weights. A session is keyed by its file, thread count and batch size; the
    ``MAX_SESSIONS`` most recently used are kept. A file in the cache is used only where its seal
    names its key and its bytes are the sealed ones (``table_chain.executor_session``); any other
    is exported again, with one warning line."""

    def __init__(self, engine):
        self._engine = engine
        self._paths: dict[tuple, Path] = {}
        self._keys: dict[Path, str] = {}  # each file's cache key, which its seal must name
        self._sessions: OrderedDict[tuple, object] = OrderedDict()  # least recently used first
        self.invariant: dict[tuple, dict] = {}  # TableChain.thread_invariant's, per file
        self._lock = threading.RLock()  # path() inside session(): both take it

    def path(self, spec: SamplerSpec, learned: bool, image_hw: tuple[int, int]) -> Path:
        """The executor file for chains like ``spec`` on images of ``image_hw``, exported if the
        cache has none, or none sealed for its key."""
        key = (image_hw, learned, spec.carries_x0_prev)
        with self._lock:
            if key not in self._paths:
                self._paths[key] = self._export_or_find(spec, learned, image_hw)
            return self._paths[key]

    def key(self, path: Path) -> str:
        """The cache key that the executor file ``path`` (one of ``path``'s) is sealed for."""
        return self._keys[path]

    def _export_or_find(self, spec: SamplerSpec, learned: bool, image_hw: tuple[int, int]) -> Path:
        key = file_key(self._engine, image_hw, learned, spec.carries_x0_prev)
        path = cache_dir() / EXECUTOR_FOLDER / f"executor-{key}.onnx"
        try:
            read_seal(path, key)  # the bytes are checked where a session reads them
        except StaleEntry as why:
            if path.exists() or seal_path(path).exists():
                log.warning("%s; exporting it again", why)
                path = self._export(spec, learned, image_hw, path, key)
            else:
                path = self._export(spec, learned, image_hw, path, key, say=True)
        else:
            mark_used(path)
        self._keys[path] = key
        return path

    def _export(
        self, spec, learned: bool, image_hw: tuple[int, int], path: Path, key: str, say=False
    ) -> Path:
        """Export the file of ``key`` to ``path``, or where the cache cannot be written into a
        folder of this process (one warning line); the path written."""
        error = writable_folder(path.parent)
        if error is None:
            if say:
                log.info(
                    "exporting the engine's CPU executor file to %s (once per model and size)", path
                )
            try:
                export_executor_file(self._engine, spec, learned, image_hw, path, key)
                prune_cache(
                    path.parent,
                    "executor-*.onnx",
                    MAX_EXECUTOR_FILES,
                    (winograd.SUFFIX, SEAL_SUFFIX),
                    MAX_EXECUTOR_BYTES,
                )
                return path
            except OSError as failed:  # a disk that fills, a folder made read-only meanwhile
                error = failed
        private = _private_folder() / path.name
        log.warning(
            "cannot write the engine's executor file into %s (%s); exporting it for this "
            "process into %s (set DDPM_FAST_CACHE_DIR to keep it)",
            cache_dir(),
            error.strerror or error,
            private.parent,
        )
        export_executor_file(self._engine, spec, learned, image_hw, private, key)
        return private

    def session(self, spec: SamplerSpec, learned: bool, shape: tuple[int, ...], threads: int):
        """The session with ``threads`` intra-op threads for inputs of ``shape``. The file's
        batch axis is fixed to ``shape[0]`` in each session, so ONNX Runtime folds the graph's
        shape arithmetic away."""
        image_hw, batch = tuple(shape[2:]), shape[0]
        with self._lock:  # the batch split's parts ask at once: one export, one session
            path = self.path(spec, learned, image_hw)
            if (path, threads, batch) not in self._sessions:
                key = self.key(path)
                try:
                    session = executor_session(path, key, threads, batch)
                except (StaleEntry, OnnxFileError) as why:  # damaged or replaced: once more
                    log.warning("%s; exporting it again", why)
                    path = self._export(spec, learned, image_hw, path, key)
                    self._paths[(image_hw, learned, spec.carries_x0_prev)] = path
                    self._keys[path] = key
                    session = executor_session(path, key, threads, batch)
                self._sessions[(path, threads, batch)] = session
                while len(self._sessions) > MAX_SESSIONS:
                    self._sessions.popitem(last=False)
            self._sessions.move_to_end((path, threads, batch))
            return self._sessions[(path, threads, batch)]


class OrtChain:
    """One chain (sampler spec) of an engine on ONNX Runtime: the chain's tables built with
    torch (``ChainTables``), run by ``table_chain.TableChain`` on the engine's ``ExecutorSessions``.
    It runs under the thread plan that PyTorch's thread count carries: the plan sets that count
    (``torch_threads``, the batch split's one thread per part, the governor's switches), and
    each step runs on the session with that many intra-op threads."""

    def __init__(self, engine, tables: StepTables, spec: SamplerSpec):
        self.device = torch.device("cpu")
        self.steps = len(tables)
        self.learned = tables.learned
        # Every block's time projection at each step, side by side: [steps, D] float32, the
        # graph's time_row input (the layout StepUpdate slices, as the folded network's).
        rows = time_conditioning(engine.network, tables.timesteps)
        fast = mapping(family_of(engine.network).FAMILY)
        if hasattr(fast, "onnx_time_rows"):  # what the family's onnx_form reads
            rows = fast.onnx_time_rows(engine.network, rows)
        self.tables = ChainTables(
            time_rows=np.ascontiguousarray(torch.cat(list(rows.values()), 1).cpu().numpy()),
            coeffs=np.ascontiguousarray(
                coefficient_table(tables, spec, engine.diffusion.objective).numpy()
            ),
            noise_on=np.array([tables.adds_noise(k) for k in range(self.steps)], dtype=bool),
            carries_x0_prev=spec.carries_x0_prev,
            self_condition=engine.config.self_condition,
        )
        self.sessions: ExecutorSessions = engine.executor_sessions()
        self._spec = spec
        self.chain = TableChain(
            self.tables,
            self.session,
            self.sessions.invariant.setdefault((spec.carries_x0_prev, self.learned), {}),
        )
        self.thread_plans: dict = {}
        self.governors: dict = {}  # kept: what they learnt

    def session(self, shape: tuple[int, ...], threads: int):
        """The engine's session with ``threads`` intra-op threads for inputs of ``shape``."""
        return self.sessions.session(self._spec, self.learned, shape, threads)

    def executor_file(self, image_hw: tuple[int, int]) -> Path:
        """The executor file this chain runs on images of ``image_hw``."""
        return self.sessions.path(self._spec, self.learned, image_hw)

    def thread_invariant(self, shape: tuple[int, ...], threads: int) -> bool:
        """Whether the session on ``threads`` threads gives the same bits as on one, for this
        input shape (checked once per executor file with random inputs)."""
        return self.chain.thread_invariant(shape, threads)

    def run_eager(
        self, x, keys, seed: int, indices: range, on_step, labels=None, noise=None,
        guidance=None,
    ) -> torch.Tensor:  # fmt: skip
        """The chain from x_T = ``x`` (the engine draws it with NumPy for these chains, see
        ``Engine._initial_noise``); ``keys`` is unused (the noise is keyed by seed and indices,
        or given: ``noise.of_step(k)``, CPU tensors). ``labels`` and ``guidance`` are None:
        class-conditional models (``Engine.executor``) and guided chains (``Engine.prepare``'s
        ``torch_step``) never run here."""
        if labels is not None:
            raise ValueError("the executor file takes no class labels")
        if guidance is not None:
            raise ValueError("ONNX Runtime cannot differentiate the classifier")
        state = x.detach().cpu().numpy()
        steps = None if noise is None else NumpyNoise(noise)
        x_0 = self.chain.run(state, seed, indices, torch.get_num_threads, on_step, noise=steps)
        return torch.from_numpy(x_0)


class NumpyNoise:
    """Given step noise (torch tensors on the CPU) as the NumPy arrays a session is fed."""

    def __init__(self, noise):
        self.noise = noise

    def of_step(self, k: int) -> np.ndarray:
        return np.ascontiguousarray(self.noise.of_step(k).numpy())


def _private_folder() -> Path:
    """A folder of this process only, removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="ddpm-fast-executor-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
