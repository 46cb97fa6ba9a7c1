"""One denoising step captured as a CUDA graph, replayed for every step of a chain.

The step works in place on fixed device buffers (the chain's state, the step index, the noise
keys) and advances the step index itself, so a replay needs nothing from the host. All graphs of
an engine share one memory pool: they never run concurrently, and the pool keeps the memory of a
graph per batch shape from adding up.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_STEPS = 2  # compile the Triton kernels and pick cuDNN's algorithms before capture


def new_graph_pool():
    """A memory pool for the graphs of one engine."""
    return torch.cuda.graph_pool_handle()


class CapturedStep:
    """``step()`` (in place on ``state``) captured on the current CUDA device."""

    def __init__(self, step: Callable[[], None], state, pool):
        self.state = state
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            step()

    def replay(self) -> None:
        self.graph.replay()
