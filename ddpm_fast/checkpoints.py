"""Reading, detecting, validating and converting checkpoints; ``load`` builds a Pipeline.

Formats read (the network's family is detected by ``ddpm_fast.models.detect``):
- denoising-diffusion-pytorch 1.x: a bare ``Unet`` state_dict, a ``GaussianDiffusion``
  state_dict (``model.`` prefix plus the schedule buffers), or a ``Trainer`` checkpoint
  (``{'step', 'model', 'ema', ...}``; EMA weights unless ``use_ema=False``);
- ddpm-fast's own safetensors file, whose metadata carries the network config, schedule and
  objective;
- a diffusers pipeline folder or bare UNet2DModel folder (:mod:`ddpm_fast.diffusers_folder`).

Nothing is unpickled beyond tensors and plain containers (``torch.load(weights_only=True)``);
every problem with a file is one ``CheckpointError`` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint_files import build_network, file_kind, listing, read_safetensors, read_torch
from .diffusers_folder import is_diffusers_folder, load_folder
from .errors import CheckpointError, ConfigError
from .files import temporary_name
from .models import FAMILIES, detect, family
from .pipeline import DiffusionConfig, Pipeline, override_diffusion
from .samplers import OBJECTIVES
from .schedule import Schedule, ScheduleConfig
from .version import __version__

FORMAT_KEY = "ddpm_fast_format"
FORMAT_VERSION = "1"

# Every family's network options, in the order the families list them.
UNET_OPTIONS = tuple(dict.fromkeys(o for m in FAMILIES.values() for o in m.OPTIONS))
DIFFUSION_OPTIONS = (
    "image_size",
    "beta_schedule",
    "timesteps",
    "schedule_kwargs",
    "objective",
    "variance",
    "auto_normalize",
)
# denoising-diffusion-pytorch 1.6.4 (the version the fixtures pin) when a file does not say.
LIBRARY_DEFAULT_OBJECTIVE = "pred_v"
LIBRARY_DEFAULT_SCHEDULE = "sigmoid"
LIBRARY_SCHEDULES = ("linear", "cosine", "sigmoid")  # denoising-diffusion-pytorch's
FORMAT_NAMES = {
    "unet": "a denoising-diffusion-pytorch Unet state_dict",
    "diffusion": "a denoising-diffusion-pytorch GaussianDiffusion state_dict",
    "trainer": "a denoising-diffusion-pytorch Trainer checkpoint",
    "ddpm-fast": "a ddpm-fast safetensors file",
}


@dataclass
class Checkpoint:
    """What a file holds, once its format is known."""

    path: Path
    format: str  # "unet", "diffusion", "trainer" or "ddpm-fast"
    weights: dict[str, torch.Tensor]  # the network's state_dict
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # GaussianDiffusion buffers
    metadata: dict[str, str] = field(default_factory=dict)
    library_version: str | None = None
    notes: list[str] = field(default_factory=list)


def _strip(prefix: str, state: dict) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _split_diffusion_state(path: Path, state: dict, where: str) -> tuple[dict, dict]:
    weights = _strip("model.", state)
    buffers = {k: v for k, v in state.items() if not k.startswith("model.")}
    if not weights:
        raise CheckpointError(f"{path}: {where} has no 'model.*' keys; not a GaussianDiffusion")
    return weights, buffers


def read_checkpoint(path: str | os.PathLike, *, use_ema: bool = True) -> Checkpoint:
    """Read ``path`` and find out which of the known formats it is."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise CheckpointError(f"{path}: not a regular file")
    if file_kind(path) == "safetensors":
        tensors, metadata = read_safetensors(path)
        if FORMAT_KEY not in metadata:
            fmt = "diffusion" if any(k.startswith("model.") for k in tensors) else "unet"
            ckpt = Checkpoint(path, fmt, tensors, metadata=metadata)
            if fmt == "diffusion":
                ckpt.weights, ckpt.buffers = _split_diffusion_state(path, tensors, "the file")
            return ckpt
        if metadata[FORMAT_KEY] != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: ddpm-fast safetensors format {metadata[FORMAT_KEY]!r} (written by "
                f"ddpm-fast {metadata.get('ddpm_fast_version', '?')}); this version reads format "
                f"{FORMAT_VERSION}"
            )
        return Checkpoint(path, "ddpm-fast", tensors, metadata=metadata)

    obj = read_torch(path)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict")
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        if any(k.startswith("model.") for k in obj):
            weights, buffers = _split_diffusion_state(path, obj, "the state_dict")
            return Checkpoint(path, "diffusion", weights, buffers)
        return Checkpoint(path, "unet", obj)
    if isinstance(obj.get("model"), dict):  # a Trainer checkpoint
        version = obj.get("version")
        version = version if isinstance(version, str) else None
        if use_ema:
            if not isinstance(obj.get("ema"), dict):
                raise CheckpointError(
                    f"{path}: a Trainer checkpoint without an 'ema' entry; use the online weights "
                    "(use_ema=False, CLI: --online)"
                )
            state = _strip("ema_model.", obj["ema"])
            if not state:
                raise CheckpointError(f"{path}: its 'ema' entry has no 'ema_model.*' keys")
            where = "the EMA model"
        else:
            state, where = obj["model"], "the 'model' entry"
        weights, buffers = _split_diffusion_state(path, state, where)
        note = f"{'EMA' if use_ema else 'online'} weights of a Trainer checkpoint"
        if isinstance(obj.get("step"), int):
            note += f" at step {obj['step']}"
        return Checkpoint(path, "trainer", weights, buffers, library_version=version, notes=[note])
    keys = [str(k) for k in obj]
    raise CheckpointError(
        f"{path}: not a checkpoint ddpm-fast knows (top-level keys: {listing(keys)})"
    )


