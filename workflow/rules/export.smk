# export: the fine-tuned classifier as ONNX, kept only if it matches torch on test images.


rule export:
    input:
        "data/prepared",
        f"results/finetune/{config['export']['init']}/classifier.pt",
        "mfm/__init__.py",
        "mfm/config.py",
        "mfm/data/augment.py",
        "mfm/data/datasets.py",
        "mfm/data/device_decode.py",
        "mfm/data/files.py",
        "mfm/data/jpeg_draft.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/sources/common.py",
        "mfm/errors.py",
        "mfm/export.py",
        "mfm/io.py",
        "mfm/models.py",
        "mfm/overrides.py",
        "mfm/paths.py",
        "mfm/predict.py",
        "mfm/segment_params.py",
        "mfm/timing.py",
    output:
        "results/export/model.onnx",
        "metrics/export.json",
    log:
        "logs/export.log",
    conda:
        "../envs/mfm.yaml"
    threads: ALL_CORES
    params:
        data={"img_size": config["data"]["img_size"]},
        export=config["export"],
    shell:
        "python -m mfm export 2> {log}"
