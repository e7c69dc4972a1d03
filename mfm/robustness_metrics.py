"""Corruption-robustness scores (mCE, relative mCE, CIFAR-C mean error) and their report.

Pure arithmetic on error rates, so the scores can be checked by hand and reused for the
real ImageNet-C as well as for corruptions applied on the fly to any data set. Errors come
in as fractions in [0, 1] (anything else is refused), indexed ``errors[corruption][severity]``;
the report gives percentages, the unit papers and leaderboards use.

CE_c = sum_s E(model, s, c) / sum_s E(baseline, s, c); mCE = 100 * mean_c CE_c.
Relative CE_c = sum_s (E(model, s, c) - E_clean(model)) / sum_s (E(base, s, c) - E_clean(base)).
(Hendrycks & Dietterich, 2019.) A ratio whose denominator is 0 is undefined: it comes out
as NaN and the report writes it as null.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mfm.errors import UserError

SeverityErrors = Mapping[str, Mapping[int, float]]

IMAGENET_C_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
IMAGENET_C_EXTRAS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

# AlexNet's top-1 error on ImageNet-C at severities 1..5 (Hendrycks & Dietterich's released
# per-severity results), so CE is exact for any subset of severities scored.
ALEXNET_SEVERITY_ERRORS: dict[str, tuple[float, float, float, float, float]] = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.9487, 0.9872, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.5843, 0.70048, 0.82108, 0.8975, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.9187, 0.94952),
    "frost": (0.6139, 0.79734, 0.8879, 0.89942, 0.9343),
    "fog": (0.67474, 0.7605, 0.84378, 0.8726, 0.945),
    "brightness": (0.4514, 0.48502, 0.54048, 0.62166, 0.7244),
    "contrast": (0.64548, 0.7615, 0.88874, 0.9776, 0.9927),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.5462, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}
# The held-out corruptions: only AlexNet's mean over severities 1-5 is known for them.
ALEXNET_EXTRA_MEANS: dict[str, float] = {
    "speckle_noise": 0.845388,
    "gaussian_blur": 0.787108,
    "spatter": 0.717512,
    "saturate": 0.658248,
}
ALL_SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
# AlexNet's mean error over severities 1-5 per corruption (the table papers print).
ALEXNET_ERRORS: dict[str, float] = {
    **{name: sum(row) / len(row) for name, row in ALEXNET_SEVERITY_ERRORS.items()},
    **ALEXNET_EXTRA_MEANS,
}
EXTRA_NOTE = (
    "AlexNet's per-severity errors on the held-out corruptions are not published, only their "
    "mean over severities 1-5, so CE needs all five; scored: {severities}"
)
# torchvision AlexNet IMAGENET1K_V1 (top-1 56.522): the clean error relative mCE subtracts.
ALEXNET_CLEAN_ERROR = 0.43478


def check_fraction(value: float, what: str) -> float:
    """``value`` if it is an error rate in [0, 1]; a percentage would skew every score."""
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise UserError(
            f"{what} = {value!r} is not in [0, 1]: error rates are fractions, not percentages; "
            "pass the percentage / 100 (25.0 -> 0.25)"
        )
    return value


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when undefined (a baseline without any error)."""
    return numerator / denominator if denominator != 0 else math.nan


def _shared_severities(
    name: str, errors: Mapping[int, float], baseline: SeverityErrors
) -> list[int]:
    """Severities both the model and the baseline were scored at; none is a mistake."""
    if name not in baseline:
        raise UserError(
            f"the baseline has no errors for corruption {name!r}; score the baseline on it "
            "or drop it from the corruptions"
        )
    shared = sorted(set(errors) & set(baseline[name]))
    if not shared:
        raise UserError(
            f"corruption {name!r}: the model and the baseline share no severity; score both "
            "at the same severities"
        )
    return shared


def corruption_errors(errors: SeverityErrors, baseline: SeverityErrors) -> dict[str, float]:
    """CE per corruption: the model's summed error over the baseline's, same severities."""
    result: dict[str, float] = {}
    for name, by_severity in errors.items():
        shared = _shared_severities(name, by_severity, baseline)
        model_sum = sum(by_severity[s] for s in shared)
        result[name] = _ratio(model_sum, sum(baseline[name][s] for s in shared))
    return result


def mean_ce(ce: Mapping[str, float], names: Iterable[str]) -> float:
    """100 * the mean of ``ce`` over ``names`` (works for CE and relative CE alike)."""
    names = list(names)
    missing = [name for name in names if name not in ce]
    if missing or not names:
        raise UserError(
            f"no corruption error for {', '.join(missing) or 'any corruption'}; score the model "
            "on every corruption the mean is taken over"
        )
    return 100.0 * sum(ce[name] for name in names) / len(names)


def relative_corruption_errors(
    errors: SeverityErrors,
    clean_error: float,
    baseline: SeverityErrors,
    baseline_clean: float,
) -> dict[str, float]:
    """Relative CE: how much error each corruption adds over clean, against the baseline's.

    Against AlexNet use ``alexnet_baseline(severities)`` with ``ALEXNET_CLEAN_ERROR``: its
    per-severity errors make the denominator exact for any severities scored.
    """
    check_fraction(clean_error, "clean_error")
    check_fraction(baseline_clean, "baseline_clean")
    result: dict[str, float] = {}
    for name, by_severity in errors.items():
        shared = _shared_severities(name, by_severity, baseline)
        added = sum(by_severity[s] - clean_error for s in shared)
        baseline_added = sum(baseline[name][s] - baseline_clean for s in shared)
        result[name] = _ratio(added, baseline_added)
    return result


