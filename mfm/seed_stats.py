"""Numbers over seeds: mean +- std of one setting, and the seed-paired difference of two.

A difference between two settings is only news when it exceeds the spread that changing the
seed alone produces. Pairing by seed (variant and baseline trained from the same seed, on the
same data order) removes the part of that spread the two runs share; the 95 % interval is
Student's t on the per-seed differences, so it widens honestly when there are few seeds.
With one seed there is no spread to measure: ``std`` and ``ci95`` are ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scipy import stats

CONFIDENCE = 0.95


def summary(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std" (sample, ddof 1; None for one value), "n", "values"}``."""
    if not values:
        raise ValueError("summary of no values")
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def paired_difference(ours: Sequence[float], theirs: Sequence[float]) -> dict[str, Any]:
    """``ours - theirs`` seed by seed: the mean difference, its std and a 95 % t interval."""
    if len(ours) != len(theirs):
        raise ValueError(f"paired values differ in number: {len(ours)} vs {len(theirs)}")
    result = summary([a - b for a, b in zip(ours, theirs, strict=True)])
    result["ci95"] = None
    if result["n"] > 1:
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, result["n"] - 1) * result["std"]
        half /= math.sqrt(result["n"])
        result["ci95"] = [result["mean"] - half, result["mean"] + half]
    return result


def format_summary(entry: dict[str, Any]) -> str:
    """``79.80 ± 1.20``, or ``79.80 (1 seed)``."""
    if entry["std"] is None:
        return f"{entry['mean']:.2f} (1 seed)"
    return f"{entry['mean']:.2f} ± {entry['std']:.2f}"


def format_difference(entry: dict[str, Any]) -> str:
    """``+6.32 [+3.10, +9.54]``, or ``+6.32 (1 seed)``."""
    if entry["ci95"] is None:
        return f"{entry['mean']:+.2f} (1 seed)"
    low, high = entry["ci95"]
    return f"{entry['mean']:+.2f} [{low:+.2f}, {high:+.2f}]"
