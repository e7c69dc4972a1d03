"""params.yaml validation and -S overrides: bad input is one clear line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mfm.cli import main
from mfm.config import Params, load_params
from mfm.errors import UserError
from mfm.overrides import apply_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.data.dataset == "fashion_mnist"
    assert params.pretrain.pretext == "mfm"


def test_defaults_round_trip_through_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(Params().model_dump(mode="json")))
    assert load_params(path) == Params()


def test_overrides_parse_values_as_yaml() -> None:
    raw = apply_overrides(
        {"pretrain": {"epochs": 1}},
        ["pretrain.epochs=3", "pretrain.mask.radius=[2, 6]", "data.root=null"],
    )
    assert raw["pretrain"]["epochs"] == 3
    assert raw["pretrain"]["mask"]["radius"] == [2, 6]
    assert raw["data"]["root"] is None
    params = load_params(ROOT / "params.yaml", ["pretrain.epochs=7", "+pretrain.lr=0.01"])
    assert params.pretrain.epochs == 7 and params.pretrain.lr == 0.01


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("pretrain.epochs=-1", "pretrain.epochs = -1"),
        ("pretrain.pretext=jigsaw", "'mfm', 'sr', 'deblur', 'denoise' or 'mim'"),
        ("pretrain.mask.p_low=1.5", "pretrain.mask.p_low = 1.5"),
        ("pretrain.mask.radius=[6, 2]", "0 < low <= high"),
        ("pretrain.deblur.kernel_sizes=[4]", "odd"),
        ("runtime.device=tpu", "'auto', 'cpu', 'cuda' or 'mps'"),
        ("data.dataset=mnist", "imagefolder"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override: str, expected: str) -> None:
    with pytest.raises(UserError) as err:
        load_params(ROOT / "params.yaml", [override])
    message = str(err.value)
    assert "\n" not in message
    assert expected in message


def test_unknown_key_lists_allowed_keys() -> None:
    with pytest.raises(UserError, match=r"unknown key 'pretrain.epoch'.*epochs"):
        load_params(ROOT / "params.yaml", ["pretrain.epoch=3"])


def test_bad_override_syntax() -> None:
    with pytest.raises(UserError, match="key=value"):
        load_params(ROOT / "params.yaml", ["pretrain.epochs"])


def test_missing_and_broken_params_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("pretrain: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(broken)


def test_cli_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("pretrain:\n  epochs: zero\n")
    code = main(["pretrain", "--params", str(params)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "pretrain.epochs = 'zero'" in err


def _params_file(tmp_path: Path, study: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"pretrain": {"epochs": 2}, "study": study}))
    return path


def test_a_study_variant_applies_its_overrides_before_the_command_line(tmp_path: Path) -> None:
    variants = {"r4": {"pretrain.mask.radius": 4, "pretrain.epochs": 5}}
    path = _params_file(tmp_path, {"variants": variants, "seeds": [0, 1]})
    params = load_params(path, ["runtime.seed=1"], variant="r4")
    assert params.pretrain.mask.radius == 4 and params.pretrain.epochs == 5
    assert params.runtime.seed == 1
    assert load_params(path, ["pretrain.epochs=9"], variant="r4").pretrain.epochs == 9
    assert load_params(path).pretrain.epochs == 2  # the base params are untouched
    with pytest.raises(UserError, match="unknown study variant 'r8'; .* has r4"):
        load_params(path, variant="r8")


@pytest.mark.parametrize(
    ("study", "expected"),
    [
        (
            {"variants": {"bad": {"pretrain.epoch": 3}}},
            r"study.variants.bad: unknown key 'pretrain.epoch'",
        ),
        ({"variants": {"bad": {"pretrain.epochs": 0}}}, r"study.variants.bad: pretrain.epochs = 0"),
        (
            {"variants": {"bad": {"data.img_size": 64}}},
            r"sets data.img_size, which all variants share",
        ),
        (
            {"variants": {"bad": {"runtime.seed": 3}}},
            r"sets runtime.seed, which all variants share",
        ),
        ({"variants": {"scratch": {}}}, r"variant name 'scratch' must be"),
        ({"variants": {"a.b": {}}}, r"variant name 'a.b' must be"),
        ({"seeds": [0, 0]}, r"seeds must be distinct"),
        ({"seeds": []}, r"study.seeds"),
    ],
)
def test_bad_study_variants_fail_before_any_run(tmp_path: Path, study: dict, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        load_params(_params_file(tmp_path, study))
