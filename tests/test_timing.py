"""The shared timer: a mean per call, the warm-up it promises, and the process's threads."""

from __future__ import annotations

import time

import pytest
import torch

from mfm.timing import mean_seconds, seconds_once, untimed_calls


def test_mean_is_per_call_not_the_total() -> None:
    def nap() -> None:
        time.sleep(0.02)

    mean = mean_seconds(nap, calls=5)
    assert 0.02 <= mean < 0.06  # the 5 calls together take >= 0.1 s


@pytest.mark.parametrize(("calls", "warmup"), [(3, 0), (3, 1), (3, 5), (400, 0), (400, 7)])
def test_untimed_calls_come_first_as_promised(calls: int, warmup: int) -> None:
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1

    mean_seconds(tick, calls, warmup)
    assert count == untimed_calls(calls, warmup) + calls
    assert untimed_calls(calls, warmup) >= warmup


def test_timed_code_keeps_the_process_threads() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    torch.set_num_threads(2)
    try:
        mean_seconds(lambda: seen.append(torch.get_num_threads()), calls=2)
    finally:
        torch.set_num_threads(before)
    assert set(seen) == {2}  # torch's Timer alone would run it on 1 thread


def test_one_call_is_timed_once() -> None:
    calls: list[str] = []

    def first_call() -> None:
        calls.append("called")
        time.sleep(0.01)

    assert seconds_once(first_call) >= 0.01 and calls == ["called"]
