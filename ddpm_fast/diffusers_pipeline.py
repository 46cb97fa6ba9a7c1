"""``ddpm_fast.from_diffusers(pipe)``: a diffusers DDPMPipeline or DDIMPipeline in memory, run by
ddpm-fast and called as diffusers calls it, for the same images.

    pipe = DDPMPipeline.from_pretrained("google/ddpm-cifar10-32")
    fast = ddpm_fast.from_diffusers(pipe)
    images = fast(batch_size=16, generator=torch.Generator().manual_seed(0)).images

The unet's config and state_dict and the scheduler's config are read as a folder's are
(``diffusers_folder.pipeline_from_parts``, with its one-line errors), with no save to disk; the
weights are copied, so the wrapper is a snapshot of the pipeline at the time it was wrapped. With
a generator, x_T and each step's noise are drawn from it as diffusers draws them
(``ddpm_fast.generator_noise``), so the images are diffusers' own within rounding. Without one,
or with ``noise="philox"``, they are ddpm-fast's keyed noise of a seed: each image the same
whatever the batch, but not diffusers' images.

diffusers is imported here only, where a caller already has its objects.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .diffusers_folder import PIPELINES, SCHEDULERS, pipeline_from_parts
from .errors import ConfigError
from .options import check_int
from .pipeline import Pipeline, resolve_device

UNETS = ("UNet2DModel",)


def from_diffusers(
    pipe_or_unet,
    scheduler=None,
    *,
    engine: bool = True,
    dtype: str = "fp32",
    **engine_options,
) -> FastDiffusersPipeline:
    """ddpm-fast around an in-memory ``DDPMPipeline`` or ``DDIMPipeline`` (or a ``UNet2DModel``
    and a scheduler: sampled as a DDPMPipeline), called with the pipeline's own arguments.

    ``engine``: run the engine (``ddpm_fast.engine.Engine``, in ``dtype``, with
    ``engine_options`` such as ``cuda_graph``), else the reference path (fp32). What ddpm-fast
    cannot run (a UNet2DConditionModel, a scheduler class it does not read, a scheduler option
    it does not sample with) is a ConfigError here, before any work.
    """
    if scheduler is None:
        kind = type(pipe_or_unet).__name__
        if kind not in PIPELINES:
            raise ConfigError(
                f"from_diffusers takes a {' or '.join(PIPELINES)} (or a UNet2DModel and a "
                f"scheduler), not a {kind}"
            )
        unet, scheduler = pipe_or_unet.unet, pipe_or_unet.scheduler
    else:
        kind, unet = "DDPMPipeline", pipe_or_unet
    unet_kind, scheduler_kind = type(unet).__name__, type(scheduler).__name__
    if unet_kind not in UNETS:
        raise ConfigError(f"ddpm-fast runs UNet2DModel unets, not {unet_kind}")
    if scheduler_kind not in SCHEDULERS:
        raise ConfigError(f"ddpm-fast reads {', '.join(SCHEDULERS)}, not {scheduler_kind}")
    if not engine and dtype != "fp32":
        raise ConfigError(f"the reference path runs fp32, not {dtype}; use engine=True")
    unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    scheduler_config = {
        **{k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
        "_class_name": scheduler_kind,
    }
    weights = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    reference = pipeline_from_parts(
        unet_config,
        weights,
        scheduler_config,
        unet_where=f"{kind}.unet",
        scheduler_where=f"{kind}.scheduler ({scheduler_kind})",
        options={},
        source=f"an in-memory diffusers {kind}",
        notes=[f"read from an in-memory diffusers {kind} ({unet_kind}, {scheduler_kind})"],
    )
    device = unet.device
    build = (lambda p: _engine(p, dtype, engine_options)) if engine else (lambda p: p)
    wrapper = {"DDPMPipeline": FastDDPMPipeline, "DDIMPipeline": FastDDIMPipeline}[kind]
    return wrapper(kind, reference, build, unet.dtype, device)


def _engine(pipeline: Pipeline, dtype: str, options: dict) -> Pipeline:
    from .engine import Engine

    return Engine(pipeline, dtype=dtype, **options)


def _import_diffusers():
    try:
        import diffusers
    except ImportError:  # a caller with a pipeline has it; a caller without one has no use here
        raise ConfigError("from_diffusers needs diffusers installed") from None
    return diffusers


class FastDiffusersPipeline:
    """A diffusers pipeline's call on ddpm-fast: ``fast(batch_size, generator, ...)`` returns an
    ``ImagePipelineOutput`` (or the tuple) as the pipeline does. ``pipeline`` is the ddpm-fast
    Pipeline (or Engine) it runs, whose ``sample``, ``sample_to`` and export are also here."""

    def __init__(self, kind: str, reference: Pipeline, build, unet_dtype, device):
        self.kind = kind
        self.unet_dtype = unet_dtype
        self._reference, self._build = reference, build
        self._variants: dict[bool, Pipeline] = {}
        self.pipeline = self._variant(reference.diffusion.eps_from_clipped_x0)
        self._device = torch.device(device)
        self._progress_bar_config: dict = {}

    def _variant(self, eps_from_clipped_x0: bool) -> Pipeline:
        """The pipeline whose DDIM steps with the eps re-derived from the clipped x0 or not
        (``use_clipped_model_output``), built on first use."""
        if eps_from_clipped_x0 not in self._variants:
            diffusion = replace(self._reference.diffusion, eps_from_clipped_x0=eps_from_clipped_x0)
            reference = Pipeline(
                self._reference.network, diffusion, source=self._reference.source,
                notes=self._reference.notes,
            )  # fmt: skip
            built = self._build(reference)
            built.generator_dtype = self.unet_dtype  # x_T as diffusers draws it
            self._variants[eps_from_clipped_x0] = built
        return self._variants[eps_from_clipped_x0]

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device=None, dtype=None):
        """Sample on ``device`` from now on (as diffusers' ``pipe.to``); the dtype is fixed at
        ``from_diffusers``."""
        if dtype is not None:
            raise ConfigError("the dtype is chosen at from_diffusers(pipe, dtype=...)")
        if isinstance(device, torch.dtype):
            raise ConfigError("the dtype is chosen at from_diffusers(pipe, dtype=...)")
        if device is not None:
            self._device = resolve_device(device, self._device)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm's options for the sampling bar (``disable=True`` hides it), as diffusers'."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable=None, total=None):
        """A tqdm bar with this pipeline's options, as diffusers' ``progress_bar``."""
        from tqdm.auto import tqdm

        if iterable is None and total is None:
            raise ValueError("Either `total` or `iterable` has to be defined.")
        return tqdm(iterable, total=total, **self._progress_bar_config)

    def sample(self, num: int, **options) -> torch.Tensor:
        """ddpm-fast's ``Pipeline.sample`` on this model (images NCHW in [0, 1])."""
        return self.pipeline.sample(num, **{"device": self._device, **options})

    def sample_batches(self, num: int, **options):
        return self.pipeline.sample_batches(num, **{"device": self._device, **options})

    def sample_to(self, path, num: int, **options):
        """ddpm-fast's ``Pipeline.sample_to``: resumable PNG/.npz outputs."""
        return self.pipeline.sample_to(path, num, **{"device": self._device, **options})

    def export(self, path, **options):
        """``ddpm_fast.export.export_onnx`` of this model (ONNX, verified)."""
        from .export import export_onnx

        return export_onnx(self._reference, path, **options)

    def _run(
        self, batch_size, generator, steps, output_type, return_dict, *, eta=0.0,
        use_clipped_model_output=None, noise=None, seed=None,
    ):  # fmt: skip
        batch_size = check_int("batch_size", batch_size, minimum=1)
        if noise is None:
            noise = "philox" if generator is None else "torch-generator"
        options = {}
        if noise == "philox":
            options["seed"] = _philox_seed(seed, generator)
        elif seed is not None:
            raise ConfigError("seed picks Philox noise; with a generator, seed the generator")
        else:
            options["generator"] = generator
        pipeline = self.pipeline
        if use_clipped_model_output is not None:
            pipeline = self._variant(bool(use_clipped_model_output))
        if eta:
            options["eta"] = eta
        images = pipeline.sample(
            batch_size, steps=steps, batch_size=batch_size, device=self._device, noise=noise,
            progress=dict(self._progress_bar_config), **options,
        )  # fmt: skip
        images = images.to(self.unet_dtype)  # in the unet's dtype, as diffusers gives them
        if output_type == "pt":
            images = images.to(self._device)
        else:
            images = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = _numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return _import_diffusers().ImagePipelineOutput(images=images)


def _philox_seed(seed, generator) -> int:
    """The Philox seed of a call: as given, else the generator's initial seed, else one drawn
    from torch's global generator (a new one each call, as diffusers without a generator;
    ``torch.manual_seed`` fixes it)."""
    if seed is not None:
        return seed
    if isinstance(generator, torch.Generator):
        return generator.initial_seed() % 2**32
    if generator is not None:
        raise ConfigError("noise 'philox' takes one generator (its seed) or seed=, not a list")
    return int(torch.randint(0, 2**31, ()))


def _numpy_to_pil(images):
    from diffusers.utils import numpy_to_pil

    return numpy_to_pil(images)


class FastDDPMPipeline(FastDiffusersPipeline):
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str | None = "pil",
        return_dict: bool = True,
        *,
        noise: str | None = None,
        seed: int | None = None,
    ):
        """``DDPMPipeline.__call__``'s arguments and result; ``noise``/``seed``: see
        ``from_diffusers``."""
        return self._run(
            batch_size, generator, num_inference_steps, output_type, return_dict,
            noise=noise, seed=seed,
        )  # fmt: skip


class FastDDIMPipeline(FastDiffusersPipeline):
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        use_clipped_model_output: bool | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        *,
        noise: str | None = None,
        seed: int | None = None,
    ):
        """``DDIMPipeline.__call__``'s arguments and result; ``noise``/``seed``: see
        ``from_diffusers``."""
        return self._run(
            batch_size, generator, num_inference_steps, output_type, return_dict, eta=eta,
            use_clipped_model_output=use_clipped_model_output, noise=noise, seed=seed,
        )  # fmt: skip
