"""Writing ddpm-fast ONNX files: the folded network (``unet``) or one whole reverse step
(``step``), with the metadata a deployment needs; see :mod:`ddpm_fast.export.format`.

The graph is traced by PyTorch's TorchScript exporter (``torch.onnx.export(dynamo=False)``): it
writes opset 17 directly, where the dynamo exporter of torch >= 2.9 starts at opset 18 and fails
to convert this network down (its ReduceMean axes), and it needs no onnxscript.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..folding import fold_weights, time_conditioning
from ..models import family_of
from ..pipeline import Pipeline
from ..samplers import ROW, SamplerSpec, StepTables, rule, step_tables
from ..version import __version__
from .format import (
    DEFAULT_OPSET,
    DTYPES,
    FORMAT_KEY,
    FORMAT_VERSION,
    HISTORY_INPUT,
    SELF_COND_INPUT,
    STEP_INPUTS,
    STEP_OUTPUTS,
    TABLE_NAMES,
    UNET_INPUTS,
    UNET_OUTPUTS,
    WHATS,
    OnnxFileError,
    VerificationError,
)

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MIN_OPSET = 14  # the oldest opset tested here (einsum, softmax over any axis)
MAX_OPSET = 20  # the newest the TorchScript exporter of torch 2.4 writes


def require_onnx():
    """The ``onnx`` module, or a one-line error saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise ConfigError(
            "ONNX export needs the onnx package: pip install 'ddpm-fast[onnx]'"
        ) from None
    return onnx


class _NormInFloat32(nn.Module):
    """A norm of a half-precision graph computed in float32 (a float32 copy of the reference's
    module, so with the fp32 reference's epsilon), as the engine's kernels do: fp32 is the
    function to approximate, and the library's half-precision LayerNorm epsilon (1e-3 for 1e-5)
    alone moves the output of a trained network by ~2.5e-2. The family names its norms
    (``HALF_PRECISION_FP32``)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = copy.deepcopy(norm).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


def to_half(network: nn.Module) -> nn.Module:
    """``network`` (fp32, folded) for an fp16 graph: weights in fp16, the family's norms in fp32
    (see _NormInFloat32). The time conditioning is not computed here (the graphs compute it in
    fp32: t reaches 1000, fp16 would lose the sinusoids' phase)."""
    norm_types = family_of(network).HALF_PRECISION_FP32
    norms = {
        name: _NormInFloat32(module)
        for name, module in network.named_modules()
        if isinstance(module, norm_types)
    }
    network = network.half()
    for name, norm in norms.items():
        parent, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent), child, norm)
    return network


def _cast(cond: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: c.to(dtype) for name, c in cond.items()}


def folded_network(pipeline: Pipeline, dtype: str) -> nn.Module:
    """The reference network with its family's folding done, on the CPU, in ``dtype``
    (fp16: :func:`to_half`)."""
    network = fold_weights(pipeline.network).to("cpu", torch.float32)
    return to_half(network) if dtype == "fp16" else network


class UnetGraph(nn.Module):
    """What a ``unet`` file computes: the folded network, float32 in and out; the time
    conditioning in float32 whatever the dtype."""

    def __init__(self, pipeline: Pipeline, dtype: str = "fp32"):
        super().__init__()
        self.time = fold_weights(pipeline.network).to("cpu", torch.float32)
        self.network = to_half(copy.deepcopy(self.time)) if dtype == "fp16" else self.time
        self.dtype = TORCH_DTYPES[dtype]

    def forward(self, x, t, x_self_cond=None):
        if x_self_cond is not None:
            x_self_cond = x_self_cond.to(self.dtype)
        cond = _cast(self.time.time_conditioning(t), self.dtype)
        return self.network.forward_conditioned(x.to(self.dtype), cond, x_self_cond).float()


