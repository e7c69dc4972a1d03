# robustness: one job scores every classifier on the corrupted set, so each is evaluated once.


rule robustness:
    input:
        "data/prepared",
        "data/corrupted",
        expand("results/finetune/{init}/classifier.pt", init=INITS),
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
        expand("results/robustness/{init}/heatmap.png", init=INITS),
        expand("metrics/robustness_{init}.json", init=INITS),
    log:
        "logs/robustness.log",
    conda:
        "../envs/mfm.yaml"
    threads: ALL_CORES
    params:
        data={"img_size": config["data"]["img_size"]},
        robustness=config["robustness"],
        runtime=config["runtime"],
    shell:
        "python -m mfm robustness 2> {log}"
