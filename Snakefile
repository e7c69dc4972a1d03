# The same stages as dvc.yaml, for clusters: `snakemake --cores 2` locally, or with the
# SLURM executor and a profile under profiles/. Both engines read params.yaml and
# call the same `python -m mfm <stage>` command per stage.
from mfm.config import validate_params


configfile: "params.yaml"


PARAMS = validate_params(config, "params.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/linprobe.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/corrupt.smk"
include: "workflow/rules/robustness.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/study.smk"


rule all:
    default_target: True
    input:
        rules.pretrain.output,
        rules.linprobe.output,
        expand(rules.finetune.output, init=INITS),
        expand(rules.segment.output, init=INITS),
        rules.robustness.output,
        rules.export.output,
