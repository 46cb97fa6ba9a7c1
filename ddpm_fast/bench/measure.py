"""What the bench measures besides the chain itself: a chain's wall time, one forward's FLOPs and
weight bytes, peak memory, the load of busy processes, the numerics every backend runs under, and
torch's matmul rate that the GFLOP/s column is set against.
"""

from __future__ import annotations

import contextlib
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from ..flops import forward_flops
from ..pipeline import Pipeline


class BusyProcesses:
    """``count`` processes that spin a core each (Python busy loops), for as long as the block
    runs: the load of other work sharing the machine."""

    def __init__(self, count: int):
        self.count = count
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> BusyProcesses:
        for _ in range(self.count):
            self.processes.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        time.sleep(0.5)  # running before the first timed call
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()


class PeakResident:
    """The peak resident memory of this process while the block runs, in MiB, sampled every
    ``interval`` seconds from /proc/self/statm (the process's lifetime peak, ru_maxrss, cannot
    tell one cell from the next). None where /proc is missing."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak: float | None = None
        self._stop = threading.Event()

    @staticmethod
    def _resident() -> float | None:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return pages * resource.getpagesize() / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = self._resident()
            if now is not None:
                self.peak = max(self.peak or 0.0, now)

    def __enter__(self) -> PeakResident:
        self.peak = self._resident()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        now = self._resident()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_chain(
    sampler, batch: int, steps: int, device: str, seed: int, kind: str = "ddpm"
) -> float:
    """Seconds to sample ``batch`` images with a ``steps``-step chain of sampler ``kind``."""
    _synchronize(device)
    start = time.perf_counter()
    sampler.sample(batch, batch_size=batch, steps=steps, seed=seed, device=device, sampler=kind)
    _synchronize(device)
    return time.perf_counter() - start


def network_floor(pipeline: Pipeline, batch: int) -> dict:
    """FLOPs of one forward at this batch, and the bytes of its weights (a lower bound on the
    bytes a forward moves: every weight is read at least once)."""
    network = pipeline.network
    weight_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
    flops = forward_flops(network, pipeline.image_shape(), batch)
    return {"flops": flops, "weight_bytes": weight_bytes}


def precision_flags(dtype: str):
    """The numerics every backend runs under in ``dtype``: in fp32, cuDNN's TF32 is off (the
    engine switches it off for itself; the reference and torch.compile must compute the same
    thing, or the engine is compared with a cheaper computation). Other dtypes keep PyTorch's."""
    if dtype != "fp32":
        return contextlib.nullcontext()
    return torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled,
        benchmark=torch.backends.cudnn.benchmark,
        deterministic=torch.backends.cudnn.deterministic,
        allow_tf32=False,
    )


def torch_matmul_ceiling(device: str, dtype: torch.dtype, size: int | None = None) -> float:
    """FLOP/s of a large square torch matmul on ``device`` in ``dtype``, the best of a few after
    a warm-up, in this process with all of torch's threads: what the bench's GFLOP/s column is
    set against (its ``ceiling_flops``). (A convolution can beat it where its library does fewer
    FLOPs than the direct method the counter counts, e.g. Winograd.)

    Not benchmarks/matmul_ceiling.py: that script times NumPy's BLAS and ONNX Runtime's MLAS in
    float32, one thread per process, N processes at once, the machine's peak for the engine's CPU
    executor; this one times torch in each bench dtype, on a GPU as on a CPU, in the same run as
    the cells it is set against."""
    if size is None:  # a few seconds at most on a CPU (one without bf16 matrix units included)
        size = 8192 if device.startswith("cuda") else 2048 if dtype == torch.float32 else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: threads, kernels, caches
    best = float("inf")
    for _ in range(3):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
