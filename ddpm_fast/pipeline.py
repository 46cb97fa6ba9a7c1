"""A loaded model: reference network + schedule + how it was trained, and its ``sample`` method."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint_files import weights_sha256
from .class_labels import check_labels, labels_for, run_labels
from .errors import ConfigError, NonFiniteError
from .generator_noise import GeneratorNoise, check_generators, generator_noise, resolve_noise
from .guidance import check_guidance, check_guided_chain, step_gradients
from .images import chain_to_images
from .noise import keyed_noise
from .options import (
    DEFAULT_BATCH_SIZE,
    MAX_IMAGE_SIZE,
    OBJECTIVES,
    VARIANCES,
    check_choice,
    check_int,
    check_real,
    check_seed,
    resolve_batch_size,
)
from .output import Group, Output, write_samples
from .samplers import (
    SAMPLERS,
    SPACINGS,
    SamplerSpec,
    StepTables,
    check_chain,
    sample_loop,
    step_tables,
)
from .samplers.spacing import model_spacing, parse_respacing
from .schedule import Schedule, ScheduleConfig

__all__ = ["DEFAULT_BATCH_SIZE", "DiffusionConfig", "Pipeline", "resolve_batch_size"]
# x_T is standard normal noise; a value this large is a mistake (its chain overflows).
MAX_INITIAL_NOISE = 1e3


@dataclass
class DiffusionConfig:
    """What a checkpoint of the libraries we read does not say about the network: image size,
    schedule, objective, DDPM variance, and how the model's own scheduler runs its chains."""

    image_size: int | None = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: str = "pred_v"
    variance: str = "fixed_small"
    # auto_normalize: images are (x + 1) / 2 of the chain's x (True, the libraries' default), or
    # x itself (False: trained on data in [0, 1]), clamped to [0, 1]; see images.chain_to_images.
    auto_normalize: bool = True
    # The chain defaults of the model's own scheduler (a diffusers scheduler_config.json); the
    # defaults are denoising-diffusion-pytorch's. ``to_dict`` leaves these and auto_normalize out
    # at their default, so files, run manifests (a resume's model identity) and ONNX metadata of
    # models without them are unchanged.
    sampler: str | None = None  # the sampler when none is asked for (None: ddpm)
    timestep_spacing: str | None = None  # None: the sampler's own default
    steps_offset: int = 0  # diffusers' offset of the leading spacing
    clip_x0: bool = True  # x0 clipped to [-clip_range, clip_range]
    clip_range: float = 1.0
    eps_from_clipped_x0: bool = True  # DDIM's eps: from the clipped x0, else the network's own

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("variance", self.variance, VARIANCES)
        if not isinstance(self.auto_normalize, bool):
            raise ConfigError(f"auto_normalize must be true or false, got {self.auto_normalize!r}")
        self._check_chain_defaults()
        if not isinstance(self.schedule, ScheduleConfig):
            raise ConfigError(f"schedule must be a ScheduleConfig, got {self.schedule!r}")
        if self.image_size is not None:
            self.image_size = check_int(
                "image_size", self.image_size, minimum=1, maximum=MAX_IMAGE_SIZE
            )

    def _check_chain_defaults(self) -> None:
        if self.sampler is not None:
            self.sampler = check_choice("sampler", self.sampler, SAMPLERS)
        if self.timestep_spacing is not None:
            self.timestep_spacing = check_choice(
                "timestep_spacing", self.timestep_spacing, SPACINGS
            )
        self.steps_offset = check_int("steps_offset", self.steps_offset, minimum=0)
        for name in ("clip_x0", "eps_from_clipped_x0"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self.clip_range = check_real("clip_range", self.clip_range, minimum=0.0)
        if not self.clip_range > 0:
            raise ConfigError(f"clip_range must be positive, got {self.clip_range!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = self.schedule.to_dict()
        for f in fields(self):
            if f.name in LEFT_OUT_AT_DEFAULT and d[f.name] == f.default:
                del d[f.name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        """The config saved by ``to_dict``; ConfigError for anything of another shape (a file
        without the chain defaults gets denoising-diffusion-pytorch's)."""
        names = {"image_size", "schedule", "objective", "variance", *LEFT_OUT_AT_DEFAULT}
        if not isinstance(d, dict) or not set(d) <= names or "schedule" not in d:
            raise ConfigError(f"a diffusion config is a dict with keys {sorted(names)}, got {d!r}")
        schedule = d["schedule"]
        if not isinstance(schedule, dict) or not set(schedule) <= {"name", "timesteps", "kwargs"}:
            raise ConfigError(f"a schedule is a dict of name, timesteps, kwargs; got {schedule!r}")
        return cls(**{**d, "schedule": ScheduleConfig(**schedule)})


CHAIN_DEFAULTS = (
    "sampler",
    "timestep_spacing",
    "steps_offset",
    "clip_x0",
    "clip_range",
    "eps_from_clipped_x0",
)
LEFT_OUT_AT_DEFAULT = ("auto_normalize", *CHAIN_DEFAULTS)


def resolve_device(device: torch.device | str | None, default: torch.device) -> torch.device:
    """The device to sample on: ``default`` for None, else a CPU or an available CUDA device;
    anything else is a ConfigError (a "meta" or unknown device cannot hold the chain)."""
    if device is None:
        return default
    if not isinstance(device, str | torch.device):
        raise ConfigError(f"device must be a string such as 'cpu' or 'cuda:0', got {device!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r} (try cpu or cuda)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {str(device)!r} asked for, but there are {torch.cuda.device_count()} "
                "CUDA devices"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ConfigError(f"ddpm-fast samples on cpu or cuda devices, not {str(device)!r}")
    return device


def check_initial_noise(initial_noise, num: int, channels: int) -> tuple[int, int, int]:
    """The image shape of a user's x_T [num, C, H, W]: a real, finite float tensor."""
    if not isinstance(initial_noise, torch.Tensor):
        raise ConfigError(
            f"initial_noise must be a torch.Tensor [num, C, H, W], got "
            f"{type(initial_noise).__name__}"
        )
    if initial_noise.ndim != 4 or initial_noise.shape[0] != num:
        raise ConfigError(
            f"initial_noise must have shape [num={num}, C, H, W], got {list(initial_noise.shape)}"
        )
    if not initial_noise.is_floating_point():
        raise ConfigError(f"initial_noise must be a float tensor, got {initial_noise.dtype}")
    if initial_noise.shape[1] != channels:
        raise ConfigError(
            f"the network takes {channels} channels, initial_noise has {initial_noise.shape[1]}"
        )
    largest = float(initial_noise.detach().abs().max()) if initial_noise.numel() else 0.0
    if not math.isfinite(largest):
        raise ConfigError("initial_noise holds NaN or infinite values")
    if largest > MAX_INITIAL_NOISE:
        raise ConfigError(
            f"initial_noise reaches {largest:.3g}; x_T is standard normal noise (at most "
            f"{MAX_INITIAL_NOISE:g} in magnitude is accepted)"
        )
    return tuple(initial_noise.shape[1:])


def check_finite(images: torch.Tensor, indices: range) -> None:
    """NonFiniteError naming the samples of a batch whose output is not finite (one host sync
    per batch, none per step)."""
    bad = ~torch.isfinite(images.flatten(1)).all(dim=1)
    if bool(bad.any()):
        raise NonFiniteError.in_chain(indices, bad.nonzero().flatten().tolist())


def override_diffusion(diffusion: DiffusionConfig, options: dict) -> DiffusionConfig:
    """``diffusion`` with the options given (image_size, objective, variance, beta_schedule,
    timesteps, schedule_kwargs, auto_normalize) put in."""
    schedule = diffusion.schedule
    if {"beta_schedule", "timesteps", "schedule_kwargs"} & set(options):
        schedule = ScheduleConfig(
            options.get("beta_schedule", schedule.name),
            options.get("timesteps", schedule.timesteps),
            options.get("schedule_kwargs", schedule.kwargs),
        )
    return replace(
        diffusion,
        image_size=options.get("image_size", diffusion.image_size),
        schedule=schedule,
        objective=options.get("objective", diffusion.objective),
        variance=options.get("variance", diffusion.variance),
        auto_normalize=options.get("auto_normalize", diffusion.auto_normalize),
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

    backend = "reference"  # what runs the chain, as a run manifest records it
    precision = "fp32"
    # noise="torch-generator" draws x_T (and DDPM's and DDIM's noise) in this dtype, as diffusers
    # draws in its unet's (``from_diffusers`` sets it to the pipeline's unet's).
    generator_dtype = torch.float32

    @property
    def config(self):
        """The network's config (a dataclass that round-trips through ``to_dict``)."""
        return self.network.config

    @property
    def num_classes(self) -> int | None:
        """The number of classes of a class-conditional network, else None."""
        return self.network.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def guided_classes(self, classifier, classifier_scale, image_shape) -> tuple[int | None, float]:
        """(the class count labels are drawn from, the checked scale): the classifier's where
        one guides the chain (an unconditional model takes labels for it only), else the
        model's."""
        if classifier is None:
            return self.num_classes, classifier_scale
        where = self.source or "this model"
        scale = check_guidance(classifier, classifier_scale, image_shape, self.num_classes, where)
        return classifier.num_classes, scale

    def classifier_timestep_scale(self) -> float:
        """What the library multiplies the timesteps it gives a classifier by: the model's own
        (an ADM network's ``timestep_scale`` where it rescales timesteps; 1 for every other
        family); the timesteps are the original ones of a respaced chain."""
        return getattr(self.config, "timestep_scale", 1.0)

    def _guidance(self, classifier, scale, tables, labels):
        """The chain's classifier gradients ``gradient(x, k)``, None unguided."""
        if classifier is None:
            return None
        t_scale = self.classifier_timestep_scale()
        return step_gradients(classifier, scale, tables.timesteps, t_scale, labels)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters())

    def sampler_spec(
        self,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float = 0.0,
        timestep_spacing: str | None = None,
        timestep_respacing: str | None = None,
    ):
        """The chain ``sample`` runs for these arguments: the sampler defaults to the model's
        (``diffusion.sampler``, else ddpm), steps to the schedule's, ``timestep_spacing`` to the
        model's (``samplers.spacing.model_spacing``), else the sampler's; offset, clipping and
        DDIM's eps are the model's. ``timestep_respacing``: OpenAI's libraries' string ("250",
        "ddim25", "10,15,20"), which sets steps and spacing (an error where those are also
        given and differ)."""
        d = self.diffusion
        if sampler is None:
            sampler = d.sampler or "ddpm"
        sampler, eta = check_chain(sampler, eta)
        total = self.schedule.num_timesteps
        sections: tuple[int, ...] = ()
        if timestep_respacing is not None:
            n, spacing, sections = parse_respacing(timestep_respacing, total)
            implied = (("steps", steps, n), ("timestep_spacing", timestep_spacing, spacing))
            for name, given, value in implied:
                if given is not None and given != value:
                    raise ConfigError(
                        f"timestep_respacing {timestep_respacing!r} means {name} {value}, "
                        f"but {name} {given!r} is given too"
                    )
            steps, timestep_spacing = n, spacing
            sections = sections if len(sections) > 1 else ()
        if timestep_spacing is None:
            timestep_spacing = model_spacing(sampler, d.timestep_spacing)
        if steps is None:
            steps = total
        steps = check_int("steps", steps, minimum=1)
        if steps > total:
            raise ConfigError(f"steps must be between 1 and the schedule's {total}, got {steps}")
        variance = self.diffusion.variance
        if self.config.output_channels == 2 * self.config.channels and variance == "fixed_small":
            variance = "learned_range"
        return SamplerSpec(
            kind=sampler,
            steps=steps,
            eta=eta,
            variance=variance,
            timestep_spacing=timestep_spacing,
            steps_offset=d.steps_offset,
            clip_x0=d.clip_x0,
            clip_range=d.clip_range,
            eps_from_clipped_x0=d.eps_from_clipped_x0,
            section_counts=sections,
        )

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
        sampler: str | None = None,
        eta: float = 0.0,
        timestep_spacing: str | None = None,
        timestep_respacing: str | None = None,
        class_labels=None,
        seed: int = 0,
        batch_size: int | None = None,
        initial_noise: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        start_index: int = 0,
        progress: bool | dict = False,
        noise: str | None = None,
        generator=None,
        classifier=None,
        classifier_scale: float = 1.0,
    ) -> Iterator[tuple[range, torch.Tensor]]:
        """Yield (sample indices, images in [0, 1]) one batch at a time; see ``sample``."""
        num = check_int("the number of images", num, minimum=1)
        seed = check_seed(check_int("seed", seed))
        noise = resolve_noise(noise, generator)
        if noise == "torch-generator":
            if initial_noise is not None:
                raise ConfigError("initial_noise replaces the noise; give it or a generator")
            if start_index:
                raise ConfigError(
                    "start_index picks samples of the Philox stream; a generator's stream has "
                    "no indices (use noise='philox')"
                )
            generator = check_generators(generator, num, seed)
            batch_size = num if batch_size is None else batch_size  # diffusers: one batch
        batch_size = resolve_batch_size(num, batch_size)
        # Sample indices are the high 32 bits of the Philox key.
        start_index = check_int("start_index", start_index, minimum=0, maximum=2**32 - num)
        spec = self.sampler_spec(sampler, steps, eta, timestep_spacing, timestep_respacing)
        device = resolve_device(device, self.device)
        if initial_noise is not None:
            shape = check_initial_noise(initial_noise, num, self.config.channels)
            factor = self.config.downsample_factor
            if shape[1] % factor or shape[2] % factor:
                raise ConfigError(
                    f"initial_noise is {shape[1]}x{shape[2]}; the network needs multiples of "
                    f"{factor}"
                )
        else:
            shape = self.image_shape()
        classes, classifier_scale = self.guided_classes(classifier, classifier_scale, shape)
        labels = check_labels(class_labels, num, classes, self.source or "this model")
        tables = step_tables(self.schedule, spec)
        if classifier is not None:
            check_guided_chain(tables, spec)
        chain = self if device == self.device else self._on_device(device)

        bar_options = progress if isinstance(progress, dict) else {"disable": not progress}
        bar = tqdm(
            **{"desc": "sampling", "unit": "step", **bar_options},
            total=math.ceil(num / batch_size) * len(tables),
        )
        with bar:
            for first in range(0, num, batch_size):
                rows = range(first, min(first + batch_size, num))
                indices = range(start_index + rows.start, start_index + rows.stop)

                stream = None
                if initial_noise is not None:
                    x = initial_noise[rows.start : rows.stop].to(device, torch.float32)
                elif noise == "torch-generator":
                    stream = generator_noise(
                        generator, rows, shape, tables, spec, self.generator_dtype, device
                    )
                    x = stream.initial()
                else:
                    x = chain._initial_noise(seed, indices, shape, device)
                batch_labels = labels_for(labels, seed, indices, rows.start, classes)
                if batch_labels is not None:
                    batch_labels = torch.tensor(batch_labels, dtype=torch.int64, device=device)
                guidance = self._guidance(classifier, classifier_scale, tables, batch_labels)
                x = chain._run_chain(
                    x, tables, spec, seed=seed, indices=indices, on_step=lambda k: bar.update(),
                    class_labels=batch_labels if self.num_classes is not None else None,
                    noise=stream, guidance=guidance,
                )  # fmt: skip
                if stream is not None:
                    stream.finish()
                check_finite(x, indices)
                yield indices, chain_to_images(x, self.diffusion.auto_normalize)

    def identity(self) -> dict:
        """What fixes this model's images: a hash of its weights, and its config."""
        config = self.config
        return {
            "weights_sha256": weights_sha256(self.network),
            "family": config.family,
            "network": config.to_dict(),
            "diffusion": self.diffusion.to_dict(),
        }

    def run_identity(self, spec: SamplerSpec, device: torch.device) -> dict:
        """What an output records of a run of ``spec`` on ``device`` but its seed (``sample_to``
        adds it): a rerun that differs is refused."""
        return {
            "model": self.identity(),
            "backend": self.backend,
            "dtype": self.precision,
            "device": device.type,
            "sampler": spec.kind,
            "steps": spec.steps,
            "eta": spec.eta,
            "timestep_spacing": spec.timestep_spacing,
            "image_shape": list(self.image_shape()),
            # OpenAI's multi-section respacing ("10,15,20"); absent for every other chain.
            **({"section_counts": list(spec.section_counts)} if spec.section_counts else {}),
        }

    def auto_batch_size(self, num: int, device: torch.device | str | None = None) -> int:
        """The largest batch that fits the device's free memory (measured by one trial forward
        at batch 4, with 20% to spare), at most 1024 and ``num``; on the CPU, up to 64."""
        device = resolve_device(device, self.device)
        if device.type != "cuda":
            return min(num, DEFAULT_BATCH_SIZE)
        chain = self if device == self.device else self._on_device(device)
        trial = 4
        x = torch.zeros(trial, *self.image_shape(), device=device)
        t = torch.zeros(trial, dtype=torch.long, device=device)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            labels = {} if self.num_classes is None else {"class_labels": t}
            chain.network(
                x, t, torch.zeros_like(x) if self.config.self_condition else None, **labels
            )
        per_image = max(1, (torch.cuda.max_memory_allocated(device) - base) // trial)
        free = torch.cuda.mem_get_info(device)[0]
        return max(1, min(num, 1024, int(0.8 * free // per_image)))

    def sample_to(
        self,
        path: str | os.PathLike,
        num: int,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        eta: float = 0.0,
        timestep_spacing: str | None = None,
        timestep_respacing: str | None = None,
        class_labels=None,
        seed: int = 0,
        batch_size: int | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        keep_shards: bool = False,
        classifier=None,
        classifier_scale: float = 1.0,
        group: Group | None = None,
        say: Callable[[str], None] = lambda message: None,
    ) -> Output:
        """Draw ``num`` images into ``path`` (a .png grid, an .npz or a folder) with the CLI's
        guarantees: checked before sampling, resumable, never mixing runs, atomic, nothing
        non-finite written (see ``ddpm_fast.output``). ``batch_size="auto"``: as large as the
        device takes. Under torch.distributed (torchrun) every rank calls it with the same
        arguments on its own device; ``group`` defaults to that process group."""
        from .distributed import current_group

        output = Output(path)
        num = check_int("the number of images", num, minimum=1)
        spec = self.sampler_spec(sampler, steps, eta, timestep_spacing, timestep_respacing)
        classes, classifier_scale = self.guided_classes(
            classifier, classifier_scale, self.image_shape()
        )
        given = check_labels(class_labels, num, classes, self.source or "this model")
        # A chain it cannot run (diffusers' last-step noise, epsilon at abar = 0) fails here,
        # before anything is written.
        step_tables(self.schedule, spec).rows(self.diffusion.objective)
        seed = check_seed(check_int("seed", seed))
        device = resolve_device(device, self.device)
        group = current_group() if group is None else group
        if batch_size == "auto":  # every rank must cut the run into the same batches
            batch_size = group.smallest(self.auto_batch_size(num, device))
        batch_size = resolve_batch_size(num, batch_size)
        run = {**self.run_identity(spec, device), "seed": seed}
        recorded, labels = run_labels(given, seed, num, classes)
        if recorded is not None:
            run["class_labels"] = recorded
        if classifier is not None:  # a resume with another classifier or scale is refused
            run["classifier"] = {**classifier.identity(), "scale": classifier_scale}
        options = dict(
            steps=spec.steps,
            sampler=spec.kind,
            eta=spec.eta,
            timestep_spacing=spec.timestep_spacing,
            seed=seed,
            classifier=classifier,
            classifier_scale=classifier_scale,
        )
        if spec.section_counts:
            options["timestep_respacing"] = ",".join(map(str, spec.section_counts))
            del options["steps"], options["timestep_spacing"]
        single = group.world == 1
        # One process: sample_batches' bar in steps. Several: rank 0's bar in images, all ranks.
        shared_bar = progress and not single and group.rank == 0
        bar = tqdm(total=num, unit="img", desc="sampling", disable=not shared_bar)

        def draw(count: int, start: int):
            batches = self.sample_batches(
                count, start_index=start, batch_size=batch_size, device=device,
                progress=progress and single,
                class_labels=None if given is None else given[start : start + count], **options,
            )  # fmt: skip
            for indices, images in batches:
                yield indices, images.float().cpu().numpy()

        def advance(done: int) -> None:
            bar.update(done - bar.n)

        with bar:
            write_samples(
                output, run, num, batch_size, draw, group=group, keep_shards=keep_shards,
                say=say, progress=advance if shared_bar else None, labels=labels,
            )  # fmt: skip
        return output

    def _on_device(self, device: torch.device) -> Pipeline:
        """A shallow copy of this pipeline whose network lives on ``device`` (kept for the next
        call): sampling elsewhere never moves the pipeline's own network."""
        cached = getattr(self, "_device_copy", None)
        if cached is None or cached.device != device:
            clone = copy.copy(self)
            clone.__dict__.pop("_device_copy", None)
            clone.network = copy.deepcopy(self.network).to(device)
            self._device_copy = cached = clone
        return cached

    def _initial_noise(
        self, seed: int, indices: range, shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        """x_T of the samples ``indices``: the keyed noise of chain step 0."""
        return keyed_noise(seed, indices, 0, shape, device=device)

    def _run_chain(
        self,
        x: torch.Tensor,
        tables: StepTables,
        spec: SamplerSpec,
        *,
        seed: int,
        indices: range,
        on_step: Callable[[int], None],
        class_labels: torch.Tensor | None = None,
        noise: GeneratorNoise | None = None,
        guidance=None,
    ) -> torch.Tensor:
        """The reverse chain of one batch from x_T (on the device it runs on) to x_0: the
        reference loop; ``class_labels`` [batch] int64 on that device for a class-conditional
        network; ``noise``: the steps' noise where it is not the Philox stream of ``seed`` and
        ``indices`` (``noise="torch-generator"``); ``guidance(x, k)``: a classifier's scaled
        gradient for step k. ``ddpm_fast.engine.Engine`` runs the same chain its own way."""

        def step_noise(step: int, batch_shape: tuple[int, ...]) -> torch.Tensor:
            if noise is not None:
                return noise.of_step(step - 1)
            return keyed_noise(seed, indices, step, batch_shape[1:], device=x.device)

        objective = self.diffusion.objective
        return sample_loop(
            self.network, x, tables, spec, objective, step_noise, on_step=lambda k, x: on_step(k),
            class_labels=class_labels, guidance=guidance,
        )  # fmt: skip

    def sample(
        self,
        num: int,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        eta: float = 0.0,
        timestep_spacing: str | None = None,
        timestep_respacing: str | None = None,
        class_labels=None,
        seed: int = 0,
        batch_size: int | None = None,
        initial_noise: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        start_index: int = 0,
        progress: bool | dict = False,
        noise: str | None = None,
        generator=None,
        classifier=None,
        classifier_scale: float = 1.0,
    ) -> torch.Tensor:
        """Draw ``num`` images as an NCHW float32 tensor in [0, 1] (on the CPU).

        ``steps`` defaults to the schedule's length; ``sampler`` is one of
        ``ddpm_fast.samplers.SAMPLERS`` ("ddpm", "ddim" with ``eta``, "dpm++2m", ...; None: the
        model's default, ``diffusion.sampler``, else ddpm), ``timestep_spacing`` one of
        ``ddpm_fast.samplers.SPACINGS`` (None: the model's, else the sampler's), or
        ``timestep_respacing`` as OpenAI's libraries spell it ("250", "ddim25", "10,15,20");
        ``class_labels`` (class-conditional models): one int for every image or one per image
        (None: drawn per sample index from the seed, so image i keeps its label in any batch);
        ``batch_size`` defaults to up to 64; ``initial_noise`` [num, C, H, W] replaces the Philox
        x_T; image i uses the noise of sample ``start_index + i``, so it is the same image for a
        given seed whatever the batch size; ``progress`` shows a tqdm bar (a dict: tqdm's
        options for it, such as ``{"leave": False}``).

        ``noise``: "philox" (the default: ddpm-fast's keyed noise, as above) or "torch-generator"
        (diffusers' stream: x_T and each step's noise drawn from ``generator`` as diffusers'
        pipelines draw them, so the images are theirs for the same generator; see
        ``ddpm_fast.generator_noise``). ``generator``: a ``torch.Generator`` or a list of one per
        image (given: noise defaults to "torch-generator"; None with "torch-generator": a CPU
        generator seeded with ``seed``). That stream is the batch's: ``batch_size`` defaults to
        ``num`` (one batch, as diffusers), and each further batch continues the generator.

        ``classifier`` (``ddpm_fast.load_classifier``) and ``classifier_scale``: classifier
        guidance as guided-diffusion's classifier_sample.py (DDPM and DDIM; see
        ``ddpm_fast.guidance``); the labels it guides towards are ``class_labels`` (drawn from
        the seed where None), an unconditional model taking them for the classifier only.
        """
        batches = self.sample_batches(
            num,
            steps=steps,
            sampler=sampler,
            eta=eta,
            timestep_spacing=timestep_spacing,
            timestep_respacing=timestep_respacing,
            class_labels=class_labels,
            seed=seed,
            batch_size=batch_size,
            initial_noise=initial_noise,
            device=device,
            start_index=start_index,
            progress=progress,
            noise=noise,
            generator=generator,
            classifier=classifier,
            classifier_scale=classifier_scale,
        )
        return torch.cat([images.cpu() for _, images in batches])
