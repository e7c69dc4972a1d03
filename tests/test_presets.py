"""The paper's recipes under presets/: valid, complete, and applied without losing anything."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import yaml

from mfm import presets
from mfm.cli import main
from mfm.config import Params, load_params, validate_params
from mfm.errors import UserError
from mfm.overrides import apply_overrides

ROOT = Path(__file__).resolve().parents[1]
ROOT_OVERRIDE = "data.root=/data/imagenet"
# preset -> (timm model, pretext, P(low-pass) or None, fine-tuning epochs)
EXPECTED = {
    "vit_s16_mfm": ("vit_small_patch16_224", "mfm", 0.5, 200),
    "vit_b16_mfm": ("vit_base_patch16_224", "mfm", 0.5, 100),
    "resnet50_mfm": ("resnet50", "mfm", 0.3, 100),
    "vit_b16_sr": ("vit_base_patch16_224", "sr", None, 100),
    "vit_b16_deblur": ("vit_base_patch16_224", "deblur", None, 100),
    "vit_b16_denoise": ("vit_base_patch16_224", "denoise", None, 100),
}
# Segmentation recipes: only the segment section, applied after an encoder's preset.
SEGMENTATION = {"vit_b16_ade20k"}
# Recipes on a dataset the pipeline downloads itself (no placeholder root to fill).
SMALL_DATA = {"fashion_mnist_gpu"}
ADE_OVERRIDE = "segment.root=/data/ADEChallengeData2016"


def repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def preset_values(name: str) -> dict:
    return yaml.safe_load(presets.preset_file(name).read_text())


def merged(*names: str) -> Params:
    """The repository's params with the presets merged in order (placeholder root kept)."""
    raw = repo_params()
    for name in names:
        presets.merge(raw, preset_values(name))
    return validate_params(raw, "+".join(names))


def recipe(params: Params) -> dict:
    """What a run of the recipe depends on: the settings of unused pretexts left out."""
    dump = params.model_dump()
    active = "mask" if params.pretrain.pretext == "mfm" else params.pretrain.pretext
    for section in {"mask", "sr", "deblur", "denoise", "mim"} - {active}:
        del dump["pretrain"][section]
    return {key: dump[key] for key in ("data", "model", "pretrain", "finetune", "runtime")}


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def test_the_table_covers_every_preset() -> None:
    assert presets.available() == sorted({*EXPECTED, *SEGMENTATION, *SMALL_DATA})


def test_fashion_mnist_gpu_is_the_default_vit_on_every_image_at_a_real_budget(
    params_file: Path,
) -> None:
    params = merged("fashion_mnist_gpu")
    default = validate_params(repo_params(), "params.yaml")
    assert params.data.dataset == "fashion_mnist" and params.data.root is None
    assert params.data.train_limit is None and params.data.test_limit is None
    # the default job's ViT at the finer patch (64 tokens) that the CPU default trades for speed
    assert params.model.patch_size == 4 and default.model.patch_size == 8
    assert params.model.model_copy(update={"patch_size": 8}) == default.model
    pre, fine = params.pretrain, params.finetune
    assert pre.pretext == "mfm" and pre.epochs * 60_000 >= 5_000_000
    assert pre.lr * pre.batch_size / 512 == pytest.approx(1.5e-3)
    assert fine.epochs >= 10 * default.finetune.epochs and fine.auto_augment.startswith("rand-m")
    assert (fine.mixup, fine.cutmix, fine.reprob) == (0.8, 1.0, 0.25)
    # applied with no root to give: the dataset is found or downloaded by prepare
    report = presets.apply("fashion_mnist_gpu", params_file, [])
    assert "data.train_limit: 20000 -> null" in report
    assert yaml.safe_load(params_file.read_text())["data"]["root"] is None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_validates_over_the_repository_params(name: str) -> None:
    params = merged(name)
    model, pretext, p_low, finetune_epochs = EXPECTED[name]
    assert (params.model.name, params.pretrain.pretext) == (model, pretext)
    assert params.model.kwargs == {}  # not the default job's depth: 6
    assert params.data.dataset == "imagefolder" and params.data.img_size == 224
    assert params.data.train_limit is None and params.data.test_limit is None
    assert params.data.root == presets.ROOT_PLACEHOLDER
    pre, fine = params.pretrain, params.finetune
    assert (pre.epochs, pre.warmup_epochs, pre.batch_size, pre.betas) == (
        300,
        20,
        2048,
        (0.9, 0.95),
    )
    assert pre.lr * pre.batch_size / 512 == pytest.approx(1.2e-3)  # the paper's peak lr
    assert (pre.clip_grad, pre.weight_decay, params.model.drop_path_rate) == (3.0, 0.05, 0.0)
    if p_low is not None:
        assert (pre.mask.radius, pre.mask.radius_unit, pre.mask.p_low) == (16, "bins", p_low)
    # The spatial baseline (-S pretrain.pretext=mim, the study's mim variant) at SimMIM's setting.
    assert (pre.mim.mask_patch_size, pre.mim.mask_ratio) == (32, 0.6)
    assert (fine.epochs, fine.batch_size, fine.warmup_epochs) == (finetune_epochs, 2048, 5)
    assert fine.cutmix == 1.0 and fine.auto_augment.startswith("rand-m")


