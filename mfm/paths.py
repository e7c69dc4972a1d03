"""Where each stage reads and writes, relative to the project root.

dvc.yaml and the Snakefile name the same paths; a test checks that they agree.
"""

from pathlib import Path

PREPARED_DIR = Path("data/prepared")
PRETRAIN_DIR = Path("results/pretrain")
METRICS_DIR = Path("metrics")


def metrics_file(stage: str) -> Path:
    """``metrics/<stage>.json``: one JSON of numbers per stage, declared as DVC metrics."""
    return METRICS_DIR / f"{stage}.json"
