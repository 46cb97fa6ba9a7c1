"""A loaded model: reference network + schedule + how it was trained, and its ``sample`` method."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError
from .noise import check_seed, keyed_noise
from .samplers import OBJECTIVES, VARIANCES, SamplerSpec, StepTables, sample_loop, step_tables
from .schedule import Schedule, ScheduleConfig

DEFAULT_BATCH_SIZE = 64


@dataclass
class DiffusionConfig:
    """What a checkpoint of the libraries we read does not say about the network: image size,
    schedule, objective, DDPM variance."""

    image_size: int | None = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: str = "pred_v"
    variance: str = "fixed_small"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"unknown objective {self.objective!r}; known: {', '.join(OBJECTIVES)}"
            )
        if self.variance not in VARIANCES:
            raise ConfigError(f"unknown variance {self.variance!r}; known: {', '.join(VARIANCES)}")
        if self.image_size is not None and (
            not isinstance(self.image_size, int) or self.image_size < 1
        ):
            raise ConfigError(f"image_size must be a positive integer, got {self.image_size!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        d = dict(d)
        d["schedule"] = ScheduleConfig(**d["schedule"])
        return cls(**d)


def resolve_batch_size(num: int, batch_size: int | None) -> int:
    """The batch size ``sample`` uses: as given, else up to DEFAULT_BATCH_SIZE."""
    if batch_size is None:
        return min(num, DEFAULT_BATCH_SIZE)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def override_diffusion(diffusion: DiffusionConfig, options: dict) -> DiffusionConfig:
    """``diffusion`` with the options given (image_size, objective, variance, beta_schedule,
    timesteps, schedule_kwargs) put in."""
    schedule = diffusion.schedule
    if {"beta_schedule", "timesteps", "schedule_kwargs"} & set(options):
        schedule = ScheduleConfig(
            options.get("beta_schedule", schedule.name),
            options.get("timesteps", schedule.timesteps),
            options.get("schedule_kwargs", schedule.kwargs),
        )
    return DiffusionConfig(
        image_size=options.get("image_size", diffusion.image_size),
        schedule=schedule,
        objective=options.get("objective", diffusion.objective),
        variance=options.get("variance", diffusion.variance),
    )


class Pipeline:
    """A reference network with its schedule; ``sample`` draws images in [0, 1]."""

    def __init__(
        self,
        network: nn.Module,
        diffusion: DiffusionConfig,
        *,
        source: str = "",
        notes: tuple[str, ...] = (),
    ):
        self.network = network.eval().requires_grad_(False)
        self.diffusion = diffusion
        self.schedule = Schedule(diffusion.schedule)
        self.source = source
        self.notes = notes
        out = network.config.output_channels
        channels = network.config.channels
        if out not in (channels, 2 * channels):
            raise ConfigError(
                f"the network outputs {out} channels for {channels}-channel images; a sampler "
                f"needs {channels} (or {2 * channels} with learned variance)"
            )
        if diffusion.variance == "learned_range" and out != 2 * channels:
            raise ConfigError("variance 'learned_range' needs a network with learned_variance")

    @property
    def config(self):
        """The network's config (a dataclass that round-trips through ``to_dict``)."""
        return self.network.config

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters())

    def sampler_spec(self, sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0):
        """The chain ``sample`` runs for these arguments (steps default to the schedule's)."""
        steps = self.schedule.num_timesteps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise ConfigError(f"steps must be an integer, got {steps!r}")
        if not 1 <= steps <= self.schedule.num_timesteps:
            raise ConfigError(
                f"steps must be between 1 and the schedule's {self.schedule.num_timesteps}, "
                f"got {steps}"
            )
        variance = self.diffusion.variance
        if self.config.output_channels == 2 * self.config.channels and variance == "fixed_small":
            variance = "learned_range"
        return SamplerSpec(kind=sampler, steps=steps, eta=float(eta), variance=variance)

    def image_shape(self) -> tuple[int, int, int]:
        size = self.diffusion.image_size
        if size is None:
            raise ConfigError(
                f"the image size is not stored in {self.source or 'this model'}; "
                "pass image_size (CLI: --image-size)"
            )
        factor = self.config.downsample_factor
        if size % factor:
            raise ConfigError(f"image_size {size} is not a multiple of the network's {factor}")
        return (self.config.channels, size, size)

    @torch.no_grad()
    def sample_batches(
        self,
        num: int,
        *,
        steps: int | None = None,
        sampler: str = "ddpm",
        eta: float = 0.0,
        seed: int = 0,
        batch_size: int | None = None,
        initial_noise: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        start_index: int = 0,
        progress: bool = False,
    ) -> Iterator[tuple[range, torch.Tensor]]:
        """Yield (sample indices, images in [0, 1]) one batch at a time; see ``sample``."""
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ConfigError(f"the number of images must be a positive integer, got {num!r}")
        batch_size = resolve_batch_size(num, batch_size)
        check_seed(seed)
        spec = self.sampler_spec(sampler, steps, eta)
        device = torch.device(device) if device is not None else self.device
        self.network.to(device)
        if initial_noise is not None:
            shape = tuple(initial_noise.shape[1:])
            if initial_noise.ndim != 4 or initial_noise.shape[0] != num:
                raise ConfigError(
                    f"initial_noise must have shape [num={num}, C, H, W], got "
                    f"{list(initial_noise.shape)}"
                )
        else:
            shape = self.image_shape()
        if shape[0] != self.config.channels:
            raise ConfigError(f"the network takes {self.config.channels} channels, got {shape[0]}")
        tables = step_tables(self.schedule, spec)

        bar = tqdm(
            total=math.ceil(num / batch_size) * len(tables),
            desc="sampling",
            unit="step",
            disable=not progress,
        )
        with bar:
            for first in range(0, num, batch_size):
                rows = range(first, min(first + batch_size, num))
                indices = range(start_index + rows.start, start_index + rows.stop)

                if initial_noise is not None:
                    x = initial_noise[rows.start : rows.stop].to(device, torch.float32)
                else:
                    x = keyed_noise(seed, indices, 0, shape, device=device)
                x = self._run_chain(
                    x, tables, spec, seed=seed, indices=indices, on_step=lambda k: bar.update()
                )
                yield indices, (x + 1) * 0.5

    def _run_chain(
        self,
        x: torch.Tensor,
        tables: StepTables,
        spec: SamplerSpec,
        *,
        seed: int,
        indices: range,
        on_step: Callable[[int], None],
    ) -> torch.Tensor:
        """The reverse chain of one batch from x_T (on the device it runs on) to x_0: the
        reference loop. ``ddpm_fast.engine.Engine`` runs the same chain its own way."""

        def noise(step: int, batch_shape: tuple[int, ...]) -> torch.Tensor:
            return keyed_noise(seed, indices, step, batch_shape[1:], device=x.device)

        objective = self.diffusion.objective
        return sample_loop(
            self.network, x, tables, spec, objective, noise, on_step=lambda k, x: on_step(k)
        )

    def sample(
        self,
        num: int,
        *,
        steps: int | None = None,
        sampler: str = "ddpm",
        eta: float = 0.0,
        seed: int = 0,
        batch_size: int | None = None,
        initial_noise: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        start_index: int = 0,
        progress: bool = False,
    ) -> torch.Tensor:
        """Draw ``num`` images as an NCHW float32 tensor in [0, 1] (on the CPU).

        ``steps`` defaults to the schedule's length; ``sampler`` is "ddpm" or "ddim" (with
        ``eta``); ``batch_size`` defaults to up to 64; ``initial_noise`` [num, C, H, W] replaces
        the Philox x_T; image i uses the noise of sample ``start_index + i``, so it is the same
        image for a given seed whatever the batch size; ``progress`` shows a tqdm bar.
        """
        batches = self.sample_batches(
            num,
            steps=steps,
            sampler=sampler,
            eta=eta,
            seed=seed,
            batch_size=batch_size,
            initial_noise=initial_noise,
            device=device,
            start_index=start_index,
            progress=progress,
        )
        return torch.cat([images.cpu() for _, images in batches])
