"""scikit-learn's 8x8 digits: a data set that needs no download, for quick runs and tests."""

from __future__ import annotations

import numpy as np

from mfm.config import Params
from mfm.data.sources.common import ArrayData, as_images

DIGITS_TEST_FRACTION = 0.2
DIGITS_MAX_VALUE = 16


def load_digits_data(params: Params) -> ArrayData:
    """scikit-learn's 8x8 digits, scaled 0..16 -> 0..255, split 80/20 stratified and seeded."""
    import sklearn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    scaled = np.rint(bunch.images * (255 / DIGITS_MAX_VALUE))
    images = as_images(np.clip(scaled, 0, 255))
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=params.runtime.seed,
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return ArrayData(
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        [str(name) for name in bunch.target_names],
        f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})",
    )
