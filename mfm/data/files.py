"""Which files count as images: one rule for prepare, the benchmarks and ``predict``.

Kept free of torch and numpy so the light ``predict`` command can import it. Hidden entries
(``.DS_Store``, macOS's ``._photo.jpg`` resource forks, ``.ipynb_checkpoints``) are never
images, whatever their extension: they are what copying a folder between machines leaves.
"""

from __future__ import annotations

import os

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


def is_hidden(name: str) -> bool:
    """A dot-file or dot-folder name (``.DS_Store``, ``._foo.jpg``, ``.ipynb_checkpoints``)."""
    return os.path.basename(name).startswith(".")


def is_image_file(name: str) -> bool:
    """A file name (or a path's last part) with a known image extension that is not hidden."""
    base = os.path.basename(name)
    return not is_hidden(base) and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS
