"""Mean +- std over seeds and seed-paired differences with Student-t 95 % intervals."""

from __future__ import annotations

import math

import pytest

from mfm.seed_stats import format_difference, format_summary, paired_difference, summary


def test_summary_uses_the_sample_std() -> None:
    result = summary([1.0, 2.0, 3.0, 6.0])
    assert result["mean"] == 3.0
    assert result["std"] == pytest.approx(math.sqrt(14 / 3))  # ddof 1
    assert result["n"] == 4 and result["values"] == [1.0, 2.0, 3.0, 6.0]
    assert summary([2.5])["std"] is None
    with pytest.raises(ValueError):
        summary([])


def test_paired_difference_is_a_t_interval_on_the_per_seed_differences() -> None:
    # differences 2, 4, 3, 7: mean 4, std sqrt(14/3); t(0.975, 3) = 3.182446305284263
    result = paired_difference([12.0, 14.0, 13.0, 17.0], [10.0, 10.0, 10.0, 10.0])
    half = 3.182446305284263 * math.sqrt(14 / 3) / 2
    assert result["mean"] == pytest.approx(4.0)
    assert result["ci95"] == pytest.approx([4.0 - half, 4.0 + half])
    # pairing removes what both share: the same offsets in both give a zero-width interval
    shared = paired_difference([80.0, 90.0, 70.0], [75.0, 85.0, 65.0])
    assert shared["ci95"] == pytest.approx([5.0, 5.0])


def test_one_seed_has_no_interval_and_unequal_lengths_are_refused() -> None:
    assert paired_difference([3.0], [1.0])["ci95"] is None
    with pytest.raises(ValueError, match="differ in number"):
        paired_difference([1.0, 2.0], [1.0])


def test_formats() -> None:
    assert format_summary(summary([1.0, 3.0])) == "2.00 ± 1.41"
    assert format_summary(summary([1.0])) == "1.00 (1 seed)"
    assert format_difference(paired_difference([3.0], [1.0])) == "+2.00 (1 seed)"
    text = format_difference(paired_difference([3.0, 5.0], [1.0, 1.0]))
    assert text.startswith("+3.00 [") and text.count(",") == 1
