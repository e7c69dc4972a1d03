# prepare -> pretrain. `params:` carries every key a stage reads, so a changed value reruns
# the rule; `input:` lists the code it runs, as dvc.yaml's deps do.


rule prepare:
    input:
        "mfm/prepare.py",
        "mfm/data.py",
    output:
        directory("data/prepared"),
        "metrics/prepare.json",
    log:
        "logs/prepare.log",
    conda:
        "../envs/mfm.yaml"
    params:
        data={
            key: config["data"][key]
            for key in ("dataset", "root", "download", "train_limit", "test_limit")
        },
        runtime={"seed": config["runtime"]["seed"]},
    shell:
        "python -m mfm prepare 2> {log}"


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