class StepUpdate(nn.Module):
    """One reverse step given its rows: ``ddpm_fast.samplers.rule``'s update after the network,
    float32 in and out. ``time_row`` [1, D] is the network's ``time_conditioning`` at the step's
    timestep (every block's time projection, concatenated in ``time_slices`` order), ``coef_row``
    [len(ROW)] the step's float32 ``rule.ROW`` columns, ``adds_noise`` [1] bool. Where the
    reference skips the noise (a step that adds none), the graph selects the mean: the same
    numbers. ``StepGraph`` gathers the rows from one chain's tables; the engine's ONNX Runtime
    executor feeds them, so that one file serves every chain."""

    def __init__(
        self,
        pipeline: Pipeline,
        spec: SamplerSpec,
        learned: bool,
        dtype: str = "fp32",
        network: nn.Module | None = None,
    ):
        super().__init__()
        if network is None:  # the folded float32 network, on the CPU
            network = fold_weights(pipeline.network).to("cpu", torch.float32)
        layout = time_conditioning(network, torch.zeros(1, dtype=torch.long))
        self.time_slices, start = {}, 0
        for name, table in layout.items():
            self.time_slices[name], start = (start, start + table.shape[1]), start + table.shape[1]
        self.dtype = TORCH_DTYPES[dtype]
        self.network = to_half(network) if dtype == "fp16" else network
        self.channels = pipeline.config.channels
        self.learned = learned
        self.carries_x0_prev = spec.carries_x0_prev

    def update(self, x_t, time_row, coef_row, adds_noise, noise, *history):
        x0_prev = history[0] if self.carries_x0_prev else torch.zeros_like(x_t)
        x_self_cond = history[-1] if len(history) > int(self.carries_x0_prev) else None
        if x_self_cond is not None:
            x_self_cond = x_self_cond.to(self.dtype)
        row = time_row.to(self.dtype)  # [1, D]
        cond = {name: row[:, a:b] for name, (a, b) in self.time_slices.items()}
        model_output = self.network.forward_conditioned(
            x_t.to(self.dtype), cond, x_self_cond
        ).float()
        variance_output = None
        if model_output.shape[1] == 2 * self.channels:
            model_output, variance_output = model_output.chunk(2, dim=1)
        row = coef_row.reshape(len(ROW), 1, 1, 1, 1)
        c = dict(zip(ROW, row.unbind(0), strict=True))
        raw = rule.estimate_x0(c["a"], c["b"], x_t, model_output)
        x0 = torch.minimum(torch.maximum(raw, -c["x0_max"]), c["x0_max"])
        eps_x0 = torch.minimum(torch.maximum(raw, -c["eps_x0_max"]), c["eps_x0_max"])
        eps = rule.estimate_eps(c["x0_from_xt"], c["x0_from_eps"], x_t, eps_x0)
        x_next = rule.combine(
            c["c_x0"], c["c_xt"], c["c_x0_prev"], c["c_eps"], x0, x_t, x0_prev, eps
        )
        if self.learned:
            log_var = rule.learned_log_var(variance_output, c["log_var_min"], c["log_var_max"])
            sigma = (0.5 * log_var).exp()
        else:
            sigma = c["sigma"]
        noisy = rule.add_noise(x_next, c["noise_on"], sigma, noise)
        x_prev = torch.where(adds_noise.reshape(1, 1, 1, 1), noisy, x_next)
        return x_prev, x0


class StepGraph(StepUpdate):
    """What a ``step`` file computes: ``StepUpdate`` for step index ``step`` [1] of one chain,
    its rows gathered from the chain's tables: the float32 ``rule.ROW`` columns (the engine's
    table) and the time conditioning precomputed for the chain's timesteps
    (``ddpm_fast.folding.time_conditioning``)."""

    def __init__(
        self, pipeline: Pipeline, tables: StepTables, spec: SamplerSpec, dtype: str = "fp32"
    ):
        network = fold_weights(pipeline.network).to("cpu", torch.float32)
        conditioning = time_conditioning(network, tables.timesteps)  # before any cast to fp16
        super().__init__(pipeline, spec, tables.learned, dtype, network)
        self.register_buffer("time_table", torch.cat(list(conditioning.values()), dim=1))
        rows = tables.rows(pipeline.diffusion.objective)
        table = torch.stack([rows[name].to(torch.float64) for name in ROW], dim=1).float()
        self.register_buffer("table", table)
        adds_noise = [tables.adds_noise(k) for k in range(len(tables))]
        self.register_buffer("adds_noise", torch.tensor(adds_noise, dtype=torch.bool))

    def forward(self, x_t, step, noise, *history):
        k = step.reshape(1)
        return self.update(
            x_t, self.time_table[k], self.table[k], self.adds_noise[k], noise, *history
        )


def graph_module(
    pipeline: Pipeline, what: str, dtype: str, spec: SamplerSpec, tables: StepTables
) -> nn.Module:
    """The module a file of kind ``what`` computes, in eval mode on the CPU."""
    if what == "unet":
        return UnetGraph(pipeline, dtype).eval()
    return StepGraph(pipeline, tables, spec, dtype).eval()


