"""The bench's ``diffusers`` backend: diffusers' own DDPMPipeline on a diffusers-unet2d model, and
the translation of a ddpm-fast schedule into DDPMScheduler's arguments (the inverse of
``ddpm_fast.diffusers_folder``'s reading). diffusers is the ``bench`` extra, imported only here.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models import diffusers_unet2d
from ..pipeline import DiffusionConfig, Pipeline


class DiffusersBackend:
    """``sample`` through diffusers' own DDPMPipeline (its ``unet`` + ``scheduler.step`` loop):
    its UNet2DModel built from the network's config holding the same weights, its DDPMScheduler
    from the same schedule, objective and variance, fp32. Only diffusers-unet2d models."""

    def __init__(self, pipeline: Pipeline, device: str):
        diffusers = import_diffusers()
        check_diffusers_model(pipeline)
        unet = diffusers.UNet2DModel(**diffusers_unet_config(pipeline))
        unet.load_state_dict(pipeline.network.state_dict(), strict=True)
        scheduler = diffusers.DDPMScheduler(**ddpm_scheduler_config(pipeline.diffusion))
        self.pipeline = diffusers.DDPMPipeline(unet=unet.eval(), scheduler=scheduler)
        self.pipeline.to(device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.device = device

    def sample(self, num, *, batch_size, steps, seed, device, sampler="ddpm"):
        return call_pipeline(self.pipeline, num, batch_size, steps, seed, device, sampler)


class FromDiffusersBackend:
    """``sample`` through ``ddpm_fast.from_diffusers`` around the ``diffusers`` backend's own
    DDPMPipeline object (the in-memory drop-in: its engine in the bench's dtype), called as that
    pipeline is called, with the same generator."""

    def __init__(self, pipeline: Pipeline, device: str, dtype: str, threads: int | None = None):
        from ..diffusers_pipeline import from_diffusers

        pipe = DiffusersBackend(pipeline, device).pipeline
        self.fast = from_diffusers(pipe, dtype=dtype, threads=threads)
        self.fast.set_progress_bar_config(disable=True)

    def sample(self, num, *, batch_size, steps, seed, device, sampler="ddpm"):
        return call_pipeline(self.fast, num, batch_size, steps, seed, device, sampler)


def call_pipeline(pipe, num, batch_size, steps, seed, device, sampler):
    """``pipe(...)`` as a DDPMPipeline is called, for one batch of ``num`` from a generator
    seeded with ``seed``: images NCHW in [0, 1]."""
    if sampler != "ddpm":
        raise ConfigError(f"the diffusers backends run DDPMPipeline: --sampler ddpm, not {sampler}")
    if batch_size != num:
        raise ConfigError("the diffusers backends sample one batch (batch_size = num)")
    generator = torch.Generator(device).manual_seed(seed)
    return pipe(
        batch_size=num, generator=generator, num_inference_steps=steps, output_type="pt"
    ).images


def import_diffusers():
    """The diffusers module, or one ConfigError naming the extra that installs it."""
    try:
        import diffusers
    except ImportError:
        raise ConfigError(
            "the diffusers backend needs diffusers: pip install 'ddpm-fast[bench]'"
        ) from None
    return diffusers


def check_diffusers_model(pipeline: Pipeline) -> None:
    """A ConfigError unless the pipeline's network is diffusers' UNet2DModel (its family)."""
    if pipeline.config.family != diffusers_unet2d.FAMILY:
        raise ConfigError(
            f"the diffusers backend runs {diffusers_unet2d.FAMILY} models (ddpm-cifar10, a "
            f"diffusers folder), not {pipeline.config.family}"
        )


def diffusers_unet_config(pipeline: Pipeline) -> dict:
    """UNet2DModel's constructor arguments for the network (its config fields are diffusers')."""
    config = pipeline.config.to_dict()
    for derived in ("family", "channels", "self_condition"):
        config.pop(derived)
    return {**config, "sample_size": pipeline.image_shape()[-1]}


def ddpm_scheduler_config(diffusion: DiffusionConfig) -> dict:
    """DDPMScheduler's arguments for ``diffusion``: the inverse of the folder reader's mapping
    (``ddpm_fast.diffusers_folder``); a ConfigError for a schedule diffusers does not have."""
    from ..diffusers_folder import BETA_SCHEDULES, PREDICTIONS

    schedule = diffusion.schedule
    config = {
        "num_train_timesteps": schedule.timesteps,
        "prediction_type": {v: k for k, v in PREDICTIONS.items()}[diffusion.objective],
        "variance_type": diffusion.variance,  # fixed_small, fixed_large, learned_range alike
        "clip_sample": True,
    }
    names = {v: k for k, v in BETA_SCHEDULES.items()}
    if schedule.name == "trained":
        return {**config, "trained_betas": list(schedule.kwargs["betas"])}
    if schedule.name not in names:
        raise ConfigError(
            f"the diffusers backend needs a diffusers beta schedule ({', '.join(names)}), "
            f"not {schedule.name}"
        )
    return {**config, "beta_schedule": names[schedule.name], **schedule.kwargs}
