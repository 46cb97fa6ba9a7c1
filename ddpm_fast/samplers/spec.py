"""``SamplerSpec``: which chain to run, checked (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..options import VARIANCES, check_int, check_real
from .registry import sampler_module
from .spacing import SPACINGS


@dataclass(frozen=True)
class SamplerSpec:
    """A chain: sampler name, number of network evaluations, DDIM's eta, the DDPM variance
    (read by DDPM only), the timestep spacing (None: the sampler's default) with diffusers'
    ``steps_offset`` (leading spacing), whether x0 is clipped to [-clip_range, clip_range] (the
    denoising-diffusion-pytorch models' samplers all clip to [-1, 1]; diffusers' DPM-Solver does
    not), and whether DDIM's eps is re-derived from the clipped x0 (denoising-diffusion-pytorch)
    or is the network's own (diffusers, from the unclipped x0), and the section counts of
    OpenAI's respacing (``spacing.parse_respacing``)."""

    kind: str = "ddpm"
    steps: int = 1000
    eta: float = 0.0
    variance: str = "fixed_small"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    clip_x0: bool = True
    clip_range: float = 1.0
    eps_from_clipped_x0: bool = True
    section_counts: tuple[int, ...] = ()  # the "sections" spacing's counts (): one of steps

    def __post_init__(self) -> None:
        module = sampler_module(self.kind)
        if self.variance not in VARIANCES:
            raise ConfigError(f"unknown variance {self.variance!r}; known: {', '.join(VARIANCES)}")
        eta = check_real("eta", self.eta, minimum=0.0)
        if eta and not module.USES_ETA:
            raise ConfigError(f"eta applies to the ddim sampler only, not {self.kind}")
        spacing = self.timestep_spacing or module.DEFAULT_SPACING
        if spacing not in SPACINGS:
            raise ConfigError(f"unknown timestep_spacing {spacing!r}; known: {', '.join(SPACINGS)}")
        object.__setattr__(self, "timestep_spacing", spacing)
        offset = check_int("steps_offset", self.steps_offset, minimum=0)
        object.__setattr__(self, "steps_offset", offset)
        for name in ("clip_x0", "eps_from_clipped_x0"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        counts = self.section_counts
        if not isinstance(counts, tuple) or not all(isinstance(c, int) for c in counts):
            raise ConfigError(f"section_counts must be a tuple of ints, got {counts!r}")
        if counts and (spacing != "sections" or sum(counts) != self.steps):
            raise ConfigError(
                f"section_counts {counts} need timestep_spacing 'sections' and steps = their sum"
            )
        clip_range = check_real("clip_range", self.clip_range, minimum=0.0)
        if not clip_range > 0:
            raise ConfigError(f"clip_range must be positive, got {self.clip_range!r}")
        object.__setattr__(self, "clip_range", float(clip_range))

    @property
    def carries_x0_prev(self) -> bool:
        return sampler_module(self.kind).CARRIES_X0_PREV
