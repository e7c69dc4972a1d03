"""mCE, relative mCE and the CIFAR-C score against hand-computed values; the report."""

from __future__ import annotations

import json
import math

import pytest

from mfm.errors import UserError
from mfm.robustness_metrics import (
    ALEXNET_CLEAN_ERROR,
    ALEXNET_ERRORS,
    IMAGENET_C_CORRUPTIONS,
    IMAGENET_C_EXTRAS,
    alexnet_baseline,
    cifar_c_score,
    corruption_errors,
    mean_ce,
    relative_corruption_errors,
    robustness_report,
)

MODEL = {"a": {1: 0.2, 2: 0.4}, "b": {1: 0.5, 2: 0.7}}
BASE = {"a": {1: 0.4, 2: 0.8, 3: 0.9}, "b": {1: 0.6, 2: 0.6, 3: 0.9}}  # severity 3 unshared


def test_constants_cover_the_19_corruptions() -> None:
    assert len(IMAGENET_C_CORRUPTIONS) == 15 and len(IMAGENET_C_EXTRAS) == 4
    assert list(ALEXNET_ERRORS) == [*IMAGENET_C_CORRUPTIONS, *IMAGENET_C_EXTRAS]
    assert ALEXNET_ERRORS["gaussian_noise"] == 0.886428
    assert ALEXNET_ERRORS["jpeg_compression"] == 0.606500
    assert ALEXNET_ERRORS["saturate"] == 0.658248


def test_errors_equal_to_the_baseline_give_mce_100() -> None:
    ce = corruption_errors(MODEL, MODEL)
    assert ce == {"a": 1.0, "b": 1.0}
    assert mean_ce(ce, ["a", "b"]) == 100.0


def test_ce_by_hand_over_the_shared_severities() -> None:
    ce = corruption_errors(MODEL, BASE)
    assert ce["a"] == pytest.approx((0.2 + 0.4) / (0.4 + 0.8))  # 0.5
    assert ce["b"] == pytest.approx((0.5 + 0.7) / (0.6 + 0.6))  # 1.0
    assert mean_ce(ce, ["a", "b"]) == pytest.approx(75.0)
    assert mean_ce(ce, ["a"]) == pytest.approx(50.0)


def test_relative_ce_by_hand() -> None:
    relative = relative_corruption_errors(MODEL, 0.1, BASE, 0.2)
    assert relative["a"] == pytest.approx((0.1 + 0.3) / (0.2 + 0.6))  # 0.5
    assert relative["b"] == pytest.approx((0.4 + 0.6) / (0.4 + 0.4))  # 1.25
    assert mean_ce(relative, ["a", "b"]) == pytest.approx(87.5)


def test_cifar_c_score_is_the_mean_error_in_percent() -> None:
    assert cifar_c_score(MODEL) == pytest.approx(45.0)
    with pytest.raises(UserError):
        cifar_c_score({})


def test_alexnet_baseline_normalises_by_the_published_means() -> None:
    baseline = alexnet_baseline([1, 2, 3, 4, 5])
    assert set(baseline) == set(ALEXNET_ERRORS) and set(baseline["fog"]) == {1, 2, 3, 4, 5}
    same = {name: dict(baseline[name]) for name in IMAGENET_C_CORRUPTIONS}
    assert mean_ce(corruption_errors(same, baseline), IMAGENET_C_CORRUPTIONS) == 100.0
    half = {"fog": {s: 0.5 * ALEXNET_ERRORS["fog"] * (0.6 + 0.2 * (s - 1)) for s in range(1, 6)}}
    assert corruption_errors(half, baseline)["fog"] == pytest.approx(0.5)  # mean_s over AlexNet's
    relative = relative_corruption_errors(same, ALEXNET_CLEAN_ERROR, baseline, ALEXNET_CLEAN_ERROR)
    assert mean_ce(relative, IMAGENET_C_CORRUPTIONS) == pytest.approx(100.0)


def test_missing_inputs_are_user_errors() -> None:
    with pytest.raises(UserError, match="'c'"):
        corruption_errors({"c": {1: 0.1}}, BASE)
    with pytest.raises(UserError, match="share no severity"):
        corruption_errors({"a": {5: 0.1}}, BASE)
    with pytest.raises(UserError, match="b"):
        mean_ce({"a": 1.0}, ["a", "b"])


def test_report_is_percent_and_json_ready() -> None:
    report = robustness_report(MODEL, 0.1, BASE, 0.2, "toy", ["a", "b"])
    assert report["clean_error"] == pytest.approx(10.0)
    assert report["mce"] == pytest.approx(75.0)
    assert report["relative_mce"] == pytest.approx(87.5)
    assert report["mean_corruption_error"] == pytest.approx(45.0)
    assert report["baseline"] == "toy"
    assert report["ce"] == pytest.approx({"a": 50.0, "b": 100.0})
    assert report["relative_ce"] == pytest.approx({"a": 50.0, "b": 125.0})
    assert report["errors"]["b"] == pytest.approx({"1": 50.0, "2": 70.0})
    json.dumps(report, allow_nan=False)


def test_report_without_clean_error_omits_the_relative_scores() -> None:
    report = robustness_report(MODEL, None, BASE, 0.2, "toy", ["a"])
    assert "clean_error" not in report and "relative_mce" not in report
    assert "relative_ce" not in report
    assert report["mce"] == pytest.approx(50.0)
    assert report["mean_corruption_error"] == pytest.approx(30.0)  # over the mCE names only
    assert set(report["ce"]) == {"a", "b"}


def test_undefined_ratios_become_null() -> None:
    perfect = {"a": {1: 0.0}}
    assert math.isnan(corruption_errors({"a": {1: 0.3}}, perfect)["a"])
    report = robustness_report({"a": {1: 0.3}}, 0.1, perfect, 0.0, "perfect", ["a"])
    assert report["mce"] is None and report["ce"]["a"] is None
    json.dumps(report, allow_nan=False)
