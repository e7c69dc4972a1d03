# What the rules share: the inits finetune runs for (the DVC matrix's values, from the
# package itself) and how training jobs start.
from mfm.config import INITS


wildcard_constraints:
    init="|".join(INITS),


def launcher(wildcards, resources):
    """How training jobs start: torchrun with one process per GPU the job was given
    (resources.gpu, e.g. from the SLURM profile), plain python without GPUs."""
    gpus = int(resources.get("gpu", 0))
    return f"torchrun --standalone --nproc-per-node={gpus}" if gpus else "python"
