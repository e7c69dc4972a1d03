"""``python -m mfm report``: the answer to "does pretraining help?" as one Markdown table.

Reads the metrics JSON the stages wrote and prints MFM init next to random init / scratch,
and the probes next to the same probes on raw pixels (no encoder at all); a stage that has
not run yet is simply left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mfm.paths import metrics_file

# Which two runs a row compares: (MFM run, baseline run) in the stage's metrics.
RANDOM_INIT = ("pretrained", "random")
RAW_PIXELS = ("pretrained", "pixels")  # the same probes with no encoder at all
SCRATCH = ("mfm", "scratch")
# (label, stage, key, runs compared)
ROWS = (
    ("linear probe (logistic regression) top-1", "linprobe", "logreg_top1", RANDOM_INIT),
    ("weighted k-NN top-1", "linprobe", "knn_top1", RANDOM_INIT),
    ("linear probe top-1, baseline: raw pixels", "linprobe", "logreg_top1", RAW_PIXELS),
    ("weighted k-NN top-1, baseline: raw pixels", "linprobe", "knn_top1", RAW_PIXELS),
    ("fine-tune top-1", "finetune", "top1", SCRATCH),
    ("segmentation mIoU", "segment", "miou", SCRATCH),
    ("segmentation pixel accuracy", "segment", "pixel_accuracy", SCRATCH),
    ("corrupted-set clean error (%)", "robustness", "clean_error", SCRATCH),
    ("mCE (scratch = 100)", "robustness", "mce", SCRATCH),
    ("relative mCE (scratch = 100)", "robustness", "relative_mce", SCRATCH),
    ("mean corruption error (%)", "robustness", "mean_corruption_error", SCRATCH),
)


def _read(stage: str, variant: str | None, root: Path) -> dict[str, Any] | None:
    path = root / (metrics_file(stage, variant) if variant else metrics_file(stage))
    return json.loads(path.read_text()) if path.is_file() else None


def metric_value(stage: str, where: tuple[str, str], root: Path) -> float | None:
    """linprobe keeps both encoders in one file; finetune, segment and robustness one file
    per init."""
    group, key = where
    data = _read(stage, None, root) if stage == "linprobe" else _read(stage, group, root)
    if data is None:
        return None
    if stage == "linprobe":
        data = data.get(group, {})
    value = data.get(key)
    return float(value) if isinstance(value, int | float) else None


def table(root: str | Path = ".") -> str:
    """Markdown rows ``| metric | MFM init | random / scratch / pixels | difference |``."""
    root = Path(root)
    header = "| | MFM init | random init / scratch / raw pixels | difference |"
    lines = [header, "|---|---|---|---|"]
    for label, stage, key, (ours, theirs) in ROWS:
        a, b = metric_value(stage, (ours, key), root), metric_value(stage, (theirs, key), root)
        if a is None or b is None:
            continue
        lines.append(f"| {label} | {a:.2f} | {b:.2f} | {a - b:+.2f} |")
    return "\n".join(lines)
