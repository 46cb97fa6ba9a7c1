"""Checking a ddpm-fast ONNX file against the reference PyTorch path, on ONNX Runtime.

Random inputs (x_t as the forward process makes it from an x_0 of mean 0.1), batch sizes 1 and
3, and the first, middle and last timestep (``unet``) or step of the chain (``step``: compared
with ``ddpm_fast.samplers.denoise_step`` after the reference network, fed the same noise).
The error of an output is max |onnx - reference| over a scale: for ``model_output`` max
|reference|; for ``x0`` and ``x_prev`` the size of the terms they are made of (at least their own
max), e.g. max(|a x_t| + |b model_output|) for x0 = a x_t - b model_output before clipping, and
c_x0 times that plus |c_xt x_t| + ... for x_prev. At the first steps b reaches
sqrt(1/abar_T - 1) (157 for 1000 linear steps), so the network's own float32 rounding is amplified
that much while x0 stays within [-1, 1]: relative to max |x0| a faithful export would fail,
relative to its terms it is judged as the network is.

Tolerances: fp32 1e-4; fp16 max(1e-2, twice PyTorch's own fp16 error for the same graph and
inputs: flash-attention's rule), where a provider runs fp16 at all (else reported as skipped,
with the file's structure checked).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ..pipeline import LEFT_OUT_AT_DEFAULT, DiffusionConfig, Pipeline
from ..samplers import SamplerSpec, StepTables, denoise_step, step_tables
from .format import (
    HISTORY_INPUT,
    LABELS_INPUT,
    SELF_COND_INPUT,
    OnnxFileError,
    OnnxModelInfo,
    first_line,
    parse_metadata,
)
from .graph import graph_module, require_onnx
from .onnx_sampler import open_session, read_info

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
BATCH_SIZES = (1, 3)


@dataclass
class Check:
    """One output of one case: its max absolute error and the error relative to its scale."""

    output: str
    batch: int
    where: str
    max_abs: float
    rel: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.rel) and self.rel <= self.tolerance)

    def line(self) -> str:
        mark = "" if self.ok else "  <-- over the tolerance"
        return (
            f"  {self.output:<12} batch {self.batch}  {self.where:<18} max abs {self.max_abs:.2e}"
            f"  rel {self.rel:.2e}  (tol {self.tolerance:.0e}){mark}"
        )


@dataclass
class VerifyReport:
    """Every comparison of one verification; ``ok`` when all are within their tolerance."""

    path: Path
    info: OnnxModelInfo
    providers: list[str]
    checks: list[Check] = field(default_factory=list)
    skipped: str | None = None  # why the numbers were not compared (structure was checked)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and (bool(self.checks) or self.skipped is not None)

    @property
    def worst(self) -> Check | None:
        return max(self.checks, key=lambda c: c.rel / c.tolerance, default=None)

    def header(self) -> str:
        info = self.info
        chain = f", {info.chain()}" if info.what == "step" else ""
        return (
            f"{self.path}: {info.what} {info.dtype}{chain}; onnxruntime {', '.join(self.providers)}"
        )

    def summary(self) -> str:
        worst = self.worst
        if self.skipped is not None and worst is None:
            return f"ok: onnx.checker passed; {self.info.dtype}: skipped ({self.skipped})"
        if worst is None:
            return "FAILED: nothing was compared"
        where = f"{worst.output}, batch {worst.batch}, {worst.where}"
        if self.ok:
            max_abs = max(c.max_abs for c in self.checks)
            return (
                f"ok: {len(self.checks)} comparisons, max rel error {worst.rel:.2e} (tol "
                f"{worst.tolerance:.0e}, {where}), max abs {max_abs:.2e}"
            )
        bad = sum(not c.ok for c in self.checks)
        return (
            f"FAILED: {bad} of {len(self.checks)} comparisons over the tolerance; worst rel error "
            f"{worst.rel:.2e} > {worst.tolerance:.0e} ({where})"
        )

    def lines(self) -> list[str]:
        return [self.header(), *(c.line() for c in self.checks), self.summary()]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _error(actual: np.ndarray, expected: torch.Tensor, scale: float) -> tuple[float, float]:
    diff = np.abs(actual.astype(np.float64) - expected.double().cpu().numpy())
    max_abs = float(diff.max())
    return max_abs, max_abs / scale if scale > 0 else float("inf")


def _scale(t: torch.Tensor) -> float:
    return float(t.double().abs().max())


def load_onnx_info(path: str | os.PathLike) -> OnnxModelInfo:
    """Read ``path`` with onnx, run the checker, parse its ddpm-fast metadata; OnnxFileError with
    one line for a truncated, foreign or invalid file."""
    onnx = require_onnx()
    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise OnnxFileError(
            f"{path}: not a readable ONNX file, truncated or not ONNX ({first_line(err)})"
        ) from None
    info = parse_metadata({p.key: p.value for p in model.metadata_props}, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:
        raise OnnxFileError(f"{path}: fails the ONNX checker ({first_line(err)})") from None
    return info


def check_same_model(info: OnnxModelInfo, pipeline: Pipeline, path: Path) -> SamplerSpec:
    """The file's chain as a SamplerSpec, after checking that the file was exported from a model
    like ``pipeline`` (family, network config, image size, schedule, objective)."""
    # to_dict leaves some keys out at their default (and files written before a key existed
    # lack it): both sides compare with the defaults filled in.
    defaults = {f.name: f.default for f in fields(DiffusionConfig) if f.name in LEFT_OUT_AT_DEFAULT}
    diffusion = {**defaults, **pipeline.diffusion.to_dict()}
    ours = {
        "family": pipeline.config.family,
        **{f"config.{k}": v for k, v in pipeline.config.to_dict().items()},
        **{f"diffusion.{k}": v for k, v in diffusion.items() if k != "variance"},
    }
    theirs = {
        "family": info.family,
        **{f"config.{k}": v for k, v in info.config.items()},
        **{
            f"diffusion.{k}": v
            for k, v in {**defaults, **info.diffusion}.items()
            if k != "variance"
        },
    }
    differ = [
        f"{k}: file {theirs.get(k)!r}, model {ours.get(k)!r}"
        for k in sorted(set(ours) | set(theirs))
        if ours.get(k) != theirs.get(k)
    ]
    source = pipeline.source or "the model given"
    if differ:
        raise OnnxFileError(
            f"{path} was not exported from {source}: "
            + "; ".join(differ[:4])
            + (f" (+{len(differ) - 4} more)" if len(differ) > 4 else "")
        )
    spec = pipeline.sampler_spec(info.sampler, info.steps, info.eta, info.timestep_spacing)
    if spec.variance != info.variance:
        raise OnnxFileError(
            f"{path} holds a chain with {info.variance} variance; {source} gives {spec.variance}"
            f" (pass --variance {info.variance})"
        )
    return spec


def check_chain_metadata(info: OnnxModelInfo, tables: StepTables, spec: SamplerSpec, path) -> None:
    """OnnxFileError unless what a sampler reads from the metadata (which steps add noise, and a
    unet file's coefficient tables) is the reference chain's."""
    noise_steps = "".join("1" if tables.adds_noise(k, spec) else "0" for k in range(len(tables)))
    wrong = [] if info.noise_steps == noise_steps else ["noise_steps"]
    for name, stored in (info.tables or {}).items():
        reference = getattr(tables, name).double().numpy()
        if not np.allclose(np.asarray(stored, np.float64), reference, rtol=1e-12, atol=0):
            wrong.append(f"tables.{name}")
    if wrong:
        raise OnnxFileError(
            f"{path}: its metadata ({', '.join(wrong)}) differs from the reference chain "
            f"'{info.chain()}'; the file was edited or is corrupt: export it again"
        )


def _inputs(shape: tuple[int, ...], abar: float, self_condition: bool, seed: int):
    """x_t as the forward process makes it at a timestep with cumulative alpha ``abar``, from
    x_0 uniform in [-0.8, 1.0] (mean 0.1): a trained network sees such inputs. Also the step's
    noise, a previous x0 (the solvers' history) and a self-conditioning input (a clipped x0's
    range)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g) * 1.8 - 0.8
    x = abar**0.5 * x0 + (1 - abar) ** 0.5 * torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    x_self_cond = (torch.rand(shape, generator=g) * 1.8 - 0.9) if self_condition else None
    x0_prev = torch.rand(shape, generator=g) * 1.8 - 0.85
    return x, noise, x_self_cond, x0_prev


