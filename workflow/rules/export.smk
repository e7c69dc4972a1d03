# export: the fine-tuned classifier as ONNX, kept only if it matches torch on test images.


rule export:
    input:
        "data/prepared",
        f"results/finetune/{config['export']['init']}/classifier.pt",
        "mfm/export.py",
        "mfm/predict.py",
        "mfm/models.py",
    output:
        "results/export/model.onnx",
        "metrics/export.json",
    log:
        "logs/export.log",
    conda:
        "../envs/mfm.yaml"
    params:
        data={"img_size": config["data"]["img_size"]},
        export=config["export"],
    shell:
        "python -m mfm export 2> {log}"
