# What the rules share: the inits finetune runs for (the DVC matrix's values, from the
# package itself) and how training jobs start.
from mfm.config import INITS

# Snakemake sets OMP_NUM_THREADS (and the BLAS thread counts) to a rule's threads, 1 unless
# the rule says otherwise; stage rules ask for more than any machine has and get what there
# is: Snakemake lowers a rule's threads to --cores locally, and to the job's CPUs on SLURM.
ALL_CORES = 1024


wildcard_constraints:
    init="|".join(INITS),


def launcher(wildcards, resources):
    """How training jobs start: torchrun with one process per GPU the job was given
    (resources.gpu, e.g. from the SLURM profile), plain python without GPUs."""
    gpus = int(resources.get("gpu", 0))
    return f"torchrun --standalone --nproc-per-node={gpus}" if gpus else "python"