def test_vit_fine_tuning_is_the_papers() -> None:
    fine = merged("vit_b16_mfm").finetune
    assert fine.lr * fine.batch_size / 512 == pytest.approx(8e-3)
    assert (fine.layer_decay, fine.drop_path_rate, fine.betas) == (0.8, 0.1, (0.9, 0.999))
    assert (fine.mixup, fine.reprob, fine.label_smoothing) == (0.8, 0.25, 0.1)
    assert fine.auto_augment == "rand-m9-mstd0.5-inc1-mmax9"


def test_restoration_presets_use_the_papers_corruptions() -> None:
    assert merged("vit_b16_sr").pretrain.sr.scale == 8
    deblur = merged("vit_b16_deblur").pretrain.deblur
    assert (deblur.sigma, deblur.kernel_sizes) == (5.0, list(range(7, 22, 2)))
    assert merged("vit_b16_denoise").pretrain.denoise.sigma == pytest.approx(75 / 255)


@pytest.mark.parametrize(("first", "second"), list(product(sorted(EXPECTED), repeat=2)))
def test_a_preset_inherits_nothing_from_the_one_before(first: str, second: str) -> None:
    assert recipe(merged(first, second)) == recipe(merged(second))


def test_apply_keeps_comments_and_layout(params_file: Path) -> None:
    before = params_file.read_text()
    assert main(["preset", "vit_b16_mfm", "--params", str(params_file), "-S", ROOT_OVERRIDE]) == 0
    after = params_file.read_text()
    comments = [line[line.index("#") :] for line in before.splitlines() if "#" in line]
    assert comments and all(comment in after for comment in comments)
    assert [ln for ln in before.splitlines() if not ln] == [
        ln for ln in after.splitlines() if not ln
    ]
    assert re.search(r"^  kwargs: \{\}\n\npretrain:$", after, re.MULTILINE)
    assert re.search(r"^  train_limit: null +# seeded subset", after, re.MULTILINE)
    params, expected = load_params(params_file), merged("vit_b16_mfm")
    assert params.data.root == "/data/imagenet"
    assert params.model_dump(exclude={"data"}) == expected.model_dump(exclude={"data"})