def _check_buffers(path: Path, buffers: dict, schedule: Schedule) -> list[str]:
    """Names of the GaussianDiffusion buffers that disagree with ``schedule``'s tables."""
    wrong = []
    for name, table in schedule.library_buffers().items():
        stored = buffers.get(name)
        if stored is None:
            continue
        if stored.shape != table.shape or not torch.allclose(
            stored.to(torch.float32), table, rtol=1e-5, atol=1e-6
        ):
            wrong.append(name)
    return wrong


def _resolve_schedule(ckpt: Checkpoint, options: dict) -> ScheduleConfig:
    """The schedule chosen by options, else found in the file's buffers, else the default;
    checked against the buffers where the file has them."""
    kwargs = options.get("schedule_kwargs") or {}
    betas = ckpt.buffers.get("betas")
    stored_steps = len(betas) if betas is not None else None
    timesteps = options.get("timesteps") or stored_steps or 1000
    if "beta_schedule" in options:
        config = ScheduleConfig(options["beta_schedule"], timesteps, kwargs)
        wrong = _check_buffers(ckpt.path, ckpt.buffers, Schedule(config))
        if wrong:
            raise CheckpointError(
                f"{ckpt.path}: the stored schedule buffers ({listing(wrong)}) do not match the "
                f"{config.name} schedule over {timesteps} steps you chose"
            )
        return config
    if betas is None:
        return ScheduleConfig(LIBRARY_DEFAULT_SCHEDULE, timesteps, kwargs)
    if timesteps != stored_steps:
        raise CheckpointError(
            f"{ckpt.path}: its schedule has {stored_steps} timesteps, not {timesteps}"
        )
    for name in LIBRARY_SCHEDULES:
        config = ScheduleConfig(name, timesteps, kwargs)
        try:
            schedule = Schedule(config)
        except ConfigError:
            continue
        if not _check_buffers(ckpt.path, ckpt.buffers, schedule):
            return config
    raise CheckpointError(
        f"{ckpt.path}: its betas ({timesteps} steps) match none of the "
        f"{', '.join(LIBRARY_SCHEDULES)} schedules; pass beta_schedule and schedule_kwargs"
    )


def _read_loss_weight(buffers: dict, schedule: Schedule) -> tuple[str, float | None] | None:
    """(objective, min_snr_gamma) from the loss weight GaussianDiffusion >= 1.5 stores:
    min(snr, gamma) / snr (pred_noise), min(snr, gamma) (pred_x0) or min(snr, gamma) / (snr + 1)
    (pred_v), gamma = infinity (None here) unless it trained with min_snr_loss_weight. None where
    the buffer is absent or none of these."""
    stored = buffers.get("loss_weight")
    abar = schedule.alphas_cumprod
    snr = abar / (1 - abar)
    if stored is None or stored.shape != snr.shape:
        return None
    stored = stored.to(torch.float64)
    for objective, divisor in (("pred_noise", snr), ("pred_x0", 1.0), ("pred_v", snr + 1)):
        clipped = stored * divisor
        gamma = float(clipped.max())
        if torch.allclose(clipped, snr.clamp(max=gamma), rtol=1e-4, atol=1e-6):
            return objective, (gamma if gamma < float(snr.max()) * (1 - 1e-4) else None)
    return None


