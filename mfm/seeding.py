"""Seeds and RNG state: what makes a run, and a resumed run, replay the same random draws.

Three generators matter: torch's (device-side augmentation, corruption masks, dropout),
numpy's and Python's ``random`` (timm's Mixup, RandomErasing and RandAugment draw from the
latter two). Their state is stored as plain tensors, lists and ints, so a checkpoint holding
it still loads with ``weights_only=True``.

Worker-side augmentation (an image folder's random crop, RandAugment) is seeded per sample
instead, from (seed, epoch, index): a DataLoader worker's stream depends on how many workers
there are and on which batch the loader started from, so only a per-sample seed lets a
resumed run, or one with another worker count, draw the same crops.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one sample of one epoch, hashed (numpy's SeedSequence) so that
    neighbouring epochs and indices get unrelated streams."""
    sequence = np.random.SeedSequence([seed % 2**64, epoch, index])
    return int(sequence.generate_state(1, np.uint64)[0])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, numpy's and Python's ``random`` for one draw, then put all
    three back as they were, so the caller's streams do not move.

    CUDA generators are left alone: ``torch.manual_seed`` would reseed them too, and the
    device-side augmentation of the main process draws from them.
    """
    torch_state, numpy_state, python_state = (
        torch.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
    )
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