def test_applying_again_changes_nothing(
    params_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    presets.apply("resnet50_mfm", params_file, [ROOT_OVERRIDE, "pretrain.lr=1e-4"])
    written = params_file.read_bytes()
    assert "lr: 0.0001 " in written.decode()  # a float, though PyYAML reads 1e-4 as a string
    assert (
        main(["preset", "resnet50_mfm", "--params", str(params_file), "-S", "pretrain.lr=1e-4"])
        == 0
    )
    assert "nothing changed" in capsys.readouterr().out
    assert params_file.read_bytes() == written  # and the root came from the file itself


def test_a_deleted_key_takes_only_its_line(params_file: Path) -> None:
    report = presets.apply("vit_b16_mfm", params_file, [ROOT_OVERRIDE, "~linprobe.batch_size"])
    assert "  linprobe.batch_size: 256 -> (absent)" in report.splitlines()
    text = params_file.read_text()
    assert re.search(
        r"^  knn_temperature: 0.07\n  pixel_size: 32 +# raw-pixel probe", text, re.MULTILINE
    )
    assert load_params(params_file).linprobe.batch_size == 256  # the default again


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vit_b16_huge"], "unknown preset 'vit_b16_huge'; choose one of: fashion_mnist_gpu"),
        (["vit_b16_mfm"], "add -S data.root=/path/to/imagenet"),
        (["vit_b16_mfm", "-S", ROOT_OVERRIDE, "-S", "pretrain.epochs=-1"], "pretrain.epochs"),
        (["vit_b16_mfm", "-S", ROOT_OVERRIDE, "-S", "pretrain.epoch=3"], "unknown key"),
        (["vit_b16_mfm", "-S", "pretrain.epochs"], "is not key=value"),
        (["vit_b16_mfm", "-S", ROOT_OVERRIDE, "-S", "~pretrain.nope"], "cannot be deleted"),
        ([], "name a preset"),
        (["vit_b16_mfm", "--as-overrides", "-S", "data.root=/my data"], "drop --as-overrides"),
    ],
)
def test_errors_are_one_line_and_leave_params_untouched(
    params_file: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    before = params_file.read_bytes()
    assert main(["preset", *args, "--params", str(params_file)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("mfm preset: error: ") and message in err
    assert params_file.read_bytes() == before


def test_the_preset_command_never_imports_torch(params_file: Path) -> None:
    code = (
        "import sys; from mfm.cli import main; "
        f"assert main(['preset', 'vit_b16_mfm', '--params', {str(params_file)!r}, "
        f"'-S', {ROOT_OVERRIDE!r}]) == 0; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)


def test_list_names_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["preset", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted({*EXPECTED, *SEGMENTATION, *SMALL_DATA})
    for line in lines:
        assert ("Fashion-MNIST" if line.split()[0] in SMALL_DATA else "ImageNet-1k") in line


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_printed_overrides_give_the_written_params(
    name: str, params_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = params_file.read_bytes()
    assert (
        main(["preset", name, "--as-overrides", "--params", str(params_file), "-S", ROOT_OVERRIDE])
        == 0
    )
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and params_file.read_bytes() == before
    words = printed.split()  # as the shell splits $(...)
    assert words[::2] == ["-S"] * (len(words) // 2)
    args = words[1::2]
    assert "~model.kwargs" in args  # Hydra would merge {} into the old kwargs
    written = tmp_path / "written.yaml"
    shutil.copy(params_file, written)
    presets.apply(name, written, [ROOT_OVERRIDE])
    assert validate_params(apply_overrides(repo_params(), args)) == load_params(written)


def test_dvc_reads_the_printed_overrides_the_same_way(params_file: Path, tmp_path: Path) -> None:
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides  # what dvc exp run -S does

    overrides = [ROOT_OVERRIDE, "finetune.epochs=300", "model.kwargs.depth=12"]
    args = presets.as_overrides("resnet50_mfm", params_file, overrides)
    by_dvc = tmp_path / "by_dvc.yaml"
    shutil.copy(params_file, by_dvc)
    dvc_apply_overrides(str(by_dvc), args)
    presets.apply("resnet50_mfm", params_file, overrides)
    assert load_params(by_dvc) == load_params(params_file)
    assert load_params(params_file).model.kwargs == {"depth": 12}


def test_root_of_an_image_folder_params_is_kept(params_file: Path) -> None:
    presets.apply("vit_s16_mfm", params_file, ["data.root=/data/in1k"])
    presets.apply("vit_b16_sr", params_file, [])
    assert load_params(params_file).data.root == "/data/in1k"


def test_delete_override() -> None:
    raw = {"model": {"kwargs": {"depth": 6}}}
    assert apply_overrides(raw, ["~model.kwargs", "+model.kwargs={}"]) == {"model": {"kwargs": {}}}
    assert apply_overrides(raw, ["~model.kwargs.depth"]) == {"model": {"kwargs": {}}}
    assert raw == {"model": {"kwargs": {"depth": 6}}}
    with pytest.raises(UserError, match="cannot be deleted"):
        apply_overrides(copy.deepcopy(raw), ["~model.depth"])


def test_the_ade20k_preset_is_the_mae_upernet_recipe(params_file: Path) -> None:
    presets.apply("vit_b16_mfm", params_file, [ROOT_OVERRIDE])
    presets.apply("vit_b16_ade20k", params_file, [ADE_OVERRIDE])
    params = load_params(params_file)
    seg = params.segment
    assert params.model.name == "vit_base_patch16_224"  # the encoder's preset is kept
    assert (seg.dataset, seg.root, seg.crop_size, seg.batch_size) == (
        "ade20k",
        "/data/ADEChallengeData2016",
        512,
        16,
    )
    iterations = seg.epochs * (20210 // seg.batch_size)
    assert 160_000 <= iterations < 161_000  # the paper's 160k iterations
    assert seg.lr * seg.batch_size / 512 == pytest.approx(1e-4)
    assert (seg.layer_decay, seg.drop_path_rate, seg.poly_power) == (0.65, 0.1, 1.0)
    assert (seg.eval_mode, seg.slide_stride(), seg.eval_short_side) == ("slide", 341, 512)
    assert seg.vit_blocks == [3, 5, 7, 11] and seg.channels == 768
    assert round(seg.warmup_epochs * (20210 // seg.batch_size)) == pytest.approx(1500, abs=2)


def test_the_ade20k_root_comes_from_an_override_or_the_params(params_file: Path) -> None:
    with pytest.raises(UserError, match=r"add -S segment.root=/path/to/ADEChallengeData2016"):
        presets.apply("vit_b16_ade20k", params_file, [])
    presets.apply("vit_b16_ade20k", params_file, [ADE_OVERRIDE])
    presets.apply("vit_b16_ade20k", params_file, [])  # again: the root already set is kept
    assert load_params(params_file).segment.root == "/data/ADEChallengeData2016"
