# finetune runs once per init (the wildcard), the DVC matrix's twin: the same recipe from the
# MFM encoder and from scratch.


rule finetune:
    input:
        "data/prepared",
        "results/pretrain/encoder.pt",
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
        "results/finetune/{init}/classifier.pt",
        "metrics/finetune_{init}.json",
        directory("results/finetune/{init}/live/plots/metrics"),
        "results/finetune/{init}/predictions.csv",
    log:
        "logs/finetune_{init}.log",
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
        "{params.launch} -m mfm finetune --init {wildcards.init} 2> {log}"
