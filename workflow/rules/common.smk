# Helpers the rules share.


def launcher(wildcards, resources):
    """How training jobs start: torchrun with one process per GPU the job was given
    (resources.gpu, e.g. from the SLURM profile), plain python without GPUs."""
    gpus = int(resources.get("gpu", 0))
    return f"torchrun --standalone --nproc-per-node={gpus}" if gpus else "python"
