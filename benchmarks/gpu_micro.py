"""The two parameters of the GPU cost model (``ddpm_fast.engine.step_cost``) measured on this GPU:
the cost of one launch inside a CUDA graph, and the bandwidth a device-to-device copy reaches.

    python benchmarks/gpu_micro.py --out micro.json [--device cuda]

- launch: a CUDA graph of ``LAUNCHES`` back-to-back launches of an empty Triton kernel (and, beside
  it, of a one-element PyTorch add), replayed; the replay's time over the launches. That is the
  gap the engine's graphs pay per kernel before any work (the model adds each kernel's roofline
  time to it).
- bandwidth: ``dst.copy_(src)`` of ``COPY_MB`` MiB, best of ``REPEATS``; bytes read plus written
  over the time.

On the CPU (the suite's dry run) it times the same calls eagerly on tiny sizes: the control flow,
not a measurement (``"device": "cpu"`` in the JSON says so).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

LAUNCHES = 1000
COPY_MB = 256
REPEATS = 10


def _empty_kernel():
    from ddpm_fast.kernels._launch import HAS_TRITON, jit, tl

    if not HAS_TRITON:
        return None

    @jit
    def empty(x_ptr, BLOCK: tl.constexpr):
        pass

    return empty


def _timed(fn, device: str) -> float:
    """Seconds of one call of ``fn``: CUDA events on a GPU, the wall clock elsewhere."""
    if device != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1e3


def launch_cost(device: str, launches: int) -> dict:
    """Seconds per launch of an empty Triton kernel and of a tiny PyTorch op, in a CUDA graph."""
    x = torch.zeros(1, device=device)
    kernel = _empty_kernel()
    ops = {"torch_add": lambda: x.add_(1.0)}
    if kernel is not None and device == "cuda":
        ops["triton_empty"] = lambda: kernel[(1,)](x, BLOCK=1)
    result = {}
    for name, op in ops.items():
        op()  # compile / warm up
        if device == "cuda":
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(launches):
                    op()
            graph.replay()
            torch.cuda.synchronize()
            best = min(_timed(graph.replay, device) for _ in range(REPEATS))
        else:
            best = min(
                _timed(lambda op=op: [op() for _ in range(launches)], device) for _ in range(2)
            )
        result[name] = best / launches
    return result


def copy_bandwidth(device: str, megabytes: int) -> float:
    """Bytes per second (read + written) of a device-to-device copy."""
    n = megabytes * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src), device) for _ in range(REPEATS))
    return 2 * src.numel() * src.element_size() / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    launches = LAUNCHES if gpu else 20
    launch = launch_cost(args.device, launches)
    bandwidth = copy_bandwidth(args.device, COPY_MB if gpu else 4)
    record = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "launch_s": launch.get("triton_empty", launch["torch_add"]),
        "launch_s_by_op": launch,
        "copy_bytes_per_s": bandwidth,
        "launches": launches,
        "torch": torch.__version__,
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    per_launch = ", ".join(f"{k} {v * 1e6:.2f} us" for k, v in launch.items())
    print(f"{record['device']}: launch in a graph {per_launch}; copy {bandwidth / 1e12:.2f} TB/s")


if __name__ == "__main__":
    main()
