"""What ``runtime.workers: auto`` means: the CPUs this job may use, shared by the training
processes of this node, one kept for each process itself; none for prepared arrays.

The CPUs a job may use are its affinity mask (what a SLURM job step, a cgroup or ``taskset``
allows), further capped by SLURM's ``SLURM_CPUS_PER_TASK`` when that is set; ``os.cpu_count``
would count the whole node. torchrun's ``LOCAL_WORLD_SIZE`` processes share them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch stays out: the corruption workers import usable_cpus
    from torch.utils.data import Dataset

Workers = int | Literal["auto"]
MAX_AUTO_WORKERS = 16  # past this, more decoders per GPU mostly add memory and start-up time


def usable_cpus() -> int:
    """CPUs this process may run on (its allocation, not the node)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cpus = cpus or os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return cpus


def auto_workers() -> int:
    """Workers per training process: this node's usable CPUs over its processes, minus one."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(0, min(MAX_AUTO_WORKERS, usable_cpus() // processes - 1))


def resolve_workers(workers: Workers, dataset: Dataset | None = None) -> int:
    """``workers`` as a DataLoader's ``num_workers``. ``auto`` gives prepared arrays none:
    slicing a memory-mapped array in the main process beats shipping it from a worker."""
    from mfm.data.datasets import ArrayImages

    if workers != "auto":
        return int(workers)
    if isinstance(dataset, ArrayImages):
        return 0
    return auto_workers()
