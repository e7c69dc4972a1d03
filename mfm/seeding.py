"""Seeds and RNG state: what makes a run, and a resumed run, replay the same random draws.

Three generators matter: torch's (device-side augmentation, corruption masks, dropout),
numpy's and Python's ``random`` (timm's Mixup, RandomErasing and RandAugment draw from the
latter two). Their state is stored as plain tensors, lists and ints, so a checkpoint holding
it still loads with ``weights_only=True``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """torch, numpy and Python's ``random``: timm's Mixup and RandomErasing draw from the
    latter two, so all three must restart with each epoch for a resume to replay it."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every generator's state as plain tensors, lists and ints (``weights_only`` loads it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
