"""Corruption-robustness scores (mCE, relative mCE, CIFAR-C mean error) and their report.

Pure arithmetic on error rates, so the scores can be checked by hand and reused for the
real ImageNet-C as well as for corruptions applied on the fly to any data set. Errors come
in as fractions in [0, 1], indexed ``errors[corruption][severity]``; the report gives
percentages, the unit papers and leaderboards use.

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

# AlexNet's top-1 error on ImageNet-C, averaged over severities 1-5 (only the mean is published).
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
    "speckle_noise": 0.845388,
    "gaussian_blur": 0.787108,
    "spatter": 0.717512,
    "saturate": 0.658248,
}
# torchvision AlexNet IMAGENET1K_V1 (top-1 56.522): the clean error relative mCE subtracts.
ALEXNET_CLEAN_ERROR = 0.43478


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

    Against AlexNet use ``alexnet_baseline(severities)`` with ``ALEXNET_CLEAN_ERROR``; with
    all 5 severities this is the published relative mCE's denominator exactly.
    """
    result: dict[str, float] = {}
    for name, by_severity in errors.items():
        shared = _shared_severities(name, by_severity, baseline)
        added = sum(by_severity[s] - clean_error for s in shared)
        baseline_added = sum(baseline[name][s] - baseline_clean for s in shared)
        result[name] = _ratio(added, baseline_added)
    return result


def alexnet_baseline(severities: Iterable[int] = (1, 2, 3, 4, 5)) -> dict[str, dict[int, float]]:
    """AlexNet as a per-severity baseline: each severity gets the published 5-severity mean.

    Only the mean is published, so CE_c = mean_s E(model, s, c) / mean error(AlexNet, c),
    which is the paper's CE when all 5 severities are scored and an approximation otherwise.
    """
    severities = list(severities)
    return {name: {s: mean for s in severities} for name, mean in ALEXNET_ERRORS.items()}


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


def robustness_report(
    errors: SeverityErrors,
    clean_error: float | None,
    baseline_errors: SeverityErrors,
    baseline_clean_error: float | None,
    baseline_name: str,
    names: Sequence[str],
) -> dict[str, Any]:
    """A JSON-ready summary in percent; relative scores only when both clean errors are known.

    ``names`` are the corruptions the means run over (mCE, relative mCE, the CIFAR-C mean
    error); CE and relative CE are listed for every corruption in ``errors``.
    """
    names = list(names)
    ce = corruption_errors(errors, baseline_errors)
    in_mean = {name: errors[name] for name in names if name in errors}
    report: dict[str, Any] = {}
    if clean_error is not None:
        report["clean_error"] = _percent(clean_error)
    report["mce"] = _finite(mean_ce(ce, names))
    relative = None
    if clean_error is not None and baseline_clean_error is not None:
        relative = relative_corruption_errors(
            errors, clean_error, baseline_errors, baseline_clean_error
        )
        report["relative_mce"] = _finite(mean_ce(relative, names))
    report["mean_corruption_error"] = _finite(cifar_c_score(in_mean))
    report["baseline"] = baseline_name
    report["mce_corruptions"] = names
    report["ce"] = {name: _percent(value) for name, value in ce.items()}
    if relative is not None:
        report["relative_ce"] = {name: _percent(value) for name, value in relative.items()}
    report["errors"] = _percent_table(errors)
    return report
