"""Multi-process training under ``torchrun``: who this process is and how ranks agree.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; a plain
``python`` start is a world of one and needs no process group. The backend is NCCL on CUDA and
gloo on CPU. Only rank 0 logs and writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessContext:
    """This process's place in the run and the device it trains on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``'auto'`` -> this rank's CUDA device if there is one, else the CPU; others as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def start_processes(device_name: str) -> ProcessContext:
    """Join the torchrun process group if there is one; the context of this process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    owns_group = world_size > 1 and not dist.is_initialized()
    if owns_group:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ProcessContext(rank, local_rank, world_size, device, owns_group)


def stop_processes(context: ProcessContext) -> None:
    """Leave the process group if :func:`start_processes` joined it."""
    if context.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def sum_over_ranks(values: list[float], context: ProcessContext) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves in a world of one)."""
    if not context.is_distributed:
        return list(values)
    device = context.device if context.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_from_main(value, context: ProcessContext):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not context.is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
