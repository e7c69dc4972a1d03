# robustness: one job scores every classifier on the corrupted set, so each is evaluated once.


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
