# The study (`snakemake study`): every variant (config study.variants: a name and its
# overrides) x seed (study.seeds) through pretrain -> linprobe -> finetune -> robustness under
# results/study/runs/{variant}/seed{seed}/, a scratch classifier per seed, then one summary;
# study/dvc.yaml declares the same stages for DVC. Each run's params include its own
# variant's overrides only, so editing one variant reruns just that variant.
import re

VARIANTS = list(config["study"]["variants"])
SEEDS = list(config["study"]["seeds"])
RUN_METRICS = ["linprobe", "finetune_mfm", "robustness_mfm", "robustness_scratch"]


wildcard_constraints:
    variant="|".join(re.escape(name) for name in VARIANTS),
    seed=r"\d+",


rule study_pretrain:
    input:
        "data/prepared",
        "mfm/checkpoint_formats.py",
        "mfm/checkpoints.py",
        "mfm/config.py",
        "mfm/data/augment.py",
        "mfm/data/datasets.py",
        "mfm/data/device_decode.py",
        "mfm/data/jpeg_draft.py",
        "mfm/data/loaders.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/sources/common.py",
        "mfm/data/workers.py",
        "mfm/device.py",
        "mfm/distributed.py",
        "mfm/engine.py",
        "mfm/errors.py",
        "mfm/figures.py",
        "mfm/flops.py",
        "mfm/frequency.py",
        "mfm/imported_outputs.py",
        "mfm/io.py",
        "mfm/losses.py",
        "mfm/models.py",
        "mfm/optim.py",
        "mfm/overrides.py",
        "mfm/paths.py",
        "mfm/pretrain.py",
        "mfm/safe_load.py",
        "mfm/seeding.py",
        "mfm/segment_params.py",
        "mfm/spatial_mask.py",
        "mfm/timm_folder.py",
        "mfm/tracking.py",
        "mfm/weights_import.py",
    output:
        "results/study/runs/{variant}/seed{seed}/pretrain/encoder.pt",
        "results/study/runs/{variant}/seed{seed}/pretrain/reconstruction.png",
        directory("results/study/runs/{variant}/seed{seed}/pretrain/timm"),
        "results/study/runs/{variant}/seed{seed}/metrics/pretrain.json",
        directory("results/study/runs/{variant}/seed{seed}/pretrain/live/plots/metrics"),
    log:
        "logs/study/{variant}/seed{seed}/pretrain.log",
    conda:
        "../envs/mfm.yaml"
    threads: ALL_CORES
    resources:
        gpu=0,
    params:
        launch=launcher,
        data={"img_size": config["data"]["img_size"]},
        model=config["model"],
        pretrain=config["pretrain"],
        runtime=config["runtime"],
        study_variant=lambda wildcards: config["study"]["variants"][wildcards.variant],
    shell:
        "{params.launch} -m mfm pretrain --variant {wildcards.variant} "
        "--out results/study/runs/{wildcards.variant}/seed{wildcards.seed} -S runtime.seed={wildcards.seed} 2> {log}"


rule study_linprobe:
    input:
        "data/prepared",
        "results/study/runs/{variant}/seed{seed}/pretrain/encoder.pt",
        "mfm/config.py",
        "mfm/data/augment.py",
        "mfm/data/datasets.py",
        "mfm/data/device_decode.py",
        "mfm/data/jpeg_draft.py",
        "mfm/data/loaders.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/sources/common.py",
        "mfm/data/workers.py",
        "mfm/device.py",
        "mfm/distributed.py",
        "mfm/errors.py",
        "mfm/io.py",
        "mfm/linprobe.py",
        "mfm/models.py",
        "mfm/overrides.py",
        "mfm/paths.py",
        "mfm/seeding.py",
        "mfm/segment_params.py",
    output:
        "results/study/runs/{variant}/seed{seed}/metrics/linprobe.json",
    log:
        "logs/study/{variant}/seed{seed}/linprobe.log",
    conda:
        "../envs/mfm.yaml"
    threads: ALL_CORES
    params:
        data={"img_size": config["data"]["img_size"]},
        linprobe=config["linprobe"],
        runtime=config["runtime"],
        study_variant=lambda wildcards: config["study"]["variants"][wildcards.variant],
    shell:
        "python -m mfm linprobe --variant {wildcards.variant} "
        "--out results/study/runs/{wildcards.variant}/seed{wildcards.seed} -S runtime.seed={wildcards.seed} 2> {log}"


