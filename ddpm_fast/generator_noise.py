"""diffusers' noise stream, ``noise="torch-generator"``: the same images as diffusers' pipelines.

diffusers' DDPMPipeline and DDIMPipeline draw x_T from the caller's ``torch.Generator`` as
``randn_tensor((batch, C, H, W), generator, dtype=unet.dtype)``, then one tensor of that shape at
each step where their scheduler draws (the sampler module's ``generator_draws``: DDPM where t > 0,
DDIM with eta > 0 and DPM-Solver's SDE variant at every step, used or not). Drawing the same
tensors in the same order from the same generator gives diffusers' chain, so its images.

The price, against ddpm-fast's own Philox noise (``noise="philox"``, the default): the stream is
the batch's, not each image's (sample i of a batch of 8 is not sample i of a batch of 4, and the
second batch of a run continues the generator where the first left it), and a run cannot resume
where it stopped. A list of generators, one per image, as diffusers takes it, makes each image
draw from its own again.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

from .errors import ConfigError
from .samplers import SamplerSpec, StepTables
from .samplers.registry import sampler_module

NOISES = ("philox", "torch-generator")
# Steps are drawn ahead of the steps that read them, up to this many bytes of float32 at a time (a
# whole chain's worth where it fits): one copy to the device per block, not one per step, and on
# CUDA the steps of a block read device memory the copy filled without waiting for the host.
BLOCK_BYTES = 64 * 2**20


def resolve_noise(noise: str | None, generator) -> str:
    """The noise a call draws: as given, else "torch-generator" where a generator is given and
    "philox" where none is."""
    if noise is None:
        return "philox" if generator is None else "torch-generator"
    if noise not in NOISES:
        raise ConfigError(f"unknown noise {noise!r}; known: {', '.join(NOISES)}")
    if noise == "philox" and generator is not None:
        raise ConfigError("a generator is drawn from with noise='torch-generator', not 'philox'")
    return noise


def check_generators(generator, num: int, seed: int) -> torch.Generator | list[torch.Generator]:
    """The run's generator: one ``torch.Generator``, or a list of ``num``, one per image, as
    diffusers takes them; None: a CPU generator seeded with ``seed`` (``torch.manual_seed``'s
    stream, as ``torch.Generator().manual_seed(seed)`` gives in diffusers' examples)."""
    if generator is None:
        return torch.Generator().manual_seed(seed)
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, list | tuple) and all(
        isinstance(g, torch.Generator) for g in generator
    ):
        if len(generator) != num:
            raise ConfigError(
                f"{len(generator)} generators for {num} images; a list has one per image"
            )
        return list(generator)
    raise ConfigError(
        f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}"
    )


