"""Where each stage reads and writes, relative to the project root.

dvc.yaml and the Snakefile name the same paths; a test checks that they agree.
"""

from dataclasses import dataclass
from pathlib import Path

PREPARED_DIR = Path("data/prepared")
CORRUPTED_DIR = Path("data/corrupted")
SCENES_DIR = Path("data/scenes")  # segmentation scenes built from the prepared images
WEIGHTS_DIR = Path("weights")  # imported checkpoints (python -m mfm import), a stage dependency
PRETRAIN_DIR = Path("results/pretrain")
FINETUNE_DIR = Path("results/finetune")
ROBUSTNESS_DIR = Path("results/robustness")
SEGMENT_DIR = Path("results/segment")
EXPORT_DIR = Path("results/export")
METRICS_DIR = Path("metrics")


STUDY_DIR = Path("results/study")
STUDY_RUNS_DIR = STUDY_DIR / "runs"  # one folder per variant x seed, and scratch per seed


def study_run_dir(name: str, seed: int, runs_dir: Path = STUDY_RUNS_DIR) -> Path:
    """``results/study/runs/<variant or scratch>/seed<k>``: one study run's results root."""
    return runs_dir / name / f"seed{seed}"


def metrics_file(stage: str, *variant: str, metrics_dir: Path = METRICS_DIR) -> Path:
    """``metrics/<stage>[_<variant>].json``: one JSON of numbers per stage (and matrix item),
    declared as DVC metrics."""
    return metrics_dir / f"{'_'.join((stage, *variant))}.json"


@dataclass(frozen=True)
class RunDirs:
    """Where one run's models, figures and metrics go (the prepared and corrupted data are
    shared). The main job uses ``results/`` and ``metrics/``; ``--out R`` puts a run under
    ``R/`` and ``R/metrics/``, as the study does for each variant and seed."""

    root: Path | None = None

    def _under(self, default: Path) -> Path:
        return default if self.root is None else self.root / default.relative_to("results")

    @property
    def pretrain(self) -> Path:
        return self._under(PRETRAIN_DIR)

    @property
    def finetune(self) -> Path:
        return self._under(FINETUNE_DIR)

    @property
    def segment(self) -> Path:
        return self._under(SEGMENT_DIR)

    @property
    def robustness(self) -> Path:
        return self._under(ROBUSTNESS_DIR)

    @property
    def export(self) -> Path:
        return self._under(EXPORT_DIR)

    @property
    def metrics(self) -> Path:
        return METRICS_DIR if self.root is None else self.root / "metrics"

    def stage_kwargs(self, stage: str) -> dict[str, Path]:
        """The output/input folders a stage's ``run`` takes, for this run."""
        return {
            "pretrain": {"out_dir": self.pretrain},
            "linprobe": {"pretrain_dir": self.pretrain},
            "finetune": {"pretrain_dir": self.pretrain, "out_root": self.finetune},
            "segment": {"pretrain_dir": self.pretrain, "out_root": self.segment},
            "robustness": {"finetune_dir": self.finetune, "out_dir": self.robustness},
            "export": {"finetune_dir": self.finetune, "export_dir": self.export},
        }.get(stage, {})
