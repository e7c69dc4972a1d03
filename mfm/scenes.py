"""The scenes stage: the default job's segmentation task, built once from the prepared images.

A cached stage of its own, so both inits of ``segment`` (and every rerun) read the very same
scenes; see :mod:`mfm.data.scenes` for how a scene is composed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mfm.config import Params
from mfm.data.scenes import build_scenes
from mfm.paths import PREPARED_DIR, SCENES_DIR


def run(
    params: Params, prepared_dir: str | Path = PREPARED_DIR, out_dir: str | Path = SCENES_DIR
) -> dict[str, Any]:
    """Write ``data/scenes`` (images/, masks/, classes.txt); returns metrics/scenes.json."""
    return build_scenes(
        Path(prepared_dir), params.segment.scenes, params.runtime.seed, Path(out_dir)
    )
