"""How Snakemake's training jobs start: python, torchrun on one node, or srun + torchrun."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from mfm.errors import UserError
from mfm.launch import gpus_per_node, launch_prefix

TWO_NODES = {"nodes": 2, "tasks": 2, "mpi": "srun", "tasks_per_gpu": 0, "gres": "gpu:a100:8"}


def test_one_node_starts_python_or_one_torchrun_process_per_gpu() -> None:
    assert launch_prefix({}) == "python"
    assert launch_prefix({"gpu": 0, "nodes": 1}) == "python"
    assert launch_prefix({"gpu": 4}) == "torchrun --standalone --nproc-per-node=4"
    assert launch_prefix({"gres": "gpu:2"}) == "torchrun --standalone --nproc-per-node=2"


def test_gres_counts_the_gpus_of_each_node() -> None:
    assert gpus_per_node({"gres": "gpu:8"}) == 8
    assert gpus_per_node({"gres": "gpu:h100:4", "gpu": 1}) == 4
    assert gpus_per_node({"gpu": "2"}) == 2
    with pytest.raises(UserError, match="gres: gpu:N"):
        gpus_per_node({"gres": "shard:2"})


def test_several_nodes_run_one_torchrun_per_node_at_a_rendezvous_on_the_batch_host() -> None:
    assert launch_prefix(TWO_NODES) == (
        "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 "
        "torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d "
        "--rdzv-endpoint=$(hostname):$(python -m mfm.launch) --rdzv-id=mfm-$SLURM_JOB_ID"
    )
    cpu_nodes = {k: v for k, v in TWO_NODES.items() if k not in ("gres", "tasks_per_gpu")}
    assert "--nproc-per-node=1 " in launch_prefix(cpu_nodes)  # one gloo process per node


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mpi": None}, "needs mpi: srun"),
        ({"tasks": 1}, "needs tasks: 2"),
        ({"tasks_per_gpu": None}, "needs tasks_per_gpu: 0"),
        ({"gres": None, "gpu": 16}, "give gres: gpu:N, the GPUs of each node"),
        ({"nodes": 0}, "give 1 or more"),
        ({"nodes": "two"}, "nodes='two' is not a whole number"),
    ],
)
def test_a_multinode_job_missing_a_resource_names_it(change: dict, message: str) -> None:
    resources = {k: v for k, v in {**TWO_NODES, **change}.items() if v is not None}
    with pytest.raises(UserError, match=message):
        launch_prefix(resources)


def test_the_rendezvous_port_is_free_here() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mfm.launch"], capture_output=True, text=True, check=True
    ).stdout
    port = int(out)
    assert 1024 <= port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", port))  # nothing holds it