def _step_scales(
    model_output: torch.Tensor,
    x: torch.Tensor,
    x0_prev: torch.Tensor,
    tables: StepTables,
    k: int,
    objective: str,
) -> tuple[float, float]:
    """The sizes of the terms x0 and x_prev are made of (elementwise sums of magnitudes, before
    clipping), maximised: (x0's, x_prev's)."""
    prediction = model_output[:, : x.shape[1]].double()
    x = x.double()
    if objective == "pred_noise":
        x0 = (tables.x0_from_xt[k] * x).abs() + (tables.x0_from_eps[k] * prediction).abs()
    elif objective == "pred_v":
        x0 = (tables.x0_from_xt_v[k] * x).abs() + (tables.x0_from_v[k] * prediction).abs()
    else:
        x0 = prediction.abs()
    eps = ((tables.x0_from_xt[k] * x).abs() + x0) / tables.x0_from_eps[k]
    x_prev = tables.c_x0[k].abs() * x0 + (tables.c_xt[k] * x).abs() + tables.c_eps[k].abs() * eps
    x_prev = x_prev + (tables.c_x0_prev[k] * x0_prev.double()).abs()
    return float(x0.max()), float(x_prev.max())


@torch.no_grad()
def verify_onnx(
    path: str | os.PathLike,
    pipeline: Pipeline | None = None,
    *,
    providers=None,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
) -> VerifyReport:
    """Compare the ONNX file at ``path`` with ``pipeline``'s reference path (default: the
    embedded default model) on ONNX Runtime; see the module's docstring for what is compared.
    Raises OnnxFileError for a file that cannot be read, is not a ddpm-fast file or was exported
    from another model; returns the report (``report.ok``) otherwise."""
    if pipeline is None:
        from .. import load

        pipeline = load()
    path = Path(path)
    info = load_onnx_info(path)
    spec = check_same_model(info, pipeline, path)
    tables = step_tables(pipeline.schedule, spec)
    check_chain_metadata(info, tables, spec, path)
    try:
        session = open_session(path, providers)
    except Exception as err:
        if type(err).__name__ != "NotImplemented":
            raise
        if info.dtype == "fp32":
            raise OnnxFileError(f"{path}: onnxruntime cannot run it ({first_line(err)})") from None
        used = providers if providers is not None else "the default providers"
        return VerifyReport(
            path, info, [], skipped=f"no provider with {info.dtype} kernels in {used}"
        )
    read_info(session, path)
    report = VerifyReport(path, info, session.get_providers())

    reference = _Reference(pipeline, info, spec, tables)
    shape = pipeline.image_shape()
    if info.what == "unet":
        last = pipeline.schedule.num_timesteps - 1
        cases = [(t, t, f"t={t}") for t in sorted({last, last // 2, 0}, reverse=True)]
    else:
        n = len(tables)
        steps = sorted({0, n // 2, n - 1})
        cases = [
            (k, int(tables.timesteps[k]), f"step {k} (t={int(tables.timesteps[k])})") for k in steps
        ]
    for index, (case, t, where) in enumerate(cases):
        abar = float(pipeline.schedule.alphas_cumprod[t])
        for batch in batch_sizes:
            x, noise, x_self_cond, x0_prev = _inputs(
                (batch, *shape), abar, info.self_condition, 100 * index + batch
            )
            t_vec = torch.full((batch,), t, dtype=torch.int64)
            feed = {SELF_COND_INPUT: x_self_cond.numpy()} if x_self_cond is not None else {}
            labels = None  # several classes in one batch, for a class-conditional file
            if info.num_classes is not None:
                labels = (torch.arange(batch, dtype=torch.int64) * 7 + index) % info.num_classes
                feed[LABELS_INPUT] = labels.numpy()
            extra = () if labels is None else (labels,)
            if info.what == "unet":
                feed |= {"x": x.numpy(), "t": t_vec.numpy()}
                sc = () if x_self_cond is None else (x_self_cond,)
                args = (x, t_vec, *sc, *extra)
            else:
                step = torch.tensor([case])
                feed |= {"x_t": x.numpy(), "step": step.numpy(), "noise": noise.numpy()}
                history = (x0_prev,) if info.carries_x0_prev else ()
                if history:
                    feed[HISTORY_INPUT] = x0_prev.numpy()
                sc = () if x_self_cond is None else (x_self_cond,)
                args = (x, step, noise, *history, *sc, *extra)
            if not info.carries_x0_prev:
                x0_prev = None  # the chain reads no history: the reference gets none
            got = session.run(None, feed)
            expected = reference.outputs(case, t_vec, x, noise, x_self_cond, x0_prev, labels)
            own = reference.own_outputs(*args)
            for i, (name, (ref, scale)) in enumerate(expected.items()):
                max_abs, rel = _error(got[i], ref, scale)
                tolerance = TOLERANCE[info.dtype]
                if own is not None:  # PyTorch's own error in this dtype sets the bar too
                    tolerance = max(tolerance, 2 * _error(own[i].numpy(), ref, scale)[1])
                report.checks.append(Check(name, batch, where, max_abs, rel, tolerance))
    return report


class _Reference:
    """The reference outputs of a case, with the scale each error is measured against; and, for
    a half-precision file, PyTorch's own run of the same graph in that dtype."""

    def __init__(self, pipeline: Pipeline, info: OnnxModelInfo, spec: SamplerSpec, tables):
        self.pipeline, self.info, self.spec, self.tables = pipeline, info, spec, tables
        self.own = None
        if info.dtype != "fp32":
            self.own = graph_module(pipeline, info.what, info.dtype, spec, tables)

    def outputs(
        self, case: int, t, x, noise, x_self_cond, x0_prev=None, class_labels=None
    ) -> dict[str, tuple[torch.Tensor, float]]:
        device = self.pipeline.device
        x_sc = x_self_cond.to(device) if x_self_cond is not None else None
        labels = {} if class_labels is None else {"class_labels": class_labels.to(device)}
        network = self.pipeline.network
        model_output = network(x.to(device), t.to(device), x_sc, **labels).float().cpu()
        if self.info.what == "unet":
            return {"model_output": (model_output, _scale(model_output))}
        tables, objective = self.tables, self.pipeline.diffusion.objective
        step_noise = noise if tables.adds_noise(case) else None
        x_prev, x0 = denoise_step(
            model_output, x, tables, case, self.spec, objective, step_noise, x0_prev
        )
        previous = torch.zeros_like(x) if x0_prev is None else x0_prev
        x0_terms, x_prev_terms = _step_scales(model_output, x, previous, tables, case, objective)
        return {
            "x_prev": (x_prev, max(_scale(x_prev), x_prev_terms)),
            "x0": (x0, max(_scale(x0), x0_terms)),
        }

    def own_outputs(self, *args) -> tuple[torch.Tensor, ...] | None:
        if self.own is None:
            return None
        try:
            outputs = self.own(*args)
        except RuntimeError:  # an op without a half-precision CPU kernel in this torch
            return None
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        return tuple(o.float() for o in outputs)
