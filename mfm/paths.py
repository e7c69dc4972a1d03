"""Where each stage reads and writes, relative to the project root.

dvc.yaml and the Snakefile name the same paths; a test checks that they agree.
"""

from pathlib import Path

PREPARED_DIR = Path("data/prepared")
PRETRAIN_DIR = Path("results/pretrain")
FINETUNE_DIR = Path("results/finetune")
ROBUSTNESS_DIR = Path("results/robustness")
EXPORT_DIR = Path("results/export")
METRICS_DIR = Path("metrics")


def metrics_file(stage: str, *variant: str) -> Path:
    """``metrics/<stage>[_<variant>].json``: one JSON of numbers per stage (and matrix item),
    declared as DVC metrics."""
    return METRICS_DIR / f"{'_'.join((stage, *variant))}.json"
