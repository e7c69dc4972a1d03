"""params.yaml validation and -S overrides: bad input is one clear line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mfm.cli import main
from mfm.config import Params, apply_overrides, load_params
from mfm.errors import UserError

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
        ("pretrain.pretext=jigsaw", "'mfm', 'sr', 'deblur' or 'denoise'"),
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