class GeneratorNoise:
    """One batch's noise drawn from ``generator`` (one, or a list with one per row) in diffusers'
    order: ``initial()`` (x_T) first, then ``of_step(k)`` for the chain steps k = 0, 1, ... that
    add noise, in increasing order (the steps between them where the scheduler draws are drawn
    and dropped), then ``finish()``, which draws the rest, so that the generator ends where
    diffusers' would. Every tensor is drawn on the generator's device in the dtype diffusers
    draws it in and handed over as float32 on ``device``. Drawing ahead (``BLOCK_BYTES`` of
    steps at a time) changes nothing but when: the generator gives the same numbers in the same
    order.

    Batch splits (the engine's CPU thread plan) read their rows of the same draws:
    ``split(parts)`` says how many parts will ask for each step, and ``rows(part)`` is the view
    one part reads through; a step's draw is kept until every part has taken it.
    """

    def __init__(
        self,
        generator: torch.Generator | list[torch.Generator],
        shape: tuple[int, ...],
        draws: Sequence[bool],
        uses: Sequence[bool],
        *,
        dtype: torch.dtype,
        step_dtype: torch.dtype,
        device: torch.device,
    ):
        self.generator, self.shape, self.device = generator, tuple(shape), device
        self.draws, self.uses = list(map(bool, draws)), list(map(bool, uses))
        pairs = enumerate(zip(self.draws, self.uses, strict=True))
        undrawn = [k for k, (drawn, used) in pairs if used and not drawn]
        if undrawn:
            raise ConfigError(
                f"the chain adds noise at step {undrawn[0]}, where diffusers' scheduler draws none"
            )
        self.dtype, self.step_dtype = dtype, step_dtype
        per_step = 4 * int(np.prod(self.shape))
        self._block_steps = max(1, BLOCK_BYTES // per_step)
        self._next = 0  # the next chain step whose draw is due
        self._kept: dict[int, list] = {}  # step -> [draw, parts yet to take it]
        self._parts = 1
        self._lock = threading.Lock()
        self._started = False

    def _draw(self, dtype: torch.dtype) -> torch.Tensor:
        """One draw of the batch's shape, float32, where the generator (the first) lives."""
        if isinstance(self.generator, list):  # randn_tensor: one image from each generator
            one = (1, *self.shape[1:])
            home = self.generator[0].device
            parts = [torch.randn(one, generator=g, device=g.device, dtype=dtype).to(home)
                     for g in self.generator]  # fmt: skip
            drawn = torch.cat(parts)
        else:
            g = self.generator
            drawn = torch.randn(self.shape, generator=g, device=g.device, dtype=dtype)
        return drawn.float()

    def _to_device(self, drawn: torch.Tensor) -> torch.Tensor:
        if drawn.device.type == "cpu" and self.device.type == "cuda":
            return drawn.pin_memory().to(self.device, non_blocking=True)
        return drawn.to(self.device)

    def initial(self) -> torch.Tensor:
        """x_T [B, C, H, W], float32 on the device: the first draw."""
        if self._started:
            raise RuntimeError("x_T is the stream's first draw")
        self._started = True
        return self._to_device(self._draw(self.dtype))

    def split(self, parts: int) -> None:
        """``parts`` readers take each step's draw (one per part of a split batch)."""
        self._parts = parts

    def rows(self, part: slice) -> RowsOfNoise:
        return RowsOfNoise(self, part)

    def of_step(self, k: int, rows: slice = slice(None)) -> torch.Tensor:
        """The noise of chain step k (0-based), its ``rows``."""
        with self._lock:
            self._advance(k + 1)
            entry = self._kept.get(k)
            if entry is None:
                raise RuntimeError(f"step {k}'s noise was not drawn, or was taken already")
            entry[1] -= 1
            if entry[1] == 0:
                del self._kept[k]
            return entry[0][rows]

    def finish(self) -> None:
        """Draw what the chain's remaining steps draw (the generator ends as diffusers')."""
        with self._lock:
            self._advance(len(self.draws))

    def _advance(self, end: int) -> None:
        """Draw every step before ``end`` not drawn yet, and ahead of it up to a block."""
        if not self._started:
            raise RuntimeError("x_T is the stream's first draw")
        if self._next >= end:
            return
        stop = min(len(self.draws), max(end, self._next + self._block_steps))
        kept = {}
        for k in range(self._next, stop):
            if self.draws[k]:
                drawn = self._draw(self.step_dtype)
                if self.uses[k]:
                    kept[k] = drawn
        self._next = stop
        if kept:
            block = self._to_device(torch.stack(list(kept.values())))
            for row, k in enumerate(kept):
                self._kept[k] = [block[row], self._parts]


class RowsOfNoise:
    """One part's view of a split batch's ``GeneratorNoise``: its rows of each step's draw."""

    def __init__(self, noise: GeneratorNoise, rows: slice):
        self.noise, self.part = noise, rows

    def of_step(self, k: int) -> torch.Tensor:
        return self.noise.of_step(k, self.part)


def generator_noise(
    generator, rows: range, shape: tuple[int, ...], tables: StepTables, spec: SamplerSpec,
    model_dtype: torch.dtype, device: torch.device,
) -> GeneratorNoise:  # fmt: skip
    """The noise of the batch ``rows`` of a run (images of ``shape``) for the chain ``tables``:
    from the run's one generator, or from the generators of those rows."""
    if isinstance(generator, list):
        generator = generator[rows.start : rows.stop]
    module = sampler_module(spec.kind)
    draws = module.generator_draws(spec, np.asarray(tables.timesteps))
    uses = [tables.adds_noise(k) for k in range(len(tables))]
    step_dtype = torch.float32 if module.GENERATOR_DRAWS_FP32 else model_dtype
    return GeneratorNoise(
        generator, (len(rows), *shape), draws, uses,
        dtype=model_dtype, step_dtype=step_dtype, device=device,
    )  # fmt: skip