def _objective_from_loss_weight(buffers: dict, schedule: Schedule) -> str | None:
    """GaussianDiffusion >= 1.5 stores a loss weight that depends on the objective."""
    reading = _read_loss_weight(buffers, schedule)
    return reading[0] if reading else None


def _library_objective(version: str | None) -> str:
    """The GaussianDiffusion default of the library version that wrote the file."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version or "")
    if match and tuple(int(g) for g in match.groups()) < (1, 6, 3):
        return "pred_noise"
    return LIBRARY_DEFAULT_OBJECTIVE


def split_options(options: dict) -> tuple[dict, dict]:
    unknown = sorted(set(options) - set(UNET_OPTIONS) - set(DIFFUSION_OPTIONS))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)}; known: "
            f"{', '.join(UNET_OPTIONS + DIFFUSION_OPTIONS)}, use_ema, device"
        )
    given = {k: v for k, v in options.items() if v is not None}
    unet = {k: v for k, v in given.items() if k in UNET_OPTIONS}
    diffusion = {k: v for k, v in given.items() if k in DIFFUSION_OPTIONS}
    return unet, diffusion


def _pipeline_from_library(ckpt: Checkpoint, unet_options: dict, options: dict) -> Pipeline:
    fam = detect(ckpt.weights, str(ckpt.path))
    not_for = sorted(set(unet_options) - set(fam.OPTIONS))
    if not_for:
        raise ConfigError(
            f"{ckpt.path}: a {fam.FAMILY} network has no option {', '.join(not_for)} "
            f"(its options: {', '.join(fam.OPTIONS)})"
        )
    weights = fam.remap_keys(ckpt.weights)
    try:
        config = fam.infer_config(weights, **unet_options)
    except ConfigError as err:
        raise CheckpointError(f"{ckpt.path}: {err}") from None
    refuses = getattr(fam, "gaussian_diffusion_refuses", None)
    why = refuses(config) if refuses and ckpt.format in ("diffusion", "trainer") else None
    if why:
        raise CheckpointError(f"{ckpt.path}: looks like {FORMAT_NAMES[ckpt.format]}, but {why}")
    network = build_network(ckpt.path, fam, config, weights)
    own_diffusion = getattr(fam, "library_diffusion", None)
    if own_diffusion is not None:  # a family whose files come with their library's own flags
        if ckpt.format != "unet":
            raise CheckpointError(f"{ckpt.path}: a {fam.FAMILY} network in a {ckpt.format} file")
        try:
            fields_, notes = own_diffusion(weights, config, unet_options, options)
            diffusion = DiffusionConfig(**fields_)
        except ConfigError as err:
            raise CheckpointError(f"{ckpt.path}: {err}") from None
        return Pipeline(network, diffusion, source=str(ckpt.path), notes=(*notes, *ckpt.notes))

    notes = [f"read as {FORMAT_NAMES[ckpt.format]} ({fam.FAMILY})", *ckpt.notes]
    assumed = [f"{k}={v}" for k, v in fam.UNSTORED_DEFAULTS.items() if k not in unet_options]
    if assumed:
        notes.append(f"{', '.join(assumed)} assumed: the file cannot store them")
    schedule_config = _resolve_schedule(ckpt, options)
    if not ckpt.buffers and "beta_schedule" not in options:
        notes.append(f"schedule {schedule_config.name} assumed: the file does not store it")
    objective = options.get("objective")
    reading = _read_loss_weight(ckpt.buffers, Schedule(schedule_config))
    if reading and reading[1] is not None:
        notes.append(
            f"trained with min_snr_loss_weight (min_snr_gamma {reading[1]:.4g}, read from the "
            "loss_weight buffer): a training-only setting, sampling is the same"
        )
    if objective is None and reading:
        objective = reading[0]
    if objective is None:
        objective = _library_objective(ckpt.library_version)
        notes.append(f"objective {objective} assumed: the file does not store it")
    if "auto_normalize" not in options:
        notes.append(
            "auto_normalize=True assumed (images are (x + 1) / 2 of the chain's x): the library "
            "does not store it; --no-auto-normalize for a model trained on data in [0, 1]"
        )
    diffusion = DiffusionConfig(
        image_size=options.get("image_size"),
        schedule=schedule_config,
        objective=objective,
        variance=options.get("variance", "fixed_small"),
        auto_normalize=options.get("auto_normalize", True),
    )
    return Pipeline(network, diffusion, source=str(ckpt.path), notes=tuple(notes))


def _pipeline_from_own(ckpt: Checkpoint, unet_options: dict, options: dict) -> Pipeline:
    meta = ckpt.metadata
    if unet_options:
        raise ConfigError(
            f"{ckpt.path} stores its network config; {', '.join(unet_options)} cannot be overridden"
        )
    name = meta.get("family")
    if name not in FAMILIES:
        raise CheckpointError(f"{ckpt.path}: unknown model family {name!r}")
    fam = family(name)
    try:
        unet_config, diffusion = json.loads(meta["unet_config"]), json.loads(meta["diffusion"])
        if not isinstance(unet_config, dict):
            raise ConfigError(f"unet_config is a JSON {type(unet_config).__name__}, not an object")
        config = fam.UnetConfig.from_dict(unet_config)
        diffusion = DiffusionConfig.from_dict(diffusion)
        notes = json.loads(meta.get("notes", "[]"))
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise ConfigError("notes is not a list of strings")
    except (KeyError, TypeError, ValueError) as err:  # ConfigError is a ValueError
        raise CheckpointError(f"{ckpt.path}: bad ddpm-fast metadata ({err})") from None
    network = build_network(ckpt.path, fam, config, ckpt.weights)

    diffusion = override_diffusion(diffusion, options)
    return Pipeline(network, diffusion, source=str(ckpt.path), notes=tuple(notes))


def load_checkpoint(
    path: str | os.PathLike,
    *,
    use_ema: bool = True,
    device: torch.device | str | None = None,
    **options,
) -> Pipeline:
    """A Pipeline from any checkpoint ddpm-fast reads; ``options`` fill in or override what the
    file does not say (see UNET_OPTIONS and DIFFUSION_OPTIONS)."""
    unet_options, diffusion_options = split_options(options)
    if diffusion_options.get("objective", OBJECTIVES[0]) not in OBJECTIVES:
        raise ConfigError(f"unknown objective {diffusion_options['objective']!r}")
    if is_diffusers_folder(Path(path)):
        pipeline = load_folder(Path(path), unet_options, diffusion_options)
        if device is not None:
            pipeline.network.to(device)
        return pipeline
    ckpt = read_checkpoint(path, use_ema=use_ema)
    if ckpt.format == "ddpm-fast":
        pipeline = _pipeline_from_own(ckpt, unet_options, diffusion_options)
    else:
        pipeline = _pipeline_from_library(ckpt, unet_options, diffusion_options)
    if device is not None:
        pipeline.network.to(device)
    return pipeline


def save_pipeline(pipeline: Pipeline, path: str | os.PathLike) -> Path:
    """Write ``pipeline`` as a self-describing safetensors file (atomically)."""
    path = Path(path)
    metadata = {
        FORMAT_KEY: FORMAT_VERSION,
        "family": pipeline.config.family,
        "unet_config": json.dumps(pipeline.config.to_dict()),
        "diffusion": json.dumps(pipeline.diffusion.to_dict()),
        "notes": json.dumps(list(pipeline.notes)),
        "ddpm_fast_version": __version__,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in pipeline.network.state_dict().items()}
    tmp = temporary_name(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write ({err.strerror})") from None
    return path


def describe(pipeline: Pipeline) -> dict:
    """What ``ddpm-fast info`` prints."""
    config = pipeline.config
    return {
        "source": pipeline.source,
        "family": config.family,
        "parameters": pipeline.num_parameters(),
        "network": {f.name: getattr(config, f.name) for f in fields(config) if f.init},
        "diffusion": pipeline.diffusion.to_dict(),
        "notes": list(pipeline.notes),
    }
