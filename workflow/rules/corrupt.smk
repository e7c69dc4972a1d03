# corrupt: the corrupted test set, built once and independent of any model.


rule corrupt:
    input:
        "data/prepared",
        "mfm/clean_subset.py",
        "mfm/config.py",
        "mfm/corrupt.py",
        "mfm/corrupted_set.py",
        "mfm/data/datasets.py",
        "mfm/data/device_decode.py",
        "mfm/data/jpeg_draft.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/sources/common.py",
        "mfm/data/subsets.py",
        "mfm/data/workers.py",
        "mfm/errors.py",
        "mfm/io.py",
        "mfm/overrides.py",
        "mfm/paths.py",
        "mfm/robustness_metrics.py",
        "mfm/segment_params.py",
    output:
        directory("data/corrupted"),
        "metrics/corrupt.json",
    log:
        "logs/corrupt.log",
    conda:
        "../envs/mfm.yaml"
    threads: ALL_CORES
    params:
        data={"img_size": config["data"]["img_size"]},
        robustness={
            key: config["robustness"][key]
            for key in ("num_images", "corruptions", "severities")
        },
        runtime={key: config["runtime"][key] for key in ("seed", "workers")},
    shell:
        "python -m mfm corrupt 2> {log}"
