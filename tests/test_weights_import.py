"""Importing released checkpoints: formats, exact mappings, refusals and the stages on them."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
import yaml

from mfm.checkpoint_formats import convert
from mfm.cli import main
from mfm.config import Params
from mfm.errors import UserError
from mfm.models import load_classifier, load_encoder
from mfm.safe_load import load_foreign_checkpoint
from mfm.weights_import import classifier_from, encoder_from, import_file, read_weights
from tests.released_checkpoints import (
    authors_config,
    authors_vit_forward,
    random_vit,
    save_authors_resnet,
    save_authors_vit,
    training_state,
)

TINY = {
    "name": "vit_tiny_patch16_224",
    "patch_size": 4,
    "kwargs": {"depth": 2, "embed_dim": 48, "num_heads": 2},
}


def tiny_params(**changes: object) -> Params:
    raw = {"data": {"dataset": "digits", "img_size": 16}, "model": json.loads(json.dumps(TINY))}
    raw["runtime"] = {"device": "cpu"}
    for key, value in changes.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return Params.model_validate(raw)


# -- safe loading ----------------------------------------------------------------------------
def test_yacs_config_is_read_without_yacs_classes(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    save_authors_vit(path, heads=2)
    blob = load_foreign_checkpoint(path)
    assert isinstance(blob["config"], OrderedDict)  # the inert stand-in, not yacs' class
    assert blob["config"]["MODEL"]["VIT"]["NUM_HEADS"] == 2
    assert blob["config"]["TRAIN"]["OPTIMIZER"]["BETAS"] == (0.9, 0.95)


class Payload:
    """Pickles as a call that would create a file: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_runs_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": Payload(marker)}, path)
    with pytest.raises(UserError, match=r"refused: loading it would run code from .*pathlib"):
        load_foreign_checkpoint(path)
    assert not marker.exists()


def test_argparse_namespace_reads_as_a_record(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "mae.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, path)
    assert load_foreign_checkpoint(path)["args"].as_dict() == {"lr": 0.1}


def test_a_torn_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "torn.pth"
    save_authors_vit(path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="not a readable torch checkpoint"):
        load_foreign_checkpoint(path)


# -- the authors' ViT ----------------------------------------------------------------------
def test_authors_vit_pretrain_maps_exactly(tmp_path: Path) -> None:
    path = tmp_path / "mfm_pretrain.pth"
    source = save_authors_vit(path, chans=1, layer_scale=True)
    converted = read_weights(path)
    assert converted.format == "mfm-vit"
    arch = converted.architecture
    assert (arch.patch_size, arch.img_size, arch.in_chans, arch.num_classes) == (4, 16, 1, 0)
    assert arch.kwargs == {"embed_dim": 48, "depth": 2, "num_heads": 2, "init_values": 0.1}
    qkv_bias = converted.state_dict["blocks.1.attn.qkv.bias"]
    torch.testing.assert_close(qkv_bias[:48], source["encoder.blocks.1.attn.q_bias"])
    assert torch.count_nonzero(qkv_bias[48:96]) == 0
    torch.testing.assert_close(qkv_bias[96:], source["encoder.blocks.1.attn.v_bias"])
    torch.testing.assert_close(
        converted.state_dict["blocks.0.ls2.gamma"], source["encoder.blocks.0.gamma_2"]
    )
    assert set(converted.dropped) >= {"pixel head (MFM pretraining only)", "optimizer state"}
    assert set(converted.pixel_head) == {"proj.weight", "proj.bias"}

    params = tiny_params(model__kwargs={**TINY["kwargs"], "init_values": 0.1})
    encoder = encoder_from(converted, params, 1, str(path)).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        ours = encoder.backbone.forward_features(x)
    torch.testing.assert_close(ours, authors_vit_forward(source, x, heads=2), atol=1e-4, rtol=1e-4)


def test_authors_vit_finetuned_classifier_computes_their_logits(tmp_path: Path) -> None:
    path = tmp_path / "mfm_finetune.pth"
    source = save_authors_vit(path, pretrain=False, classes=10)
    converted = read_weights(path)
    assert converted.architecture.num_classes == 10
    assert converted.architecture.global_pool == "avg"
    model, spec = classifier_from(converted, tiny_params(), 3, 10, str(path))
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x), authors_vit_forward(source, x, heads=2), atol=1e-4, rtol=1e-4
        )
    assert spec["global_pool"] == "avg" and spec["num_classes"] == 10