rule study_finetune:
    input:
        "data/prepared",
        "results/study/runs/{variant}/seed{seed}/pretrain/encoder.pt",
        "mfm/checkpoint_formats.py",
        "mfm/checkpoints.py",
        "mfm/config.py",
        "mfm/data/augment.py",
        "mfm/data/datasets.py",
        "mfm/data/device_decode.py",
        "mfm/data/jpeg_draft.py",
        "mfm/data/loaders.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/sources/common.py",
        "mfm/data/workers.py",
        "mfm/device.py",
        "mfm/distributed.py",
        "mfm/engine.py",
        "mfm/errors.py",
        "mfm/evaluation.py",
        "mfm/finetune.py",
        "mfm/imported_outputs.py",
        "mfm/io.py",
        "mfm/models.py",
        "mfm/optim.py",
        "mfm/overrides.py",
        "mfm/paths.py",
        "mfm/safe_load.py",
        "mfm/seeding.py",
        "mfm/segment_params.py",
        "mfm/tracking.py",
        "mfm/weights_import.py",
    output:
        "results/study/runs/{variant}/seed{seed}/finetune/mfm/classifier.pt",
        "results/study/runs/{variant}/seed{seed}/metrics/finetune_mfm.json",
        directory(
            "results/study/runs/{variant}/seed{seed}/finetune/mfm/live/plots/metrics"
        ),
        "results/study/runs/{variant}/seed{seed}/finetune/mfm/predictions.csv",
    log:
        "logs/study/{variant}/seed{seed}/finetune.log",
    conda:
        "../envs/mfm.yaml"
    threads: ALL_CORES
    resources:
        gpu=0,
    params:
        launch=launcher,
        data={"img_size": config["data"]["img_size"]},
        model=config["model"],
        finetune=config["finetune"],
        runtime=config["runtime"],
        study_variant=lambda wildcards: config["study"]["variants"][wildcards.variant],
    shell:
        "{params.launch} -m mfm finetune --init mfm --variant {wildcards.variant} "
        "--out results/study/runs/{wildcards.variant}/seed{wildcards.seed} -S runtime.seed={wildcards.seed} 2> {log}"


rule study_scratch:
    input:
        "data/prepared",
        "mfm/checkpoint_formats.py",
        "mfm/checkpoints.py",
        "mfm/config.py",
        "mfm/data/augment.py",
        "mfm/data/datasets.py",
        "mfm/data/device_decode.py",
        "mfm/data/jpeg_draft.py",
        "mfm/data/loaders.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/sources/common.py",
        "mfm/data/workers.py",
        "mfm/device.py",
        "mfm/distributed.py",
        "mfm/engine.py",
        "mfm/errors.py",
        "mfm/evaluation.py",
        "mfm/finetune.py",
        "mfm/imported_outputs.py",
        "mfm/io.py",
        "mfm/models.py",
        "mfm/optim.py",
        "mfm/overrides.py",
        "mfm/paths.py",
        "mfm/safe_load.py",
        "mfm/seeding.py",
        "mfm/segment_params.py",
        "mfm/tracking.py",
        "mfm/weights_import.py",
    output:
        "results/study/runs/scratch/seed{seed}/finetune/scratch/classifier.pt",
        "results/study/runs/scratch/seed{seed}/metrics/finetune_scratch.json",
        directory(
            "results/study/runs/scratch/seed{seed}/finetune/scratch/live/plots/metrics"
        ),
        "results/study/runs/scratch/seed{seed}/finetune/scratch/predictions.csv",
    log:
        "logs/study/scratch/seed{seed}/finetune.log",
    conda:
        "../envs/mfm.yaml"
    threads: ALL_CORES
    resources:
        gpu=0,
    params:
        launch=launcher,
        data={"img_size": config["data"]["img_size"]},
        model=config["model"],
        finetune=config["finetune"],
        runtime=config["runtime"],
    shell:
        "{params.launch} -m mfm finetune --init scratch "
        "--out results/study/runs/scratch/seed{wildcards.seed} -S runtime.seed={wildcards.seed} 2> {log}"


