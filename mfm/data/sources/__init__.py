"""Where each data set's files come from: one module per family, and the registry prepare uses.

A loader takes the params and returns :class:`~mfm.data.sources.common.ArrayData` (small sets,
held in memory) or :class:`~mfm.data.sources.common.ManifestData` (image folders, left where
they are).
"""

from __future__ import annotations

from collections.abc import Callable

from mfm.config import Params
from mfm.data.sources.cifar import load_cifar
from mfm.data.sources.common import SourceData
from mfm.data.sources.digits import load_digits_data
from mfm.data.sources.fashion_mnist import load_fashion_mnist
from mfm.data.sources.imagefolder import load_imagefolder

DATASETS: dict[str, Callable[[Params], SourceData]] = {
    "fashion_mnist": load_fashion_mnist,
    "digits": load_digits_data,
    "cifar10": load_cifar,
    "cifar100": load_cifar,
    "imagefolder": load_imagefolder,
}


def load_source(params: Params) -> SourceData:
    """Load ``params.data.dataset`` from wherever its files are (the registry lookup)."""
    return DATASETS[params.data.dataset](params)
