# pretrain: MFM (or a restoration pretext) on the prepared training images.


rule pretrain:
    input:
        "data/prepared",
        "mfm/pretrain.py",
        "mfm/engine.py",
        "mfm/tracking.py",
        "mfm/frequency.py",
        "mfm/losses.py",
        "mfm/models.py",
        "mfm/data.py",
        "mfm/figures.py",
    output:
        "results/pretrain/encoder.pt",
        "results/pretrain/reconstruction.png",
        "metrics/pretrain.json",
        directory("results/pretrain/live/plots/metrics"),
    log:
        "logs/pretrain.log",
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
        "{params.launch} -m mfm pretrain 2> {log}"
