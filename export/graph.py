"""The torch modules a ddpm-fast ONNX file is traced from, and the tracing: what a ``unet`` file
computes (:class:`UnetGraph`), one reverse step given its rows (:class:`StepUpdate`, which the
engine's ONNX Runtime executor also traces) and a ``step`` file (:class:`StepGraph`). The exporter
traces them; the verifier runs the same modules as the reference's form of the file.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..folding import conditioning_rows, fold_weights, time_conditioning, time_embeddings
from ..models import family_of
from ..pipeline import Pipeline
from ..samplers import ROW, SamplerSpec, StepTables, rule

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


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
        self.self_condition = pipeline.config.self_condition
        self.class_conditional = pipeline.num_classes is not None

    def forward(self, x, t, *extra):
        """``extra``: x_self_cond (self-conditioning networks), then class_labels
        (class-conditional ones), as the file's inputs are ordered."""
        x_self_cond = extra[0] if self.self_condition else None
        labels = {"class_labels": extra[-1]} if self.class_conditional else {}
        if x_self_cond is not None:
            x_self_cond = x_self_cond.to(self.dtype)
        cond = _cast(self.time.time_conditioning(t, **labels), self.dtype)
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
        class_conditional = pipeline.num_classes is not None
        if class_conditional:
            # The conditioning depends on the label through a SiLU: the table holds the time
            # embedding per step, and the graph adds the label's and runs the projections (in
            # float32, on a copy kept out of any cast to fp16).
            table = time_embeddings(network, tables.timesteps)
            conditioner = copy.deepcopy(network)
        else:
            conditioning = time_conditioning(network, tables.timesteps)  # before any fp16 cast
            table = torch.cat(list(conditioning.values()), dim=1)
        super().__init__(pipeline, spec, tables.learned, dtype, network)
        self.class_conditional = class_conditional
        if class_conditional:
            self.conditioner = conditioner
        self.register_buffer("time_table", table)
        rows = tables.rows(pipeline.diffusion.objective)
        table = torch.stack([rows[name].to(torch.float64) for name in ROW], dim=1).float()
        self.register_buffer("table", table)
        adds_noise = [tables.adds_noise(k) for k in range(len(tables))]
        self.register_buffer("adds_noise", torch.tensor(adds_noise, dtype=torch.bool))

    def forward(self, x_t, step, noise, *history):
        """``history``: x0_prev (the multistep solvers), x_self_cond (self-conditioning), then
        class_labels (class-conditional networks), as the file's inputs are ordered."""
        k = step.reshape(1)
        row = self.time_table[k]
        if self.class_conditional:
            *history, labels = history
            emb = row + self.conditioner.embed_labels(labels)
            row = conditioning_rows(self.conditioner, emb)  # [B, D]: per sample
        return self.update(x_t, row, self.table[k], self.adds_noise[k], noise, *history)


def graph_module(
    pipeline: Pipeline, what: str, dtype: str, spec: SamplerSpec, tables: StepTables
) -> nn.Module:
    """The module a file of kind ``what`` computes, in eval mode on the CPU."""
    if what == "unet":
        return UnetGraph(pipeline, dtype).eval()
    return StepGraph(pipeline, tables, spec, dtype).eval()


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
