"""Many processes, one output: the process group that ``torchrun`` sets up, as an output
``Group`` (rank, world size, barrier), and the device each rank samples on.

``torchrun --nproc-per-node N -m ddpm_fast -- sample ...`` sets WORLD_SIZE, RANK and
LOCAL_RANK; ddpm-fast then joins the group (gloo on the CPU, NCCL on CUDA, where each rank takes
``cuda:LOCAL_RANK``; with more ranks than GPUs they share them round-robin, over gloo). Ranks
share the output folder (a shared file system across machines).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from .errors import ConfigError
from .output import SINGLE, Group

# A rank whose batches are done waits at the final barrier for the others: on a resumed run that
# can be most of the run, so the wait is long (DDPM_FAST_BARRIER_HOURS to change it).
BARRIER_HOURS = float(os.environ.get("DDPM_FAST_BARRIER_HOURS", "48"))


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

    def barrier() -> None:
        if backend == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()

    def smallest(value: int) -> int:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    return Group(dist.get_rank(), dist.get_world_size(), barrier, smallest)


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
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(hours=BARRIER_HOURS))
    return current_group(), device


def leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
