"""The samplers: every module of this package that defines ``NAMES`` (the infrastructure
modules below excepted). A new sampler is a new module here; nothing else lists them.

A sampler module defines ``NAMES`` (the names users pick it by), ``DEFAULT_SPACING``,
``USES_ETA``, ``CARRIES_X0_PREV`` (its steps read the previous step's x0),
``noise_steps(name, steps, eta)`` ("1" where step k adds noise) and ``chain(alphas_cumprod,
spec)`` returning a :class:`~ddpm_fast.samplers.rule.Chain`; for ``noise="torch-generator"``,
``generator_draws(spec, timesteps)`` (where diffusers' scheduler of the chain draws noise from the
pipeline's generator, used or not) and ``GENERATOR_DRAWS_FP32`` (it draws in float32, not the
model's dtype). No torch: the CLI and OnnxSampler read the registry where torch is not
installed.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from types import ModuleType

from ..errors import ConfigError
from ..options import check_choice, check_real

INFRASTRUCTURE = ("reference", "registry", "rule", "spacing", "spec")


def _discover() -> dict[str, ModuleType]:
    package = sys.modules[__name__.rpartition(".")[0]]
    found = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in INFRASTRUCTURE or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name in module.NAMES:
            if name in found:
                raise ImportError(f"sampler name {name!r} is defined twice")
            found[name] = module
    return found


MODULES = _discover()
# Known names in a stable order: the first-version samplers first, then alphabetical.
SAMPLERS = tuple(sorted(MODULES, key=lambda n: (n not in ("ddpm", "ddim"), n != "ddpm", n)))


def sampler_module(name) -> ModuleType:
    """The module of sampler ``name``; an unknown name is a ConfigError, never a default."""
    if not isinstance(name, str) or name not in MODULES:
        raise ConfigError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return MODULES[name]


def check_chain(sampler, eta) -> tuple[str, float]:
    """(sampler, eta) checked: a known sampler, a finite eta >= 0, and eta only for a sampler
    that uses it (DDIM)."""
    sampler = check_choice("sampler", sampler, SAMPLERS)
    eta = check_real("eta", eta, minimum=0.0)
    if eta and not sampler_module(sampler).USES_ETA:
        raise ConfigError(f"eta applies to the ddim sampler only, not {sampler}")
    return sampler, eta
