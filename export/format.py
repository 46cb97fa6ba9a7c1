"""What a ddpm-fast ONNX file is: its inputs, outputs and metadata_props (no torch, no onnx).

Two kinds of file (metadata ``what``):

- ``unet``: the network. Inputs ``x`` [B, C, H, W] float32, ``t`` [B] int64 (timesteps), and for
  self-conditioning networks ``x_self_cond`` [B, C, H, W] (zeros for "none"); output
  ``model_output`` [B, out_channels, H, W] float32. The batch is dynamic, H and W are the image
  size. The metadata also carries the coefficient tables of one chain (``tables``), so that
  :class:`~ddpm_fast.export.OnnxSampler` can run it.
- ``step``: one whole reverse step of one chain (sampler, steps, eta fixed at export). Inputs
  ``x_t`` [B, C, H, W] float32, ``step`` [1] int64 (the step index k = 0 .. steps - 1, not the
  timestep), ``noise`` [B, C, H, W] float32 (read only where the step adds noise: see
  ``noise_steps``), for the multistep solvers (DPM-Solver++) ``x0_prev`` (the solver's history:
  the previous step's ``x0``, zeros at the first step), and for self-conditioning networks
  ``x_self_cond`` (the previous step's ``x0`` too); outputs ``x_prev`` and ``x0`` (clipped: the
  next step's ``x0_prev``), both [B, C, H, W] float32. ``x_prev`` of the last step is the
  sample, in [-1, 1].

A class-conditional network's files (its config's ``num_classes`` set) take one input more, last:
``class_labels`` [B] int64, each in [0, num_classes); the graph computes the label embedding and
every block's conditioning from it.

Inputs and outputs are float32 for fp16 files too: the graph casts at its edges.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from itertools import pairwise

from ..errors import DdpmFastError
from ..options import MAX_IMAGE_SIZE, MAX_TIMESTEPS, OBJECTIVES, VARIANCES
from ..samplers import SAMPLERS, SPACINGS, TABLE, sampler_module

FORMAT_KEY = "ddpm_fast_onnx_format"
# 2: the rule's columns (x0_prev, x0_max, noise_on), timestep_spacing; 3: eps_x0_max (DDIM's eps
# from the unclipped x0), the diffusion's sampler defaults. Older files are refused: export again.
FORMAT_VERSION = "3"
WHATS = ("unet", "step")
DTYPES = ("fp32", "fp16")
DEFAULT_OPSET = 17

UNET_INPUTS = ("x", "t")
UNET_OUTPUTS = ("model_output",)
STEP_INPUTS = ("x_t", "step", "noise")
STEP_OUTPUTS = ("x_prev", "x0")
SELF_COND_INPUT = "x_self_cond"
HISTORY_INPUT = "x0_prev"
LABELS_INPUT = "class_labels"

# The per-step coefficients a unet file carries (float64, as ``ddpm_fast.samplers.StepTables``).
TABLE_NAMES = ("timesteps", *TABLE)


def first_line(err: Exception) -> str:
    """The first line of ``err``'s message (its type's name if it has none): what a one-line
    OnnxFileError quotes of onnx's and onnxruntime's multi-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class OnnxFileError(DdpmFastError):
    """An ONNX file that cannot be read, is not one ddpm-fast wrote, or does not fit the request."""


class VerificationError(DdpmFastError):
    """An exported file whose outputs differ from the reference beyond the tolerance; ``report``
    holds every comparison."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class OnnxModelInfo:
    """The metadata of a ddpm-fast ONNX file, parsed."""

    what: str
    dtype: str
    family: str
    config: dict  # the network's config (UnetConfig.to_dict())
    diffusion: dict  # DiffusionConfig.to_dict()
    image_size: int
    channels: int
    objective: str
    sampler: str
    steps: int
    eta: float
    variance: str
    timestep_spacing: str
    noise_steps: str  # "1" where step k adds noise, "0" where it does not
    version: str
    tables: dict | None  # unet files: {name: [float per step]}

    @property
    def self_condition(self) -> bool:
        return bool(self.config.get("self_condition", False))

    @property
    def num_classes(self) -> int | None:
        """The classes of a class-conditional network, else None."""
        return self.config.get("num_classes")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def uses_eta(self) -> bool:
        return sampler_module(self.sampler).USES_ETA

    @property
    def learned(self) -> bool:
        """Whether sigma comes from the network's extra channels (DDPM, learned_range)."""
        return sampler_module(self.sampler).READS_VARIANCE and self.variance == "learned_range"

    @property
    def carries_x0_prev(self) -> bool:
        return sampler_module(self.sampler).CARRIES_X0_PREV

    @property
    def input_names(self) -> tuple[str, ...]:
        if self.what == "unet":
            names = UNET_INPUTS
        else:
            names = (*STEP_INPUTS, HISTORY_INPUT) if self.carries_x0_prev else STEP_INPUTS
        names = (*names, SELF_COND_INPUT) if self.self_condition else names
        return (*names, LABELS_INPUT) if self.num_classes is not None else names

    @property
    def output_names(self) -> tuple[str, ...]:
        return UNET_OUTPUTS if self.what == "unet" else STEP_OUTPUTS

    def adds_noise(self, k: int) -> bool:
        return self.noise_steps[k] == "1"

    def chain(self) -> str:
        """The chain in words: 'ddim, 20 steps, eta 0.5'."""
        words = f"{self.sampler}, {self.steps} steps"
        if self.timestep_spacing != sampler_module(self.sampler).DEFAULT_SPACING:
            words += f", {self.timestep_spacing} spacing"
        if sampler_module(self.sampler).USES_ETA:
            return f"{words}, eta {self.eta:g}"
        if sampler_module(self.sampler).READS_VARIANCE:
            return f"{words}, {self.variance} variance"
        return words


