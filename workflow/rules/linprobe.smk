# linprobe: frozen-feature probes, pretrained encoder vs random init.


rule linprobe:
    input:
        "data/prepared",
        "results/pretrain/encoder.pt",
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
        "mfm/errors.py",
        "mfm/io.py",
        "mfm/linprobe.py",
        "mfm/models.py",
        "mfm/overrides.py",
        "mfm/paths.py",
        "mfm/seeding.py",
        "mfm/segment_params.py",
    output:
        "metrics/linprobe.json",
    log:
        "logs/linprobe.log",
    conda:
        "../envs/mfm.yaml"
    threads: ALL_CORES
    params:
        data={"img_size": config["data"]["img_size"]},
        linprobe=config["linprobe"],
        runtime=config["runtime"],
    shell:
        "python -m mfm linprobe 2> {log}"
