# pretrain: MFM (or a restoration or spatial-masking pretext) on the prepared training images.


rule pretrain:
    input:
        "data/prepared",
        "weights",
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
        "results/pretrain/encoder.pt",
        "results/pretrain/reconstruction.png",
        directory("results/pretrain/timm"),
        "metrics/pretrain.json",
        directory("results/pretrain/live/plots/metrics"),
    log:
        "logs/pretrain.log",
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
    shell:
        "{params.launch} -m mfm pretrain 2> {log}"
