# prepare: the data set, from wherever it lives, into data/prepared. `params:` carries every
# key a stage reads, so a changed value reruns the rule; `input:` lists the code it runs (the
# import closure of mfm/prepare.py, as dvc.yaml's deps; tests/test_code_deps.py checks both).


rule prepare:
    input:
        "mfm/config.py",
        "mfm/data/files.py",
        "mfm/data/meta.py",
        "mfm/data/prepared.py",
        "mfm/data/sources/__init__.py",
        "mfm/data/sources/cifar.py",
        "mfm/data/sources/common.py",
        "mfm/data/sources/digits.py",
        "mfm/data/sources/fashion_mnist.py",
        "mfm/data/sources/imagefolder.py",
        "mfm/data/subsets.py",
        "mfm/errors.py",
        "mfm/io.py",
        "mfm/overrides.py",
        "mfm/paths.py",
        "mfm/prepare.py",
        "mfm/segment_params.py",
    output:
        directory("data/prepared"),
        "metrics/prepare.json",
    log:
        "logs/prepare.log",
    conda:
        "../envs/mfm.yaml"
    threads: ALL_CORES
    params:
        data={
            key: config["data"][key]
            for key in ("dataset", "root", "download", "train_limit", "test_limit")
        },
        runtime={"seed": config["runtime"]["seed"]},
    shell:
        "python -m mfm prepare 2> {log}"