def _example_inputs(
    pipeline: Pipeline, what: str, spec: SamplerSpec, batch: int = 2
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shape = (batch, *pipeline.image_shape())
    x = torch.randn(shape, generator=g)
    if what == "unet":
        inputs = (x, torch.zeros(batch, dtype=torch.int64))
    else:
        inputs = (x, torch.zeros(1, dtype=torch.int64), torch.randn(shape, generator=g))
        if spec.carries_x0_prev:
            inputs = (*inputs, torch.rand(shape, generator=g) * 2 - 1)
    if pipeline.config.self_condition:
        inputs = (*inputs, torch.rand(shape, generator=g) * 2 - 1)
    return inputs


def _torch_export(
    module: nn.Module, inputs: tuple, path: Path, what: str, opset: int, sc: bool, history: bool
):
    """A ``unet`` or ``step`` file's graph: its inputs and outputs named as the format says."""
    names = UNET_INPUTS if what == "unet" else STEP_INPUTS
    if what == "step" and history:
        names = (*names, HISTORY_INPUT)
    names = (*names, SELF_COND_INPUT) if sc else names
    outputs = UNET_OUTPUTS if what == "unet" else STEP_OUTPUTS
    batched = [n for n in (*names, *outputs) if n != "step"]  # a unet file's t is per sample
    trace_to_onnx(module, inputs, path, names, outputs, batched, opset)


def trace_to_onnx(
    module: nn.Module,
    inputs: tuple,
    path: Path,
    input_names,
    output_names,
    batched,
    opset: int,
) -> None:
    """torch.onnx.export with the TorchScript exporter, axis 0 of the ``batched`` inputs and
    outputs dynamic (the batch), every other size fixed (H and W: one file per image size)."""
    kwargs = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:  # torch >= 2.5
        kwargs["dynamo"] = False
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated from torch 2.9 on (it still works, and writes
        # opset 17); tracer warnings about shapes read as Python ints are expected: H and W are
        # fixed per file.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            inputs,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={n: {0: "batch"} for n in batched},
            opset_version=opset,
            do_constant_folding=True,
            **kwargs,
        )


def metadata(
    pipeline: Pipeline, what: str, dtype: str, opset: int, spec: SamplerSpec, tables: StepTables
) -> dict[str, str]:
    """The metadata_props of a file (all strings; JSON where structured)."""
    config = pipeline.config
    diffusion = pipeline.diffusion.to_dict()
    meta = {
        FORMAT_KEY: FORMAT_VERSION,
        "ddpm_fast_version": __version__,
        "what": what,
        "dtype": dtype,
        "opset": str(opset),
        "family": config.family,
        "config": json.dumps(config.to_dict()),
        "diffusion": json.dumps(diffusion),
        "image_size": str(pipeline.diffusion.image_size),
        "channels": str(config.channels),
        "self_condition": json.dumps(bool(config.self_condition)),
        "schedule": json.dumps(diffusion["schedule"]),
        "objective": pipeline.diffusion.objective,
        "sampler": spec.kind,
        "steps": str(spec.steps),
        "eta": repr(spec.eta),
        "variance": spec.variance,
        "timestep_spacing": spec.timestep_spacing,
        "noise_steps": "".join(
            "1" if tables.adds_noise(k, spec) else "0" for k in range(len(tables))
        ),
    }
    if what == "unet":
        meta["tables"] = json.dumps({name: getattr(tables, name).tolist() for name in TABLE_NAMES})
    return meta


@dataclass
class ExportResult:
    """The file written and its verification report (None when not verified)."""

    path: Path
    report: object | None  # a VerifyReport


def export_onnx(
    pipeline: Pipeline,
    path: str | os.PathLike,
    *,
    what: str = "unet",
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float = 0.0,
    timestep_spacing: str | None = None,
    verify: bool = True,
    providers=None,
) -> ExportResult:
    """Write ``pipeline`` as an ONNX file: ``what="unet"`` (the network) or ``"step"`` (one reverse
    step of the chain ``sampler``/``steps``/``eta``; a unet file carries that chain's tables for
    OnnxSampler), in ``dtype`` fp32 or fp16, at ``opset``.

    The file is written to a temporary name, checked (``onnx.checker``) and, with ``verify``,
    compared with the reference on ONNX Runtime (:func:`~ddpm_fast.export.verify_onnx`) before it
    is renamed into place: VerificationError (and no file) when it is over the tolerance.
    """
    onnx = require_onnx()
    if what not in WHATS:
        raise ConfigError(f"unknown export {what!r}; known: {', '.join(WHATS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"opset must be an integer in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
    spec = pipeline.sampler_spec(sampler, steps, eta, timestep_spacing)
    pipeline.image_shape()  # the image size is needed: H and W are fixed in the graph
    tables = step_tables(pipeline.schedule, spec)
    module = graph_module(pipeline, what, dtype, spec, tables)

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory")
    if not path.parent.is_dir():
        raise ConfigError(f"{path}: cannot write there ({path.parent} is not a folder)")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with torch.no_grad():
            _torch_export(
                module,
                _example_inputs(pipeline, what, spec),
                tmp,
                what,
                opset,
                pipeline.config.self_condition,
                spec.carries_x0_prev,
            )
        model = onnx.load(str(tmp))
        model.producer_name = "ddpm-fast"
        model.producer_version = __version__
        model.doc_string = (
            f"ddpm-fast {what} export of a {pipeline.config.family} network; "
            "see the metadata_props and ddpm_fast.export.format"
        )
        del model.metadata_props[:]
        for key, value in metadata(pipeline, what, dtype, opset, spec, tables).items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        report = None
        if verify:
            from .verify import verify_onnx

            report = verify_onnx(tmp, pipeline, providers=providers)
            report.path = path
            if not report.ok:
                raise VerificationError(report.summary(), report)
        os.replace(tmp, path)
    except OSError as err:
        raise OnnxFileError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s", path)
    return ExportResult(path, report)
