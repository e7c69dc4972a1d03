# What the rules share: the inits finetune runs for (the DVC matrix's values, from the
# package itself) and how training jobs start.
from mfm.config import INITS
from mfm.launch import launch_prefix

# Snakemake sets OMP_NUM_THREADS (and the BLAS thread counts) to a rule's threads, 1 unless
# the rule says otherwise; stage rules ask for more than any machine has and get what there
# is: Snakemake lowers a rule's threads to --cores locally, and to the job's CPUs on SLURM.
ALL_CORES = 1024


wildcard_constraints:
    init="|".join(INITS),


def launcher(wildcards, resources):
    """How training jobs start (mfm/launch.py): plain python without GPUs, torchrun with one
    process per GPU (resources.gpu, or gres: gpu:N) on one node, and with nodes: N one
    torchrun per node of the SLURM allocation, started by srun."""
    return launch_prefix(resources)
