"""Seeded subsets of a data set: which images a size limit keeps.

Each use draws from its own stream of one seed (the training and test limits of prepare, the
corrupted test subset), so changing one limit never moves the images another keeps.
"""

from __future__ import annotations

import numpy as np

TRAIN_STREAM, TEST_STREAM = 0, 1  # prepare's data.train_limit and data.test_limit
CORRUPT_STREAM = 2  # the corrupt stage's robustness.num_images


def subset_indices(n: int, limit: int | None, seed: int, stream: int) -> np.ndarray | None:
    """Sorted seeded random indices of ``limit`` of ``n`` items; None when nothing is dropped."""
    if limit is None or limit >= n:
        return None
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.choice(n, size=limit, replace=False))