def parse_metadata(meta: dict[str, str], path: str) -> OnnxModelInfo:
    """The OnnxModelInfo of a file's metadata_props; OnnxFileError naming ``path`` if it is not
    a ddpm-fast file or not one this version reads."""
    if FORMAT_KEY not in meta:
        raise OnnxFileError(
            f"{path}: an ONNX file without ddpm-fast metadata (not written by `ddpm-fast export`)"
        )
    if meta[FORMAT_KEY] != FORMAT_VERSION:
        raise OnnxFileError(
            f"{path}: ddpm-fast ONNX format {meta[FORMAT_KEY]!r} (written by ddpm-fast "
            f"{meta.get('ddpm_fast_version', '?')}); this ddpm-fast reads format {FORMAT_VERSION}: "
            "export it again"
        )
    try:
        info = OnnxModelInfo(
            what=meta["what"],
            dtype=meta["dtype"],
            family=meta["family"],
            config=json.loads(meta["config"]),
            diffusion=json.loads(meta["diffusion"]),
            image_size=int(meta["image_size"]),
            channels=int(meta["channels"]),
            objective=meta["objective"],
            sampler=meta["sampler"],
            steps=int(meta["steps"]),
            eta=float(meta["eta"]),
            variance=meta["variance"],
            timestep_spacing=meta["timestep_spacing"],
            noise_steps=meta["noise_steps"],
            version=meta.get("ddpm_fast_version", "?"),
            tables=json.loads(meta["tables"]) if "tables" in meta else None,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise OnnxFileError(
            f"{path}: bad ddpm-fast metadata ({type(err).__name__}: {err})"
        ) from None
    problems = _inconsistencies(info)
    if problems:
        raise OnnxFileError(f"{path}: bad ddpm-fast metadata ({'; '.join(problems)})")
    return info


def expected_noise_steps(sampler: str, steps: int, eta: float) -> str:
    """Which steps of a chain add noise ("1") and which do not ("0"), as the sampler's module
    says (``StepTables.adds_noise``: a test checks they agree)."""
    return sampler_module(sampler).noise_steps(sampler, steps, eta)


def _inconsistencies(info: OnnxModelInfo) -> list[str]:
    """What in a file's metadata is out of range or contradicts the rest of it: everything a
    sampler reads must agree with the config and chain the file states (an edited file is
    refused, not sampled differently)."""
    problems = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    expect(info.what in WHATS, f"what={info.what!r}")
    expect(info.dtype in DTYPES, f"dtype={info.dtype!r}")
    expect(info.sampler in SAMPLERS, f"sampler={info.sampler!r}")
    expect(info.objective in OBJECTIVES, f"objective={info.objective!r}")
    expect(info.variance in VARIANCES, f"variance={info.variance!r}")
    expect(math.isfinite(info.eta) and info.eta >= 0, f"eta={info.eta!r}")
    expect(info.timestep_spacing in SPACINGS, f"timestep_spacing={info.timestep_spacing!r}")
    if info.sampler not in SAMPLERS:
        return problems  # what follows asks the sampler
    expect(
        info.eta == 0 or sampler_module(info.sampler).USES_ETA,
        f"eta {info.eta} with sampler {info.sampler}",
    )
    diffusion = info.diffusion if isinstance(info.diffusion, dict) else {}
    config = info.config if isinstance(info.config, dict) else {}
    schedule = diffusion.get("schedule") if isinstance(diffusion.get("schedule"), dict) else {}
    timesteps = schedule.get("timesteps")
    expect(
        isinstance(timesteps, int) and 1 <= timesteps <= MAX_TIMESTEPS,
        f"schedule timesteps {timesteps!r}",
    )
    if isinstance(timesteps, int):
        expect(1 <= info.steps <= timesteps, f"steps={info.steps} for {timesteps} timesteps")
    expect(0 < info.image_size <= MAX_IMAGE_SIZE, f"image_size={info.image_size}")
    expect(diffusion.get("image_size") == info.image_size, "image_size differs from diffusion's")
    expect(diffusion.get("objective") == info.objective, "objective differs from diffusion's")
    expect(  # absent in files written before it existed: True, the default
        isinstance(diffusion.get("auto_normalize", True), bool),
        f"auto_normalize={diffusion.get('auto_normalize')!r}",
    )
    expect(config.get("channels") == info.channels, "channels differ from the config's")
    expect(
        info.variance in (diffusion.get("variance"), "learned_range"),
        "variance differs from diffusion's",
    )
    expect(
        info.noise_steps == expected_noise_steps(info.sampler, info.steps, info.eta),
        "noise_steps does not match the chain",
    )
    if info.what == "unet":
        tables = info.tables
        expect(
            isinstance(tables, dict)
            and set(tables) == set(TABLE_NAMES)
            and all(
                isinstance(v, list)
                and len(v) == info.steps
                and all(isinstance(c, int | float) and math.isfinite(c) for c in v)
                for v in tables.values()
            ),
            "the coefficient tables are missing, not finite or do not match steps",
        )
        if not problems and isinstance(timesteps, int):
            t = tables["timesteps"]
            expect(
                all(isinstance(x, int) and 0 <= x < timesteps for x in t)
                and all(a >= b for a, b in pairwise(t)),
                "the table of timesteps is not non-increasing within the schedule",
            )
    return problems
