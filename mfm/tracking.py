"""dvclive set-up that survives resume and failure.

A run logs into a hidden staging folder next to ``live/`` and the curves replace ``live/``
only when training ends, so a run that fails (a NaN loss, a bad image) leaves the previous
run's curves in place. A run killed after its last checkpoint has logged steps that the
resumed run will log again; trimming them keeps every plot a single, monotone curve.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from mfm.io import replace_dir


def trim_history(live_dir: Path, last_step: int) -> None:
    """Drop rows with ``step > last_step`` from every dvclive metrics TSV under ``live_dir``."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        with tsv.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
            fields = list(rows[0]) if rows else []
        kept = [row for row in rows if int(row["step"]) <= last_step]
        if len(kept) == len(rows):
            continue
        with tsv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, delimiter="\t")
            writer.writeheader()
            writer.writerows(kept)


def staging_dir(live_dir: str | Path) -> Path:
    """Where an unfinished run's curves are kept until it ends."""
    live_dir = Path(live_dir)
    return live_dir.with_name(f".{live_dir.name}.partial")


def open_live(live_dir: str | Path, resume_step: int | None) -> Any:
    """A dvclive logger (metrics and plots are declared in dvc.yaml by hand) writing into the
    staging folder; a resumed run continues the interrupted run's curves there.

    dvclive is imported here, not at module level, so tools that never log (the benchmark,
    a GPU box with only torch) do not need it installed.
    """
    from dvclive import Live

    staging = staging_dir(live_dir)
    resume = resume_step is not None and staging.is_dir()
    if resume:
        trim_history(staging, resume_step)
    else:
        shutil.rmtree(staging, ignore_errors=True)
    return Live(str(staging), resume=resume, dvcyaml=False, save_dvc_exp=False, report=None)


def publish_live(live: Any, live_dir: str | Path) -> None:
    """End the logger and put the finished run's curves in place of ``live_dir``."""
    live.end()
    if staging_dir(live_dir).is_dir():  # a logger that never wrote leaves nothing to publish
        replace_dir(staging_dir(live_dir), live_dir)
