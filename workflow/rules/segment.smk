# scenes: the default job's segmentation task, built once from the prepared images.
# segment runs once per init (the wildcard), the DVC matrix's twin: the same UPerNet recipe
# on the MFM encoder and from scratch.


rule scenes:
    input:
        "data/prepared",
        "mfm/config.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/scenes.py",
        "mfm/data/sources/common.py",
        "mfm/errors.py",
        "mfm/io.py",
        "mfm/overrides.py",
        "mfm/paths.py",
        "mfm/scenes.py",
        "mfm/segment_params.py",
    output:
        directory("data/scenes"),
        "metrics/scenes.json",
    log:
        "logs/scenes.log",
    conda:
        "../envs/mfm.yaml"
    params:
        segment={"scenes": config["segment"]["scenes"]},
        runtime={"seed": config["runtime"]["seed"]},
    shell:
        "python -m mfm scenes 2> {log}"


rule segment:
    input:
        "data/prepared",
        "data/scenes",
        "results/pretrain/encoder.pt",
        "mfm/checkpoints.py",
        "mfm/config.py",
        "mfm/data/augment.py",
        "mfm/data/datasets.py",
        "mfm/data/device_decode.py",
        "mfm/data/files.py",
        "mfm/data/jpeg_draft.py",
        "mfm/data/loaders.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/segmentation_augment.py",
        "mfm/data/segmentation_sets.py",
        "mfm/data/sources/common.py",
        "mfm/data/workers.py",
        "mfm/device.py",
        "mfm/distributed.py",
        "mfm/engine.py",
        "mfm/errors.py",
        "mfm/figures.py",
        "mfm/io.py",
        "mfm/models.py",
        "mfm/optim.py",
        "mfm/overrides.py",
        "mfm/paths.py",
        "mfm/seeding.py",
        "mfm/segment.py",
        "mfm/segment_params.py",
        "mfm/segmentation_inference.py",
        "mfm/segmentation_metrics.py",
        "mfm/segmentation_model.py",
        "mfm/tracking.py",
    output:
        "results/segment/{init}/model.pt",
        "results/segment/{init}/overlay.png",
        "metrics/segment_{init}.json",
        directory("results/segment/{init}/live/plots/metrics"),
    log:
        "logs/segment_{init}.log",
    conda:
        "../envs/mfm.yaml"
    threads: ALL_CORES
    resources:
        gpu=0,
    params:
        launch=launcher,
        model=config["model"],
        segment=config["segment"],
        runtime=config["runtime"],
    shell:
        "{params.launch} -m mfm segment --init {wildcards.init} 2> {log}"
