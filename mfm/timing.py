"""One way to time code: ``torch.utils.benchmark``, for the throughput benchmark and export.

Its clock synchronises the accelerator before every reading, so asynchronous CUDA work is
inside the time it belongs to. Its ``Timer`` runs with one torch thread unless told
otherwise; it is told to keep the process's thread count, so a figure is what the same code
costs in the pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

# torch.utils.benchmark imports torch.utils.cpp_extension, which warns on a CUDA build of
# torch without a GPU ("No CUDA runtime is found"): noise on every stage's stderr, and a
# second line after a user error's one line. Nothing here compiles extensions.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from torch.utils.benchmark import Timer  # noqa: E402
from torch.utils.benchmark.utils.timer import timer as synced_clock  # noqa: E402


def timer_warmup(calls: int) -> int:
    """Untimed calls ``Timer.timeit(calls)`` makes before the timed ones."""
    return max(calls // 100, 2)


def untimed_calls(calls: int, warmup: int) -> int:
    """How many calls precede the timed ones in :func:`mean_seconds`."""
    return max(warmup, timer_warmup(calls))


def mean_seconds(fn: Callable[[], Any], calls: int, warmup: int = 0) -> float:
    """Mean seconds per call of ``fn`` over ``calls`` timed calls.

    At least ``warmup`` untimed calls come first (``untimed_calls`` says how many in all):
    ``Timer.timeit`` always makes its own, so only the rest are made here.
    """
    for _ in range(warmup - timer_warmup(calls)):
        fn()
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(calls).mean


def seconds_once(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes, accelerator work included (e.g. a first, compiling
    call, which a warm-up would hide)."""
    start = synced_clock()
    fn()
    return synced_clock() - start
