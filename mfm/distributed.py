"""Data-parallel training under ``torchrun``: the same stage, N processes.

``torchrun --standalone --nproc-per-node N -m mfm pretrain`` sets ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK``; without them everything here is a no-op and a stage runs as one process.
The params' ``batch_size`` is the global batch (the paper's "2048 across GPUs"), so the lr
scaling and the schedule do not change with N: each rank takes ``batch_size / N`` images
of every global batch, and DDP averages the gradients. Only rank 0 logs, draws progress
bars and writes files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mfm.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The torchrun environment, or a world of one."""
    if not dist.is_available() or not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo otherwise).

    Returns the world and the device this rank trains on (``cuda:LOCAL_RANK`` on GPUs).
    Ranks other than 0 log warnings only.
    """
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size <= 1:
        return World(), device
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    here = world()
    if device.type == "cuda":
        device = torch.device("cuda", here.local_rank)
        torch.cuda.set_device(device)
    if not here.is_main:
        logging.getLogger("mfm").setLevel(logging.WARNING)
    return here, device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(global_batch: int, here: World, key: str) -> int:
    """The share of a global batch each rank computes; it must divide evenly."""
    if global_batch % here.size:
        raise UserError(
            f"{key} = {global_batch} does not split over {here.size} processes; "
            f"make it a multiple of {here.size}"
        )
    return global_batch // here.size


def wrap(model: nn.Module, here: World, device: torch.device, compile: bool = False) -> nn.Module:
    """What the training step calls: DDP around ``model`` when there are several ranks, the
    model itself otherwise, compiled on request. ``model`` itself stays plain, so what is
    saved from it has no ``_orig_mod.``/``module.`` prefixes."""
    wrapped = model
    if here.distributed:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(wrapped) if compile else wrapped


def sum_over_ranks(values: list[float], here: World, device: torch.device) -> list[float]:
    """Element-wise sums of per-rank scalars (one all-reduce for several numbers)."""
    if not here.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast(obj: Any, here: World) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. test scores computed once)."""
    if not here.distributed:
        return obj
    box = [obj if here.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(here: World) -> None:
    if here.distributed:
        dist.barrier()