def test_heads_come_from_the_config_not_the_width(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    save_authors_vit(path, width=48, heads=4)
    converted = read_weights(path)
    assert converted.architecture.kwargs["num_heads"] == 4
    with pytest.raises(UserError, match=r"model\.kwargs=.*\"num_heads\": 4"):
        encoder_from(converted, tiny_params(), 3, str(path))  # params say 2 heads


def test_architecture_mismatch_names_the_params_to_set(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    save_authors_vit(path, patch=8, img=32)
    with pytest.raises(UserError) as caught:
        encoder_from(read_weights(path), tiny_params(), 3, str(path))
    message = str(caught.value)
    assert "model.patch_size=8" in message and "data.img_size=32" in message
    assert "--write-params" in message


def test_relative_position_bias_is_refused(tmp_path: Path) -> None:
    state = save_authors_vit(tmp_path / "a.pth")
    state["encoder.blocks.0.attn.relative_position_bias_table"] = torch.zeros(51, 2)
    torch.save(training_state(state, authors_config("vit", 2)), tmp_path / "rpb.pth")
    with pytest.raises(UserError, match="relative position bias.*VisionTransformer has none"):
        read_weights(tmp_path / "rpb.pth")


def test_unknown_keys_are_errors_not_warnings(tmp_path: Path) -> None:
    state = save_authors_vit(tmp_path / "a.pth")
    state["encoder.blocks.0.adapter.weight"] = torch.zeros(4, 4)
    torch.save(training_state(state, authors_config("vit", 2)), tmp_path / "extra.pth")
    with pytest.raises(UserError, match=r"not in the model \['blocks.0.adapter.weight'\]"):
        encoder_from(read_weights(tmp_path / "extra.pth"), tiny_params(), 3, "extra.pth")
    blob = training_state(state, authors_config("vit", 2))
    blob["ema_weights"] = {}
    with pytest.raises(UserError, match=r"top-level entries \['ema_weights'\]"):
        convert(blob)


def test_three_channel_weights_adapt_to_grey_images(tmp_path: Path) -> None:
    path = tmp_path / "rgb.pth"
    source = save_authors_vit(path, chans=3)
    converted = read_weights(path)
    encoder = encoder_from(converted, tiny_params(), 1, str(path))
    weight = encoder.backbone.patch_embed.proj.weight
    torch.testing.assert_close(
        weight, source["encoder.patch_embed.proj.weight"].sum(1, keepdim=True)
    )
    assert converted.adapted == ["patch_embed.proj.weight: 3 -> 1 input channels"]


# -- ResNets, MAE and timm --------------------------------------------------------------------
def test_authors_resnet_pretrain(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    source = save_authors_resnet(path, "resnet18")
    converted = read_weights(path)
    assert converted.format == "mfm-resnet"
    assert converted.architecture.name == "resnet18"
    params = Params.model_validate({"model": {"name": "resnet18"}, "data": {"img_size": 64}})
    encoder = encoder_from(converted, params, 3, str(path))
    reference = timm.create_model("resnet18", num_classes=0)
    reference.load_state_dict(
        {k.removeprefix("encoder."): v for k, v in source.items() if k.startswith("encoder.")}
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.backbone.eval()(x), reference.eval()(x), atol=1e-5, rtol=1e-5
        )


def test_mae_checkpoint_drops_its_decoder_by_name(tmp_path: Path) -> None:
    # No config in MAE files: heads are the width / 64 of every standard ViT.
    state = random_vit(128, 2, 2, 4, 16, 3, False)
    state["mask_token"] = torch.zeros(1, 1, 128)
    state["decoder_embed.weight"] = torch.zeros(32, 128)
    state["decoder_pred.weight"] = torch.zeros(48, 32)
    torch.save({"model": state, "epoch": 799}, tmp_path / "mae.pth")
    converted = read_weights(tmp_path / "mae.pth")
    assert converted.format == "mae"
    assert sorted(converted.dropped["MAE decoder and mask token (pretraining only)"]) == [
        "decoder_embed.weight",
        "decoder_pred.weight",
        "mask_token",
    ]
    assert converted.architecture.kwargs == {"embed_dim": 128, "depth": 2, "num_heads": 2}
    params = tiny_params(model__kwargs={"depth": 2, "embed_dim": 128, "num_heads": 2})
    encoder = encoder_from(converted, params, 3, "mae.pth")
    torch.testing.assert_close(encoder.backbone.pos_embed, state["pos_embed"])


def test_plain_timm_state_dict_of_an_unlisted_model_uses_params(tmp_path: Path) -> None:
    model = timm.create_model("convnext_atto", num_classes=0)
    torch.save(model.state_dict(), tmp_path / "convnext.pth")
    converted = read_weights(tmp_path / "convnext.pth")
    assert converted.format == "timm" and converted.architecture is None
    params = Params.model_validate({"model": {"name": "convnext_atto"}, "data": {"img_size": 32}})
    encoder = encoder_from(converted, params, 3, "convnext.pth")
    torch.testing.assert_close(encoder.backbone.stem[0].weight, model.stem[0].weight)
    wrong = Params.model_validate({"model": {"name": "convnext_femto"}, "data": {"img_size": 32}})
    with pytest.raises(UserError, match="does not fit"):
        encoder_from(read_weights(tmp_path / "convnext.pth"), wrong, 3, "convnext.pth")


# -- the import command ------------------------------------------------------------------------
def test_import_command_writes_the_encoder_and_the_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "# comment kept\ndata:\n  dataset: digits\n  img_size: 32\nmodel:\n  name: resnet18\n"
    )
    save_authors_vit(tmp_path / "mfm_vit.pth", chans=1)
    assert main(["import", "mfm_vit.pth"]) == 2  # params build a resnet18: refused, unwritten
    assert not (tmp_path / "weights").exists()
    assert main(["import", "mfm_vit.pth", "--write-params"]) == 0
    text = (tmp_path / "params.yaml").read_text()
    assert text.startswith("# comment kept")
    params = yaml.safe_load(text)
    assert params["pretrain"]["weights"] == "weights/mfm_vit.encoder.pt"
    assert params["model"]["patch_size"] == 4 and params["data"]["img_size"] == 16
    encoder = load_encoder(tmp_path / "weights" / "mfm_vit.encoder.pt")
    assert encoder.spec["kwargs"] == {"embed_dim": 48, "depth": 2, "num_heads": 2}
    again = read_weights(tmp_path / "weights" / "mfm_vit.encoder.pt")  # the project format
    assert again.format == "project" and set(again.pixel_head) == {"proj.weight", "proj.bias"}


# -- the stages on imported weights ---------------------------------------------------------
@pytest.fixture
def digits(tmp_path: Path) -> tuple[Params, Path]:
    from mfm.prepare import run as prepare

    params = tiny_params()
    prepare(params, tmp_path / "prepared")
    return params, tmp_path


def test_pretrain_stage_imports_instead_of_training(digits: tuple[Params, Path]) -> None:
    from mfm.pretrain import run

    params, root = digits
    source = save_authors_vit(root / "mfm.pth", chans=1)
    target, _ = import_file(read_weights(root / "mfm.pth"), root / "mfm.pth", params, 1, None)
    params.pretrain.weights = str(target)
    metrics = run(params, root / "prepared", root / "pretrain")
    assert metrics["imported"]["format"] == "project" and metrics["pixel_head"] is True
    assert metrics["imported"]["loaded_tensors"] == len(load_encoder(target).backbone.state_dict())
    encoder = load_encoder(root / "pretrain" / "encoder.pt").eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        expected = authors_vit_forward(source, x, heads=2)
        torch.testing.assert_close(
            encoder.backbone.forward_features(x), expected, atol=1e-4, rtol=1e-4
        )
        shared = timm.create_model(
            f"local-dir:{root / 'pretrain' / 'timm'}", pretrained=True
        ).eval()
        torch.testing.assert_close(shared.forward_features(x), expected, atol=1e-4, rtol=1e-4)
    ckpt = torch.load(root / "pretrain" / "checkpoint.pt", weights_only=True)
    assert ckpt["complete"] is True
    assert (root / "pretrain" / "reconstruction.png").stat().st_size > 0
    assert list((root / "pretrain" / "live" / "plots" / "metrics").rglob("*.tsv"))


def test_finetune_stage_scores_an_imported_classifier(digits: tuple[Params, Path]) -> None:
    from mfm.finetune import run

    params, root = digits
    source = save_authors_vit(root / "ft.pth", chans=1, pretrain=False, classes=10)
    params.finetune.weights = str(root / "ft.pth")
    metrics = run(params, "mfm", root / "prepared", root / "pretrain", root / "finetune")
    assert metrics["epochs"] == 0 and metrics["imported"]["format"] == "mfm-vit"
    model, info = load_classifier(root / "finetune" / "mfm" / "classifier.pt")
    assert info["imported_from"] == str(root / "ft.pth") and len(info["classes"]) == 10
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(x), authors_vit_forward(source, x, 2), atol=1e-4, rtol=1e-4
        )
    rows = (root / "finetune" / "mfm" / "predictions.csv").read_text().splitlines()
    correct = sum(a == p for a, p in (row.split(",") for row in rows[1:]))
    assert metrics["top1"] == pytest.approx(100 * correct / (len(rows) - 1))


def test_encoder_file_given_as_classifier_is_refused(digits: tuple[Params, Path]) -> None:
    from mfm.finetune import run

    params, root = digits
    save_authors_vit(root / "pre.pth", chans=1)
    params.finetune.weights = str(root / "pre.pth")
    with pytest.raises(UserError, match="no classification head"):
        run(params, "mfm", root / "prepared", root / "pretrain", root / "finetune")
    assert not (root / "finetune").exists() or not os.listdir(root / "finetune" / "mfm")
