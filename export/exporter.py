"""Writing ddpm-fast ONNX files: the folded network (``unet``) or one whole reverse step
(``step``), with the metadata a deployment needs; see :mod:`ddpm_fast.export.format`.

The graph is traced by PyTorch's TorchScript exporter (``torch.onnx.export(dynamo=False)``): it
writes opset 17 directly, where the dynamo exporter of torch >= 2.9 starts at opset 18 and fails
to convert this network down (its ReduceMean axes), and it needs no onnxscript.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..files import temporary_name
from ..pipeline import Pipeline
from ..samplers import SamplerSpec, StepTables, step_tables
from ..version import __version__
from .format import (
    DEFAULT_OPSET,
    DTYPES,
    FORMAT_KEY,
    FORMAT_VERSION,
    HISTORY_INPUT,
    LABELS_INPUT,
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
from .graph import graph_module, require_onnx, trace_to_onnx
from .verify import verify_onnx

logger = logging.getLogger(__name__)

MIN_OPSET = 14  # the oldest opset tested here (einsum, softmax over any axis)
MAX_OPSET = 20  # the newest the TorchScript exporter of torch 2.4 writes


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
    if pipeline.num_classes is not None:
        inputs = (*inputs, torch.arange(batch, dtype=torch.int64) % pipeline.num_classes)
    return inputs


def _torch_export(
    module: nn.Module,
    inputs: tuple,
    path: Path,
    what: str,
    opset: int,
    sc: bool,
    history: bool,
    labels: bool = False,
):
    """A ``unet`` or ``step`` file's graph: its inputs and outputs named as the format says."""
    names = UNET_INPUTS if what == "unet" else STEP_INPUTS
    if what == "step" and history:
        names = (*names, HISTORY_INPUT)
    names = (*names, SELF_COND_INPUT) if sc else names
    names = (*names, LABELS_INPUT) if labels else names
    outputs = UNET_OUTPUTS if what == "unet" else STEP_OUTPUTS
    batched = [n for n in (*names, *outputs) if n != "step"]  # a unet file's t is per sample
    trace_to_onnx(module, inputs, path, names, outputs, batched, opset)


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
    tmp = temporary_name(path)
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
                pipeline.num_classes is not None,
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
