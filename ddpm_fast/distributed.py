"""Many processes, one output: the process group that ``torchrun`` sets up, as an output
``Group`` (rank, world size, barrier), and the device each rank samples on.

``torchrun --nproc-per-node N -m ddpm_fast -- sample ...`` sets WORLD_SIZE, RANK and
LOCAL_RANK; ddpm-fast then joins the group (gloo on the CPU, NCCL on CUDA, where each rank takes
``cuda:LOCAL_RANK``; with more ranks than GPUs they share them round-robin, over gloo). Ranks
share the output folder (a shared file system across machines).

No rank waits forever for another: a barrier gives up after DDPM_FAST_BARRIER_TIMEOUT seconds
(default 600) with one line naming the ranks that did not come; at the end, a rank done with its
batches waits for as long as the others keep finishing batches (see output.write_samples).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from .errors import ConfigError
from .output import SINGLE, Group, RankLostError

# Seconds a barrier waits for every rank, and a finished rank waits while no other rank finishes
# a batch. The final wait is not bounded by it while batches keep coming (a resumed run's ranks
# can finish much of a run apart), so it only has to outlast loading a model and one batch.
BARRIER_TIMEOUT_VARIABLE = "DDPM_FAST_BARRIER_TIMEOUT"
DEFAULT_BARRIER_TIMEOUT = 600.0

_barrier_group = None  # a gloo group for monitored barriers (NCCL has none)


def barrier_timeout() -> float:
    """DDPM_FAST_BARRIER_TIMEOUT in seconds (default 600), checked."""
    text = os.environ.get(BARRIER_TIMEOUT_VARIABLE)
    if text is None:
        return DEFAULT_BARRIER_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{BARRIER_TIMEOUT_VARIABLE}={text!r}: expected seconds, more than 0")
    return value


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def current_group() -> Group:
    """The Group of an initialised torch.distributed process group, else a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    backend = dist.get_backend()
    timeout = barrier_timeout()
    rank = dist.get_rank()

    def barrier() -> None:
        # gloo's monitored barrier names the ranks that did not arrive in time.
        try:
            dist.monitored_barrier(
                group=_barrier_group, timeout=timedelta(seconds=timeout), wait_all_ranks=True
            )
        except RuntimeError as err:  # DistBackendError included
            said = " ".join(str(err).split())
            raise RankLostError(
                f"rank {rank}: the ranks did not all reach the barrier in {timeout:.0f} s "
                f"(a rank stopped, or {BARRIER_TIMEOUT_VARIABLE}=SECONDS is too short): "
                f"{said[:300]}"
            ) from None

    def smallest(value: int) -> int:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    return Group(rank, dist.get_world_size(), barrier, smallest, timeout)


def join(device: torch.device) -> tuple[Group, torch.device]:
    """Under torchrun: join the process group and give this rank's device (``device`` of type
    cuda becomes cuda:LOCAL_RANK); otherwise the single process and ``device`` unchanged."""
    if world_size() <= 1:
        return SINGLE, device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    backend = "gloo"
    if device.type == "cuda":
        count = torch.cuda.device_count()
        device = torch.device("cuda", local_rank % count)  # more ranks than GPUs: they share
        torch.cuda.set_device(device)
        if local_world <= count:  # NCCL needs a GPU of its own per rank
            backend = "nccl"
    global _barrier_group
    timeout = barrier_timeout()
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    if dist.get_backend() != "gloo" and _barrier_group is None:
        _barrier_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    return current_group(), device


def leave() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    global _barrier_group
    _barrier_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
