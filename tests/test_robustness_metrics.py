"""mCE, relative mCE and the CIFAR-C score against hand-computed values; the report."""

from __future__ import annotations

import json
import math

import pytest

from mfm.errors import UserError
from mfm.robustness_metrics import (
    ALEXNET_CLEAN_ERROR,
    ALEXNET_ERRORS,
    ALEXNET_SEVERITY_ERRORS,
    IMAGENET_C_CORRUPTIONS,
    IMAGENET_C_EXTRAS,
    alexnet_baseline,
    alexnet_baseline_for,
    cifar_c_score,
    corruption_errors,
    mean_ce,
    relative_corruption_errors,
    robustness_report,
)

MODEL = {"a": {1: 0.2, 2: 0.4}, "b": {1: 0.5, 2: 0.7}}
BASE = {"a": {1: 0.4, 2: 0.8, 3: 0.9}, "b": {1: 0.6, 2: 0.6, 3: 0.9}}  # severity 3 unshared
# AlexNet's published mean error over severities 1-5 (Hendrycks & Dietterich, 2019, table).
PUBLISHED_MEANS = {
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


def test_constants_cover_the_19_corruptions() -> None:
    assert len(IMAGENET_C_CORRUPTIONS) == 15 and len(IMAGENET_C_EXTRAS) == 4
    assert list(ALEXNET_ERRORS) == [*IMAGENET_C_CORRUPTIONS, *IMAGENET_C_EXTRAS]
    assert list(ALEXNET_SEVERITY_ERRORS) == list(IMAGENET_C_CORRUPTIONS)
    assert all(len(row) == 5 for row in ALEXNET_SEVERITY_ERRORS.values())


def test_per_severity_table_matches_the_published_means() -> None:
    # The mean table is derived from the per-severity one; a typo in any entry shows here.
    assert {name: round(mean, 6) for name, mean in ALEXNET_ERRORS.items()} == PUBLISHED_MEANS
    for name, row in ALEXNET_SEVERITY_ERRORS.items():
        assert round(sum(row) / 5, 6) == PUBLISHED_MEANS[name], name


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


def test_alexnet_baseline_over_all_severities_is_the_published_mean() -> None:
    baseline = alexnet_baseline([1, 2, 3, 4, 5])
    assert set(baseline) == set(ALEXNET_ERRORS) and set(baseline["fog"]) == {1, 2, 3, 4, 5}
    assert baseline["fog"][4] == 0.8726 and baseline["saturate"] == dict.fromkeys(
        range(1, 6), 0.658248
    )
    same = {name: dict(baseline[name]) for name in IMAGENET_C_CORRUPTIONS}
    assert mean_ce(corruption_errors(same, baseline), IMAGENET_C_CORRUPTIONS) == 100.0
    half = {"fog": {s: 0.5 * ALEXNET_ERRORS["fog"] * (0.6 + 0.2 * (s - 1)) for s in range(1, 6)}}
    assert corruption_errors(half, baseline)["fog"] == pytest.approx(0.5)  # mean_s over AlexNet's
    relative = relative_corruption_errors(same, ALEXNET_CLEAN_ERROR, baseline, ALEXNET_CLEAN_ERROR)
    assert mean_ce(relative, IMAGENET_C_CORRUPTIONS) == pytest.approx(100.0)


def test_alexnet_ce_at_a_severity_subset_by_hand() -> None:
    errors = {"gaussian_noise": {2: 0.5, 4: 0.75}, "fog": {2: 0.4, 4: 0.6}}
    baseline = alexnet_baseline([2, 4])
    assert baseline["gaussian_noise"] == {2: 0.82542, 4: 0.98138}
    assert not set(IMAGENET_C_EXTRAS) & set(baseline)  # only their 5-severity mean is known
    ce = corruption_errors(errors, baseline)
    # (0.5 + 0.75) / (0.82542 + 0.98138) = 1.25 / 1.8068; (0.4 + 0.6) / (0.7605 + 0.8726)
    assert ce["gaussian_noise"] == pytest.approx(0.6918308611910561, rel=1e-12)
    assert ce["fog"] == pytest.approx(0.6123323740126141, rel=1e-12)
    # 50 * (0.69183... + 0.61233...); the mean-based CE gave 65.7668 (0.625 / 0.886428 ...).
    assert mean_ce(ce, ["gaussian_noise", "fog"]) == pytest.approx(65.20816176018351, rel=1e-12)
    relative = relative_corruption_errors(errors, 0.2, baseline, ALEXNET_CLEAN_ERROR)
    # (0.3 + 0.55) / (1.8068 - 2 * 0.43478); (0.2 + 0.4) / (1.6331 - 2 * 0.43478)
    assert relative["gaussian_noise"] == pytest.approx(0.9069181853100593, rel=1e-12)
    assert relative["fog"] == pytest.approx(0.7858134478874716, rel=1e-12)


def test_held_out_corruption_without_all_severities_has_no_ce() -> None:
    errors = {
        "fog": {2: 0.4, 4: 0.6},
        "spatter": {2: 0.5, 4: 0.7},  # only two severities: CE unknown
        "saturate": dict.fromkeys(range(1, 6), 0.329124),  # all five: half AlexNet's mean
    }
    baseline, notes = alexnet_baseline_for(errors)
    assert set(baseline) == {"fog", "saturate"} and set(notes) == {"spatter"}
    assert "mean over severities 1-5" in notes["spatter"] and "[2, 4]" in notes["spatter"]
    report = robustness_report(
        errors, 0.2, baseline, ALEXNET_CLEAN_ERROR, "alexnet", ["fog"], notes
    )
    assert report["ce"]["spatter"] is None and report["relative_ce"]["spatter"] is None
    assert report["notes"] == {"spatter": notes["spatter"]}
    assert report["ce"]["saturate"] == pytest.approx(50.0)
    assert report["ce"]["fog"] == pytest.approx(100 * 0.6123323740126141)
    assert report["mce"] == pytest.approx(100 * 0.6123323740126141)
    assert report["errors"]["spatter"] == pytest.approx({"2": 50.0, "4": 70.0})
    json.dumps(report, allow_nan=False)
    with pytest.raises(ValueError, match="mean CE"):
        robustness_report(errors, 0.2, baseline, 0.4, "alexnet", ["fog", "spatter"], notes)


@pytest.mark.parametrize("clean", [25.0, -0.1, math.nan])
def test_clean_error_must_be_a_fraction(clean: float) -> None:
    with pytest.raises(
        UserError, match=r"clean_error = .* not in \[0, 1\].*fractions.*percentage / 100"
    ):
        robustness_report(MODEL, clean, BASE, 0.2, "toy", ["a"])
    with pytest.raises(UserError, match="baseline_clean_error"):
        robustness_report(MODEL, 0.1, BASE, clean, "toy", ["a"])
    with pytest.raises(UserError, match="clean_error"):
        relative_corruption_errors(MODEL, clean, BASE, 0.2)
    with pytest.raises(UserError, match="baseline_clean"):
        relative_corruption_errors(MODEL, 0.1, BASE, clean)


def test_error_table_in_percent_is_refused() -> None:
    with pytest.raises(UserError, match=r"errors\['b'\]\[2\] = 70.0"):
        robustness_report({"b": {1: 0.5, 2: 70.0}}, 0.1, BASE, 0.2, "toy", ["b"])


def test_missing_inputs_are_user_errors() -> None:
    with pytest.raises(UserError, match="'c'"):
        corruption_errors({"c": {1: 0.1}}, BASE)
    with pytest.raises(UserError, match="share no severity"):
        corruption_errors({"a": {5: 0.1}}, BASE)
    with pytest.raises(UserError, match="b"):
        mean_ce({"a": 1.0}, ["a", "b"])
    with pytest.raises(UserError, match=r"severities 1-5, not \[0, 6\]"):
        alexnet_baseline([0, 2, 6])


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