rule study_robustness:
    input:
        "data/prepared",
        "data/corrupted",
        "results/study/runs/{variant}/seed{seed}/finetune/mfm/classifier.pt",
        "results/study/runs/scratch/seed{seed}/finetune/scratch/classifier.pt",
        "mfm/config.py",
        "mfm/corrupted_set.py",
        "mfm/data/augment.py",
        "mfm/data/datasets.py",
        "mfm/data/device_decode.py",
        "mfm/data/files.py",
        "mfm/data/jpeg_draft.py",
        "mfm/data/loaders.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/sources/common.py",
        "mfm/data/workers.py",
        "mfm/device.py",
        "mfm/distributed.py",
        "mfm/errors.py",
        "mfm/evaluation.py",
        "mfm/figures.py",
        "mfm/imagenet_benchmarks.py",
        "mfm/io.py",
        "mfm/models.py",
        "mfm/overrides.py",
        "mfm/paths.py",
        "mfm/robustness.py",
        "mfm/robustness_metrics.py",
        "mfm/seeding.py",
        "mfm/segment_params.py",
    output:
        "results/study/runs/{variant}/seed{seed}/robustness/mfm/heatmap.png",
        "results/study/runs/{variant}/seed{seed}/robustness/scratch/heatmap.png",
        "results/study/runs/{variant}/seed{seed}/metrics/robustness_mfm.json",
        "results/study/runs/{variant}/seed{seed}/metrics/robustness_scratch.json",
    log:
        "logs/study/{variant}/seed{seed}/robustness.log",
    conda:
        "../envs/mfm.yaml"
    threads: ALL_CORES
    params:
        data={"img_size": config["data"]["img_size"]},
        robustness=config["robustness"],
        runtime=config["runtime"],
        study_variant=lambda wildcards: config["study"]["variants"][wildcards.variant],
    shell:
        "python -m mfm robustness --variant {wildcards.variant} "
        "--out results/study/runs/{wildcards.variant}/seed{wildcards.seed} --scratch-from results/study/runs/scratch/seed{wildcards.seed} "
        "-S runtime.seed={wildcards.seed} 2> {log}"


rule study:
    input:
        expand(
            "results/study/runs/{variant}/seed{seed}/metrics/{name}.json",
            variant=VARIANTS,
            seed=SEEDS,
            name=RUN_METRICS,
        ),
        expand(
            "results/study/runs/{variant}/seed{seed}/{folder}/live/plots/metrics",
            variant=VARIANTS,
            seed=SEEDS,
            folder=["pretrain", "finetune/mfm"],
        ),
        expand(
            "results/study/runs/{variant}/seed{seed}/pretrain/reconstruction.png",
            variant=VARIANTS,
            seed=SEEDS,
        ),
        expand(
            "results/study/runs/scratch/seed{seed}/metrics/finetune_scratch.json",
            seed=SEEDS,
        ),
        expand(
            "results/study/runs/scratch/seed{seed}/finetune/scratch/live/plots/metrics",
            seed=SEEDS,
        ),
        "mfm/config.py",
        "mfm/errors.py",
        "mfm/figures.py",
        "mfm/io.py",
        "mfm/overrides.py",
        "mfm/paths.py",
        "mfm/report.py",
        "mfm/seed_stats.py",
        "mfm/segment_params.py",
        "mfm/study.py",
    output:
        "results/study/study.md",
        "results/study/study.png",
        "results/study/curves.png",
        "results/study/reconstructions.png",
        "metrics/study.json",
    log:
        "logs/study.log",
    conda:
        "../envs/mfm.yaml"
    params:
        data={"dataset": config["data"]["dataset"]},
        study=config["study"],
    shell:
        "python -m mfm study 2> {log}"
