"""The robustness heatmap: a valid PNG, written atomically, whatever severities are missing."""

from __future__ import annotations

from PIL import Image

from mfm.figures import error_heatmap


def test_heatmap_is_a_png(tmp_path) -> None:
    path = tmp_path / "figs" / "heat.png"
    error_heatmap({"fog": {1: 0.1, 2: 0.9}, "snow": {2: 0.5}}, path, "toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    assert [p.name for p in path.parent.iterdir()] == ["heat.png"]
