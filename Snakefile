# The same stages as dvc.yaml, for clusters: `snakemake --cores 2` locally, or with the
# SLURM executor and a profile under workflow/profiles/. Both engines read params.yaml and
# call the same `python -m mfm <stage>` command per stage.
from mfm.config import validate_params


configfile: "params.yaml"


PARAMS = validate_params(config, "params.yaml")


def launcher(wildcards, resources):
    """How a training rule starts: torchrun with one process per GPU the job was given
    (resources.gpu, e.g. from the SLURM profile), plain python without GPUs."""
    gpus = int(resources.get("gpu", 0))
    return f"torchrun --standalone --nproc-per-node={gpus}" if gpus else "python"


include: "workflow/rules/pretrain.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/robustness.smk"
include: "workflow/rules/export.smk"


rule all:
    default_target: True
    input:
        rules.pretrain.output,
        rules.linprobe.output,
        expand(rules.finetune.output, init=INITS),
        rules.robustness.output,
        rules.export.output,
