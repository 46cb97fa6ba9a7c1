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
    ``steps_offset`` (leading spacing), and whether x0 is clipped to [-1, 1] (the
    denoising-diffusion-pytorch models' samplers all clip; diffusers' DPM-Solver does not)."""

    kind: str = "ddpm"
    steps: int = 1000
    eta: float = 0.0
    variance: str = "fixed_small"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    clip_x0: bool = True

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
        if not isinstance(self.clip_x0, bool):
            raise ConfigError(f"clip_x0 must be True or False, got {self.clip_x0!r}")

    @property
    def carries_x0_prev(self) -> bool:
        return sampler_module(self.kind).CARRIES_X0_PREV
