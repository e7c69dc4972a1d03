# linprobe: frozen-feature probes, pretrained encoder vs random init.


rule linprobe:
    input:
        "data/prepared",
        "results/pretrain/encoder.pt",
        "mfm/linprobe.py",
        "mfm/models.py",
        "mfm/data.py",
    output:
        "metrics/linprobe.json",
    log:
        "logs/linprobe.log",
    conda:
        "../envs/mfm.yaml"
    params:
        data={"img_size": config["data"]["img_size"]},
        linprobe=config["linprobe"],
        runtime=config["runtime"],
    shell:
        "python -m mfm linprobe 2> {log}"
