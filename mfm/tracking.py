"""dvclive set-up that survives resume: stale rows past the checkpoint are dropped.

A run killed after its last checkpoint has logged steps that the resumed run will log
again; trimming them keeps every plot a single, monotone curve.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


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


def open_live(live_dir: str | Path, resume_step: int | None) -> Any:
    """A dvclive logger whose metrics and plots are declared in dvc.yaml by hand.

    dvclive is imported here, not at module level, so tools that never log (the benchmark,
    a GPU box with only torch) do not need it installed.
    """
    from dvclive import Live

    live_dir = Path(live_dir)
    if resume_step is not None and live_dir.is_dir():
        trim_history(live_dir, resume_step)
    return Live(
        str(live_dir),
        resume=resume_step is not None,
        dvcyaml=False,
        save_dvc_exp=False,
        report=None,
    )
