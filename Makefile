# Quick start: `make repro` runs the main job, `make test` runs the checks and tests.
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: setup data repro study test lint clean-env

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,slurm]'
	touch $@

data:
	bash workflow/scripts/get-fashion-mnist.sh

repro: setup data
	dvc repro
	python -m mfm report

study: setup data
	dvc repro study/dvc.yaml
	cat results/study/study.md

lint: setup
	ruff check .
	ruff format --check .
	snakefmt --check Snakefile workflow
	snakemake --lint

test: lint
	python -m pytest -q --durations=15

clean-env:
	rm -rf $(VENV)
