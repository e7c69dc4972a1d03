"""The files a training stage leaves, for a stage that imported its weights instead.

DVC and Snakemake expect every declared output: a finished (``complete``) checkpoint, which a
later training run ignores, and a dvclive folder with the imported model's scores at step 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mfm.checkpoints import fingerprint, write_checkpoint
from mfm.tracking import open_live, publish_live


def write_imported_outputs(
    out_dir: Path, model: torch.nn.Module, config: dict[str, Any], scores: dict[str, float]
) -> None:
    """A complete checkpoint of ``model`` tied to ``config``, and ``scores`` as step 0."""
    state = {
        "model": model.state_dict(),
        "optimizer": {},
        "epoch": 0,
        "global_step": 0,
        "history": [],
        "fingerprint": fingerprint(config),
        "complete": True,
    }
    write_checkpoint(state, out_dir / "checkpoint.pt", complete=True)
    live = open_live(out_dir / "live", None)
    live.step = 0
    for name, value in scores.items():
        live.log_metric(name, value)
    publish_live(live, out_dir / "live")
