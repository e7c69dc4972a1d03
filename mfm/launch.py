"""How a Snakemake training job starts, from the resources its rule was given.

* no GPUs, one node: plain ``python``;
* ``G`` GPUs on one node: ``torchrun --standalone`` with one process per GPU;
* ``nodes: N`` on SLURM: one ``srun`` task per node, each a ``torchrun --nnodes N`` agent
  with ``G`` processes (one on CPU nodes), meeting at a c10d rendezvous on the node that
  runs the job's batch script (the allocation's first node) on a port free there.

Several nodes change nothing in the stage itself: ``batch_size`` is the global batch, so the
lr, the schedule, resume and SIGTERM handling are those of one node with ``N x G`` processes.

Several nodes need the SLURM plugin's MPI path, where the batch script runs the rule itself
instead of inside a one-task job step; :func:`check_multinode` names any resource missing
for it. ``python -m mfm.launch`` prints a free TCP port (the rendezvous port).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from typing import Any

from mfm.errors import UserError

GPU_GRES = re.compile(r"^gpu(?::[\w.-]+)?:(\d+)$")  # gpu:8, gpu:a100:8


def _count(resources: Mapping[str, Any], key: str, default: int) -> int:
    value = resources.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"resource {key}={value!r} is not a whole number") from None


def gpus_per_node(resources: Mapping[str, Any]) -> int:
    """GPUs on each node: ``gres: gpu[:type]:N`` (a per-node count in SLURM), else ``gpu``."""
    gres = str(resources.get("gres") or "")
    if gres:
        match = GPU_GRES.match(gres)
        if match is None:
            raise UserError(f"resource gres={gres!r}: give GPUs per node as gres: gpu:N")
        return int(match.group(1))
    return _count(resources, "gpu", 0)


def check_multinode(resources: Mapping[str, Any], nodes: int) -> None:
    """Each resource a job on ``nodes`` nodes needs, named with the value to give it."""
    where = "under the rule in the profile's set-resources"
    if str(resources.get("mpi") or "") != "srun":
        raise UserError(
            f"nodes: {nodes} needs mpi: srun {where}: the SLURM plugin then runs the rule in "
            "the job's batch script, and the rule starts one torchrun per node with srun"
        )
    if _count(resources, "tasks", 0) != nodes:
        raise UserError(f"nodes: {nodes} needs tasks: {nodes} {where} (one launcher per node)")
    if resources.get("gpu") and not resources.get("gres"):
        raise UserError(
            f"nodes: {nodes}: gpu counts GPUs for the whole job (sbatch --gpus), which SLURM "
            f"may split unevenly; give gres: gpu:N, the GPUs of each node, {where}"
        )
    if resources.get("gres") and _count(resources, "tasks_per_gpu", -1) != 0:
        raise UserError(
            f"nodes: {nodes} with GPUs needs tasks_per_gpu: 0 {where}: otherwise the SLURM "
            "plugin turns tasks into --ntasks-per-gpu"
        )


def launch_prefix(resources: Mapping[str, Any]) -> str:
    """The shell words that start ``-m mfm <stage>`` for a job with these resources."""
    nodes = _count(resources, "nodes", 1)
    gpus = gpus_per_node(resources)
    if nodes < 1:
        raise UserError(f"resource nodes={nodes}: give 1 or more")
    if nodes == 1:
        return f"torchrun --standalone --nproc-per-node={gpus}" if gpus else "python"
    check_multinode(resources, nodes)
    return (
        f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 "
        f"torchrun --nnodes={nodes} --nproc-per-node={max(gpus, 1)} --rdzv-backend=c10d "
        "--rdzv-endpoint=$(hostname):$(python -m mfm.launch) --rdzv-id=mfm-$SLURM_JOB_ID"
    )


def free_port() -> int:
    """A TCP port nothing listens on here now (the OS's pick among the ephemeral ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    print(free_port())
