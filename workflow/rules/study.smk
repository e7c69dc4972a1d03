# The pretext study (`snakemake study`): every pretext through pretrain -> linprobe ->
# finetune -> robustness under results/study/{pretext}/, against the main job's scratch
# classifier, then one table; study/dvc.yaml declares the same stages for DVC.

PRETEXTS = ["mfm", "sr", "deblur", "denoise"]
STUDY_METRICS = ["linprobe", "finetune_mfm", "robustness_mfm", "robustness_scratch"]


wildcard_constraints:
    pretext="|".join(PRETEXTS),


rule study_pretrain:
    input:
        "data/prepared",
        "mfm/checkpoints.py",
        "mfm/config.py",
        "mfm/data/augment.py",
        "mfm/data/datasets.py",
        "mfm/data/loaders.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/sources/common.py",
        "mfm/device.py",
        "mfm/distributed.py",
        "mfm/engine.py",
        "mfm/errors.py",
        "mfm/figures.py",
        "mfm/frequency.py",
        "mfm/io.py",
        "mfm/losses.py",
        "mfm/models.py",
        "mfm/optim.py",
        "mfm/paths.py",
        "mfm/pretrain.py",
        "mfm/seeding.py",
        "mfm/tracking.py",
    output:
        "results/study/{pretext}/pretrain/encoder.pt",
        "results/study/{pretext}/pretrain/reconstruction.png",
        "results/study/{pretext}/metrics/pretrain.json",
        directory("results/study/{pretext}/pretrain/live/plots/metrics"),
    log:
        "logs/study_pretrain_{pretext}.log",
    conda:
        "../envs/mfm.yaml"
    resources:
        gpu=0,
    params:
        launch=launcher,
        data={"img_size": config["data"]["img_size"]},
        model=config["model"],
        pretrain=config["pretrain"],
        runtime=config["runtime"],
    shell:
        "{params.launch} -m mfm pretrain --out results/study/{wildcards.pretext} "
        "-S pretrain.pretext={wildcards.pretext} 2> {log}"


rule study_linprobe:
    input:
        "data/prepared",
        "results/study/{pretext}/pretrain/encoder.pt",
        "mfm/config.py",
        "mfm/data/augment.py",
        "mfm/data/datasets.py",
        "mfm/data/loaders.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/sources/common.py",
        "mfm/device.py",
        "mfm/distributed.py",
        "mfm/errors.py",
        "mfm/io.py",
        "mfm/linprobe.py",
        "mfm/models.py",
        "mfm/paths.py",
        "mfm/seeding.py",
    output:
        "results/study/{pretext}/metrics/linprobe.json",
    log:
        "logs/study_linprobe_{pretext}.log",
    conda:
        "../envs/mfm.yaml"
    params:
        data={"img_size": config["data"]["img_size"]},
        linprobe=config["linprobe"],
        runtime=config["runtime"],
    shell:
        "python -m mfm linprobe --out results/study/{wildcards.pretext} 2> {log}"


rule study_finetune:
    input:
        "data/prepared",
        "results/study/{pretext}/pretrain/encoder.pt",
        "mfm/checkpoints.py",
        "mfm/config.py",
        "mfm/data/augment.py",
        "mfm/data/datasets.py",
        "mfm/data/loaders.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/sources/common.py",
        "mfm/device.py",
        "mfm/distributed.py",
        "mfm/engine.py",
        "mfm/errors.py",
        "mfm/evaluation.py",
        "mfm/finetune.py",
        "mfm/io.py",
        "mfm/models.py",
        "mfm/optim.py",
        "mfm/paths.py",
        "mfm/seeding.py",
        "mfm/tracking.py",
    output:
        "results/study/{pretext}/finetune/mfm/classifier.pt",
        "results/study/{pretext}/metrics/finetune_mfm.json",
        directory("results/study/{pretext}/finetune/mfm/live/plots/metrics"),
        "results/study/{pretext}/finetune/mfm/predictions.csv",
    log:
        "logs/study_finetune_{pretext}.log",
    conda:
        "../envs/mfm.yaml"
    resources:
        gpu=0,
    params:
        launch=launcher,
        data={"img_size": config["data"]["img_size"]},
        model=config["model"],
        finetune=config["finetune"],
        runtime=config["runtime"],
    shell:
        "{params.launch} -m mfm finetune --init mfm --out results/study/{wildcards.pretext} "
        "2> {log}"


rule study_robustness:
    input:
        "data/prepared",
        "data/corrupted",
        "results/study/{pretext}/finetune/mfm/classifier.pt",
        "results/finetune/scratch/classifier.pt",
        "mfm/config.py",
        "mfm/corrupted_set.py",
        "mfm/data/augment.py",
        "mfm/data/datasets.py",
        "mfm/data/files.py",
        "mfm/data/loaders.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/sources/common.py",
        "mfm/device.py",
        "mfm/distributed.py",
        "mfm/errors.py",
        "mfm/evaluation.py",
        "mfm/figures.py",
        "mfm/imagenet_benchmarks.py",
        "mfm/io.py",
        "mfm/models.py",
        "mfm/paths.py",
        "mfm/robustness.py",
        "mfm/robustness_metrics.py",
        "mfm/seeding.py",
    output:
        "results/study/{pretext}/robustness/mfm/heatmap.png",
        "results/study/{pretext}/robustness/scratch/heatmap.png",
        "results/study/{pretext}/metrics/robustness_mfm.json",
        "results/study/{pretext}/metrics/robustness_scratch.json",
    log:
        "logs/study_robustness_{pretext}.log",
    conda:
        "../envs/mfm.yaml"
    params:
        data={"img_size": config["data"]["img_size"]},
        robustness=config["robustness"],
        runtime=config["runtime"],
    shell:
        "python -m mfm robustness --out results/study/{wildcards.pretext} "
        "--scratch-from results 2> {log}"


rule study:
    input:
        expand(
            "results/study/{pretext}/metrics/{name}.json",
            pretext=PRETEXTS,
            name=STUDY_METRICS,
        ),
        "metrics/finetune_scratch.json",
        expand("results/study/{pretext}/pretrain/live/plots/metrics", pretext=PRETEXTS),
        expand(
            "results/study/{pretext}/finetune/mfm/live/plots/metrics", pretext=PRETEXTS
        ),
        expand("results/study/{pretext}/pretrain/reconstruction.png", pretext=PRETEXTS),
        "results/finetune/scratch/live/plots/metrics",
        "mfm/config.py",
        "mfm/errors.py",
        "mfm/figures.py",
        "mfm/io.py",
        "mfm/paths.py",
        "mfm/report.py",
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
    shell:
        "python -m mfm study 2> {log}"
