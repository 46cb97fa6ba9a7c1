"""Convolutions on the CPU: PyTorch's ``F.conv2d`` or oneDNN with the weight packed ahead of time,
whichever is faster for the input shape, measured once at the first call with that shape.

``F.conv2d`` re-lays the weight out for oneDNN at every call, or takes its native path for small
inputs (batch 1 at the U-Net's 4 x 4 and 8 x 8 stages); a weight packed once for the shape runs
those several times faster. At large spatial sizes with few channels the packed path can be slower,
hence the measurement rather than a rule. Both compute the same convolution (the summation order
differs: a few fp32 ulps). Anything but a float32 CPU input runs ``F.conv2d``.

Because the two differ in the last bits, the choice is measured once per machine and kept on
disk (``ConvChoices``): a seed then gives the same bits in every run and in every process of a
multi-process run, whatever the load when a later run starts. The cache is keyed by the
convolution's shapes, the torch version and the CPU, so a new torch or another machine measures
again; processes that start together take a file lock, so they all read the first one's choice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..files import read_regular_file, temporary_name
from ..machine import cache_dir, cpu_model

log = logging.getLogger("ddpm_fast.engine")

TRIALS = 3  # calls timed per candidate; the minimum counts


class ConvChoices:
    """The measured choice per convolution shape, in one JSON file per (torch, CPU), read and
    written under an exclusive lock. Where the cache cannot be written the choice is measured
    and kept for this process only."""

    def __init__(self, folder: Path | None = None):
        machine = f"{torch.__version__}|{cpu_model()}|{torch.get_num_threads()} threads"
        name = f"cpu-conv-{hashlib.sha256(machine.encode()).hexdigest()[:16]}.json"
        self.key = machine
        self.path = (folder or cache_dir()) / name
        self.memory: dict[str, str] = {}

    def choose(self, shape_key: str, measure: Callable[[], str]) -> str:
        if shape_key in self.memory:
            return self.memory[shape_key]
        try:
            choice = self._choose_on_disk(shape_key, measure)
        except OSError as error:  # a read-only home, say: measured, not kept
            log.debug("conv choice cache %s unusable: %s", self.path, error)
            choice = measure()
        self.memory[shape_key] = choice
        return choice

    def _choose_on_disk(self, shape_key: str, measure: Callable[[], str]) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            table = self._read()
            if shape_key not in table:
                table[shape_key] = measure()
                tmp = temporary_name(self.path)
                tmp.write_text(json.dumps({"machine": self.key, "choices": table}, indent=1))
                os.replace(tmp, self.path)
            return table[shape_key]

    def _read(self) -> dict[str, str]:
        try:
            stored = json.loads(read_regular_file(self.path))
        except (OSError, ValueError):
            return {}
        if not isinstance(stored, dict) or stored.get("machine") != self.key:
            return {}  # another machine's or torch's choices (or a corrupt file): measure again
        choices = stored.get("choices")
        valid = {"torch", "packed"}
        if not isinstance(choices, dict):
            return {}
        return {k: v for k, v in choices.items() if isinstance(k, str) and v in valid}


_CHOICES: ConvChoices | None = None


def conv_choices() -> ConvChoices:
    global _CHOICES
    if _CHOICES is None or _CHOICES.path.parent != cache_dir():
        _CHOICES = ConvChoices()
    return _CHOICES


def _packed_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


def _fastest(candidates: dict[str, Callable], x: torch.Tensor) -> str:
    best, best_time = None, float("inf")
    for name, fn in candidates.items():
        fn(x)  # warm-up
        for _ in range(TRIALS):
            start = time.perf_counter()
            fn(x)
            elapsed = time.perf_counter() - start
            if elapsed < best_time:
                best, best_time = name, elapsed
    return best


class CpuConv2d(nn.Module):
    """``conv`` (an ``nn.Conv2d``) with a per-input-shape choice of implementation on the CPU."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self._plans: dict[tuple[int, ...], Callable] = {}

    def __getattr__(self, name: str):
        """The wrapped conv's attributes (weight, bias, kernel_size, ...): a module that reads a
        conv's weight itself (a fused kernel) reads it through the wrapper too."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "conv" not in modules:
                raise
            return getattr(modules["conv"], name)

    def _packed(self, x: torch.Tensor) -> Callable:
        conv = self.conv
        args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        weight = torch.ops.mkldnn._reorder_convolution_weight(conv.weight, *args, list(x.shape))

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, conv.bias, *args, "none", [], ""
            )

        return run

    def _plan(self, x: torch.Tensor) -> Callable:
        plan = self.conv.forward
        if _packed_available():
            try:
                candidates = {"torch": self.conv.forward, "packed": self._packed(x)}
                choice = conv_choices().choose(self._shape_key(x), lambda: _fastest(candidates, x))
                plan = candidates[choice]
            except RuntimeError as error:  # an op this torch build lacks: F.conv2d it is
                log.debug("no packed oneDNN convolution for %s: %s", tuple(x.shape), error)
        self._plans[tuple(x.shape)] = plan
        return plan

    def _shape_key(self, x: torch.Tensor) -> str:
        """Everything that decides which implementation is faster, and nothing else."""
        conv = self.conv
        layout = "nhwc" if x.is_contiguous(memory_format=torch.channels_last) else "nchw"
        return (
            f"x{list(x.shape)} {layout} w{list(conv.weight.shape)} s{list(conv.stride)} "
            f"p{list(conv.padding)} d{list(conv.dilation)} g{conv.groups} "
            f"b{conv.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.conv.weight.requires_grad:
            return F.conv2d(
                x, self.conv.weight, self.conv.bias, self.conv.stride, self.conv.padding,
                self.conv.dilation, self.conv.groups,
            )  # fmt: skip
        plan = self._plans.get(tuple(x.shape))
        return (plan or self._plan(x))(x)


def use_cpu_convolutions(network: nn.Module) -> None:
    """Wrap every ``nn.Conv2d`` of ``network`` in :class:`CpuConv2d`, in place."""
    for module in list(network.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Conv2d:
                setattr(module, name, CpuConv2d(child))
