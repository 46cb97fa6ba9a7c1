"""diffusers folders, read without diffusers: a pipeline folder as ``save_pretrained`` writes it
(model_index.json, unet/, scheduler/) or a bare UNet2DModel folder (config.json and
diffusion_pytorch_model.safetensors or .bin), whose scheduler options come from the caller.

The scheduler's config (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler) maps onto a
DiffusionConfig:

=====================  ==========================================================
beta_schedule          linear, scaled_linear, squaredcos_cap_v2, sigmoid -> the
                       ``diffusers_*`` schedules (their float32 betas); trained_betas
                       -> ``trained``
prediction_type        epsilon -> pred_noise, v_prediction -> pred_v, sample -> pred_x0
variance_type          fixed_small (= fixed_small_log), fixed_large, learned_range
clip_sample            true (x0 clipped to [-clip_sample_range, clip_sample_range]) or
                       false (not clipped)
timestep_spacing       leading (the default), linspace, trailing, with steps_offset:
                       the timesteps a chain of fewer steps visits, as diffusers
set_alpha_to_one       true (DDIM's last step returns x0)
rescale_betas_zero_snr the betas rescaled (float32, as diffusers): abar_T = 0 (2**-24 for
                       DPM-Solver, as diffusers); pred_noise cannot step from t = T - 1
algorithm_type         DPM-Solver: dpmsolver++ -> dpm++2m, sde-dpmsolver++ -> dpm++2m-sde
                       (-karras with use_karras_sigmas); solver_order 2, midpoint,
                       final_sigmas_type zero, no other sigmas (``DPM_REQUIRED``)
=====================  ==========================================================

A DDIMScheduler folder samples with DDIM by default (its pipeline's), a DDPMScheduler folder with
DDPM, a DPMSolverMultistepScheduler folder with its dpm++2m variant (default spacing linspace, x0
not clipped). DDIM steps with the network's own eps (diffusers' ``use_clipped_model_output=False``),
not one re-derived from the clipped x0. Anything else (dynamic thresholding, another scheduler
class, ...) is a ConfigError naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint_files import build_network, read_safetensors, read_torch
from .errors import CheckpointError, ConfigError
from .files import read_regular_file
from .models import diffusers_unet2d
from .pipeline import DiffusionConfig, Pipeline, override_diffusion
from .samplers import SPACINGS
from .schedule import ScheduleConfig

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler")
# DPMSolverMultistepScheduler: algorithm_type -> ddpm-fast's sampler (with -karras for
# use_karras_sigmas), and the options that must have these values for ddpm-fast's DPM-Solver++(2M)
# to be diffusers' (solver_order 1 or 3, another algorithm, other sigmas are other solvers).
DPM_ALGORITHMS = {"dpmsolver++": "dpm++2m", "sde-dpmsolver++": "dpm++2m-sde"}
DPM_REQUIRED = {
    "solver_order": 2,
    "solver_type": "midpoint",
    "final_sigmas_type": "zero",
    "euler_at_final": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
}
PIPELINES = ("DDPMPipeline", "DDIMPipeline")
BETA_SCHEDULES = {
    "linear": "diffusers_linear",
    "scaled_linear": "diffusers_scaled_linear",
    "squaredcos_cap_v2": "diffusers_squaredcos_cap_v2",
    "sigmoid": "diffusers_sigmoid",
}
PREDICTIONS = {"epsilon": "pred_noise", "v_prediction": "pred_v", "sample": "pred_x0"}
VARIANCES = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",  # exp(0.5 log var): the same sigma
    "fixed_large": "fixed_large",
    "learned_range": "learned_range",
}
# DDPMScheduler's defaults: what a bare UNet folder is sampled with when nothing is given.
DEFAULT_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
}


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or _has_unet(path))


def _has_unet(path: Path) -> bool:
    return (path / "config.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(read_regular_file(path))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a JSON {type(data).__name__}, not an object")
    return data


def read_unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state_dict of a UNet folder: .safetensors, else .bin (weights_only)."""
    for index in folder.glob("diffusion_pytorch_model*.index.json"):
        raise CheckpointError(f"{index}: sharded weights are not supported; merge the shards")
    for name in WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            return read_safetensors(path)[0]
        state = read_torch(path)
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise CheckpointError(f"{path}: not a state_dict of tensors")
        return state
    raise CheckpointError(f"{folder}: no {' or '.join(WEIGHTS)}")


