"""Per-sample seeds: one hash per (seed, epoch, index), and a scope that leaves no trace."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mfm.seeding import rng_state, sample_seed, seeded


def _draws() -> tuple[float, float, float]:
    return torch.rand(1).item(), float(np.random.rand()), random.random()


def test_sample_seeds_are_stable_and_distinct() -> None:
    seeds = {sample_seed(0, epoch, index) for epoch in range(3) for index in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**64 for s in seeds)
    assert sample_seed(7, 2, 11) == sample_seed(7, 2, 11)
    assert sample_seed(7, 2, 11) != sample_seed(8, 2, 11)
    assert sample_seed(-1, 0, 0) != sample_seed(0, 0, 0)  # negative seeds are fine too


def test_seeded_draws_repeat_and_every_stream_is_restored() -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    before = rng_state()
    with seeded(sample_seed(0, 1, 5)):
        first = _draws()
    with seeded(sample_seed(0, 1, 5)):
        assert _draws() == first  # torch, numpy and Python's random all follow the seed
    with seeded(sample_seed(0, 1, 6)):
        assert _draws() != first
    with pytest.raises(ZeroDivisionError), seeded(9):  # a failing sample restores them too
        _draws()
        _ = 1 / 0
    after = rng_state()
    assert torch.equal(after["torch"], before["torch"])
    assert after["python"] == before["python"]
    assert torch.equal(after["numpy"][1], before["numpy"][1])
    assert after["numpy"][2:] == before["numpy"][2:]
