# corrupt -> robustness. The corrupted test set is built once, independent of any model;
# one robustness job scores every classifier so each is evaluated once.


rule corrupt:
    input:
        "data/prepared",
        "mfm/corrupt.py",
    output:
        directory("data/corrupted"),
        "metrics/corrupt.json",
    log:
        "logs/corrupt.log",
    conda:
        "../envs/mfm.yaml"
    params:
        robustness={
            key: config["robustness"][key]
            for key in ("num_images", "corruptions", "severities")
        },
        runtime={key: config["runtime"][key] for key in ("seed", "workers")},
    shell:
        "python -m mfm corrupt 2> {log}"


rule robustness:
    input:
        "data/prepared",
        "data/corrupted",
        expand("results/finetune/{init}/classifier.pt", init=INITS),
        "mfm/robustness.py",
        "mfm/robustness_metrics.py",
        "mfm/benchmarks.py",
        "mfm/finetune.py",
    output:
        expand("results/robustness/{init}/heatmap.png", init=INITS),
        expand("metrics/robustness_{init}.json", init=INITS),
    log:
        "logs/robustness.log",
    conda:
        "../envs/mfm.yaml"
    params:
        data={"img_size": config["data"]["img_size"]},
        robustness=config["robustness"],
        runtime=config["runtime"],
    shell:
        "python -m mfm robustness 2> {log}"