def alexnet_baseline(severities: Iterable[int] = ALL_SEVERITIES) -> dict[str, dict[int, float]]:
    """AlexNet's published top-1 errors at ``severities``, as a per-severity baseline.

    The 15 mCE corruptions get their exact per-severity errors. The 4 held-out ones are left
    out unless all five severities are asked for: only their 5-severity mean is known, and
    a sum over all five severities (what CE divides by) is 5 x that mean, but over fewer it
    is unknown.
    """
    wanted = sorted(set(severities))
    unknown = [s for s in wanted if s not in ALL_SEVERITIES]
    if unknown:
        raise UserError(f"ImageNet-C has severities 1-5, not {unknown}; fix robustness.severities")
    baseline = {
        name: {s: row[s - 1] for s in wanted} for name, row in ALEXNET_SEVERITY_ERRORS.items()
    }
    if wanted == list(ALL_SEVERITIES):
        baseline.update({name: dict.fromkeys(wanted, m) for name, m in ALEXNET_EXTRA_MEANS.items()})
    return baseline


def cifar_c_score(errors: SeverityErrors) -> float:
    """The CIFAR-C number: 100 - mean accuracy over corruptions x severities, in percent."""
    values = [value for by_severity in errors.values() for value in by_severity.values()]
    if not values:
        raise UserError("no corruption errors to average; score at least one corruption")
    return 100.0 * sum(values) / len(values)


def _finite(value: float) -> float | None:
    """JSON has no NaN: undefined scores become null."""
    return value if math.isfinite(value) else None


def _percent(value: float) -> float | None:
    return _finite(100.0 * value)


def _percent_table(errors: SeverityErrors) -> dict[str, dict[str, float | None]]:
    """Errors in percent with string severities (JSON object keys are strings)."""
    return {
        name: {str(s): _percent(by_severity[s]) for s in sorted(by_severity)}
        for name, by_severity in errors.items()
    }


def alexnet_baseline_for(errors: SeverityErrors) -> tuple[SeverityErrors, dict[str, str]]:
    """AlexNet at each corruption's own scored severities, and why a corruption has none.

    Severities are taken per corruption, so a copy missing a held-out corruption's severity
    folder gets no approximate CE for it (a note says why) while the others stay exact.
    """
    baseline: dict[str, dict[int, float]] = {}
    notes: dict[str, str] = {}
    for name, by_severity in errors.items():
        table = alexnet_baseline(by_severity).get(name)
        if table is not None:
            baseline[name] = table
        elif name in ALEXNET_EXTRA_MEANS:
            notes[name] = EXTRA_NOTE.format(severities=sorted(by_severity))
    return baseline, notes


def _with_nan(scores: Mapping[str, float], errors: SeverityErrors) -> dict[str, float]:
    """``scores`` for every corruption of ``errors``, in its order; NaN (null) where none."""
    return {name: scores.get(name, math.nan) for name in errors}


def _check_table(errors: SeverityErrors, what: str) -> None:
    """Every error a fraction: a table in percent would scale CE by 100 without a word."""
    for name, by_severity in errors.items():
        for severity, value in by_severity.items():
            check_fraction(value, f"{what}[{name!r}][{severity}]")


def robustness_report(
    errors: SeverityErrors,
    clean_error: float | None,
    baseline_errors: SeverityErrors,
    baseline_clean_error: float | None,
    baseline_name: str,
    names: Sequence[str],
    no_baseline: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A JSON-ready summary in percent; relative scores only when both clean errors are known.

    ``names`` are the corruptions the means run over (mCE, relative mCE, the CIFAR-C mean
    error); CE and relative CE are listed for every corruption in ``errors``. Corruptions
    in ``no_baseline`` (name -> why) keep their errors but get a null CE, the reason under
    ``notes``; they cannot be in ``names``.
    """
    names, no_baseline = list(names), dict(no_baseline or {})
    if set(names) & set(no_baseline):
        raise ValueError("a corruption without a baseline cannot be part of the mean CE")
    for value, what in (
        (clean_error, "clean_error"),
        (baseline_clean_error, "baseline_clean_error"),
    ):
        if value is not None:
            check_fraction(value, what)
    _check_table(errors, "errors")
    _check_table(baseline_errors, "baseline_errors")
    scored = {name: table for name, table in errors.items() if name not in no_baseline}
    ce = _with_nan(corruption_errors(scored, baseline_errors), errors)
    in_mean = {name: errors[name] for name in names if name in errors}
    report: dict[str, Any] = {}
    if clean_error is not None:
        report["clean_error"] = _percent(clean_error)
    report["mce"] = _finite(mean_ce(ce, names))
    relative = None
    if clean_error is not None and baseline_clean_error is not None:
        relative = relative_corruption_errors(
            scored, clean_error, baseline_errors, baseline_clean_error
        )
        relative = _with_nan(relative, errors)
        report["relative_mce"] = _finite(mean_ce(relative, names))
    report["mean_corruption_error"] = _finite(cifar_c_score(in_mean))
    report["baseline"] = baseline_name
    report["mce_corruptions"] = names
    report["ce"] = {name: _percent(value) for name, value in ce.items()}
    if relative is not None:
        report["relative_ce"] = {name: _percent(value) for name, value in relative.items()}
    if no_baseline:
        report["notes"] = {name: no_baseline[name] for name in errors if name in no_baseline}
    report["errors"] = _percent_table(errors)
    return report