def schedule_from_scheduler(where: str, config: dict) -> tuple[DiffusionConfig, list[str]]:
    """The DiffusionConfig of a DDPMScheduler/DDIMScheduler config, and notes on it; a
    ConfigError naming ``where`` and the field for anything ddpm-fast does not sample with."""

    def bad(field: str, why: str = "is not supported") -> ConfigError:
        return ConfigError(f"{where}: {field}={config.get(field)!r} {why}")

    kind = config.get("_class_name", "DDPMScheduler")
    if kind not in SCHEDULERS:
        raise bad("_class_name", f"is not supported (known: {', '.join(SCHEDULERS)})")
    steps = config.get("num_train_timesteps", 1000)
    rescale = config.get("rescale_betas_zero_snr", False)
    if not isinstance(rescale, bool):
        raise bad("rescale_betas_zero_snr", "is not true or false")
    zero_snr = {"rescale_zero_snr": 1} if rescale else {}
    if config.get("trained_betas") is not None:
        betas = {"betas": list(config["trained_betas"])}
        schedule = ScheduleConfig("trained", steps, betas | zero_snr)
    else:
        name = config.get("beta_schedule", "linear")
        if name not in BETA_SCHEDULES:
            raise bad("beta_schedule", f"is not supported (known: {', '.join(BETA_SCHEDULES)})")
        kwargs = {}
        if name != "squaredcos_cap_v2":
            kwargs = {
                "beta_start": config.get("beta_start", 0.0001),
                "beta_end": config.get("beta_end", 0.02),
            }
        schedule = ScheduleConfig(BETA_SCHEDULES[name], steps, kwargs | zero_snr)
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise bad("prediction_type", f"is not supported (known: {', '.join(PREDICTIONS)})")
    dpm = kind == "DPMSolverMultistepScheduler"
    sampler = "ddim" if kind == "DDIMScheduler" else None
    if dpm:
        for field, value in DPM_REQUIRED.items():
            if config.get(field, value) != value:
                raise bad(field, f"is not supported (ddpm-fast's DPM-Solver++(2M) needs {value!r})")
        algorithm = config.get("algorithm_type", "dpmsolver++")
        if algorithm not in DPM_ALGORITHMS:
            raise bad("algorithm_type", f"is not supported (known: {', '.join(DPM_ALGORITHMS)})")
        karras = config.get("use_karras_sigmas", False)
        if not isinstance(karras, bool):
            raise bad("use_karras_sigmas", "is not true or false")
        sampler = DPM_ALGORITHMS[algorithm] + ("-karras" if karras else "")
    variance = "fixed_small"
    if kind == "DDPMScheduler":
        variance = config.get("variance_type", "fixed_small")
        if variance not in VARIANCES:
            raise bad("variance_type", f"is not supported (known: {', '.join(VARIANCES)})")
        variance = VARIANCES[variance]
    clip = config.get("clip_sample", not dpm)  # DPM-Solver never clips (it only thresholds)
    if not isinstance(clip, bool):
        raise bad("clip_sample", "is not true or false")
    clip_range = config.get("clip_sample_range", 1.0)
    if isinstance(clip_range, bool) or not isinstance(clip_range, int | float) or clip_range <= 0:
        raise bad("clip_sample_range", "is not a positive number")
    if config.get("thresholding", False):
        raise bad(
            "thresholding",
            "is not supported (dynamic thresholding clips x0 at a per-sample quantile, which "
            "ddpm-fast's elementwise step cannot do)",
        )
    if kind == "DDIMScheduler" and config.get("set_alpha_to_one", True) is not True:
        raise bad("set_alpha_to_one", "is not supported (DDIM's last step returns x0)")
    spacing = config.get("timestep_spacing", "linspace" if dpm else "leading")
    if spacing not in SPACINGS or spacing == "library":
        raise bad("timestep_spacing", "is not supported (known: linspace, leading, trailing)")
    offset = config.get("steps_offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise bad("steps_offset", "is not a whole number >= 0")
    diffusion = DiffusionConfig(
        schedule=schedule,
        objective=PREDICTIONS[prediction],
        variance=variance,
        sampler=sampler,
        timestep_spacing=spacing,
        steps_offset=offset,
        clip_x0=clip,
        clip_range=float(clip_range),
        eps_from_clipped_x0=False,
    )
    clipping = f"clip_sample true (range {clip_range:g})" if clip else "clip_sample false"
    if dpm:
        clipping = f"x0 not clipped; samples with {sampler} by default"
    notes = [
        f"{kind}: beta_schedule {config.get('beta_schedule', 'linear')}"
        f"{' (trained_betas)' if schedule.name == 'trained' else ''}, prediction_type "
        f"{prediction}, variance {variance}, {clipping}",
        f"timestep_spacing {spacing}, steps_offset {offset}: the timesteps of chains of fewer "
        f"than {steps} steps, as diffusers'",
    ]
    return diffusion, notes


def load_folder(path: Path, unet_options: dict, options: dict) -> Pipeline:
    """A Pipeline from a diffusers pipeline folder or bare UNet2DModel folder."""
    check_no_unet_options(str(path), unet_options)
    notes = []
    scheduler = None
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        kind = index.get("_class_name")
        if kind not in PIPELINES:
            raise CheckpointError(
                f"{path / 'model_index.json'}: _class_name {kind!r} is not supported "
                f"(known: {', '.join(PIPELINES)})"
            )
        unet_dir = path / "unet"
        scheduler_file = path / "scheduler" / "scheduler_config.json"
        if not scheduler_file.is_file():
            raise CheckpointError(f"{path}: no scheduler/scheduler_config.json")
        scheduler = _read_json(scheduler_file)
        notes.append(f"read as a diffusers {kind} folder ({diffusers_unet2d.FAMILY})")
        where = str(scheduler_file)
    else:
        unet_dir = path
        notes.append(f"read as a diffusers UNet2DModel folder ({diffusers_unet2d.FAMILY})")
        where = f"{path} (scheduler)"
    if not (unet_dir / "config.json").is_file():
        raise CheckpointError(f"{unet_dir}: no config.json")
    return pipeline_from_parts(
        _read_json(unet_dir / "config.json"),
        read_unet_weights(unet_dir),
        scheduler,
        unet_where=str(unet_dir / "config.json"),
        scheduler_where=where,
        options=options,
        source=str(path),
        notes=notes,
    )


def check_no_unet_options(where: str, unet_options: dict) -> None:
    """A UNet2DModel's config says every network option: none can be given."""
    if unet_options:
        raise ConfigError(
            f"{where}: a {diffusers_unet2d.FAMILY} model's config says {', '.join(unet_options)}; "
            "they cannot be given"
        )


def pipeline_from_parts(
    unet_config: dict,
    weights: dict[str, torch.Tensor],
    scheduler: dict | None,
    *,
    unet_where: str,
    scheduler_where: str,
    options: dict,
    source: str,
    notes: list[str],
) -> Pipeline:
    """A Pipeline from a UNet2DModel's config and state_dict and a scheduler's config (None:
    DDPMScheduler's defaults), wherever they come from: a folder (``load_folder``) or diffusers
    objects in memory (``ddpm_fast.from_diffusers``). ``unet_where`` and ``scheduler_where``
    name them in errors."""
    family = diffusers_unet2d
    weights = family.remap_keys(weights)
    try:
        config = family.infer_config(weights, unet_config=unet_config)
    except ConfigError as err:
        raise CheckpointError(f"{unet_where}: {err}") from None
    network = build_network(Path(unet_where).parent, family, config, weights)
    notes = list(notes)
    if scheduler is None:
        diffusion, _ = schedule_from_scheduler(scheduler_where, DEFAULT_SCHEDULER)
        defaults = {
            "beta_schedule": "linear betas 1e-4 to 0.02 over 1000 steps",
            "objective": "pred_noise (epsilon)",
            "variance": "fixed_small",
        }
        assumed = [v for k, v in defaults.items() if k not in options]
        if assumed:
            notes.append(
                "no scheduler in the folder: DDPMScheduler's defaults assumed: "
                + ", ".join(assumed)
            )
    else:
        diffusion, scheduler_notes = schedule_from_scheduler(scheduler_where, scheduler)
        notes.extend(scheduler_notes)
    size = unet_config.get("sample_size")
    if isinstance(size, list | tuple) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if size is not None and not isinstance(size, int):
        raise CheckpointError(f"{unet_where}: sample_size {size!r} is not square")
    diffusion.image_size = size
    diffusion = override_diffusion(DiffusionConfig.from_dict(diffusion.to_dict()), options)
    return Pipeline(network, diffusion, source=source, notes=tuple(notes))
