"""Encoders written as timm model folders load back through ``timm.create_model`` unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from mfm.config import ModelParams
from mfm.models import Encoder, build_encoder, encoder_from_spec
from mfm.timm_folder import write_timm_folder

# depth 2 (timm's default is 12) and patch 4 at 32 px: a folder without model_args fails.
TINY_VIT = ModelParams(
    name="vit_tiny_patch16_224", patch_size=4, drop_path_rate=0.1, kwargs={"depth": 2}
)
CARD = {
    "pretext": "mfm",
    "dataset": "fashion_mnist",
    "mean": [0.286],
    "std": [0.353],
    "recipe": {"epochs": 3, "lr": 0.0015, "mask": {"radius": 4.0}},
    "metrics": {"linprobe_top1": 0.8125, "finetune_top1": 0.9031},
}


def perturbed(encoder: Encoder) -> Encoder:
    """``encoder`` with noise on every weight and norm statistic, so a folder whose weights
    did not load (timm's init, another seed) cannot match by accident."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in encoder.backbone.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = 0.1 * torch.randn(tensor.shape, generator=gen)
            tensor.copy_(tensor.abs() + 0.5 if name.endswith("running_var") else tensor + noise)
    return encoder.eval()


@pytest.fixture(scope="module")
def vit() -> Encoder:
    return perturbed(build_encoder(TINY_VIT, img_size=32, in_chans=1))


@pytest.fixture(scope="module")
def cnn() -> Encoder:
    # At 16 px resnet18's stride-32 map would be 1x1, so build_encoder dilates it.
    encoder = perturbed(build_encoder(ModelParams(name="resnet18"), img_size=16, in_chans=1))
    assert encoder.spec["output_stride"] is not None
    return encoder


def load(folder: Path, **kwargs: object) -> nn.Module:
    return timm.create_model(f"local-dir:{folder}", pretrained=True, **kwargs).eval()


def assert_same_model(loaded: nn.Module, encoder: Encoder, img_size: int) -> None:
    """Same weights (names, shapes, values) and same features, pooled and unpooled."""
    ours = encoder.backbone.state_dict()
    theirs = loaded.state_dict()
    assert list(theirs) == list(ours)
    for key, tensor in ours.items():
        torch.testing.assert_close(theirs[key], tensor, rtol=0, atol=0, msg=key)
    x = torch.randn(2, encoder.spec["in_chans"], img_size, img_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), encoder.backbone.forward_features(x))
        pooled = loaded(x)
        torch.testing.assert_close(pooled, encoder.pooled_features(x))
    assert loaded.num_classes == 0
    assert pooled.shape == (2, encoder.num_features)


@pytest.mark.parametrize(("name", "img_size"), [("vit", 32), ("cnn", 16)])
def test_folder_loads_as_the_same_backbone(
    name: str, img_size: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    encoder = request.getfixturevalue(name)
    write_timm_folder(encoder, tmp_path / "export", CARD)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert_same_model(load(tmp_path / "export"), encoder, img_size)


def test_vit_architecture_comes_from_model_args(vit: Encoder, tmp_path: Path) -> None:
    write_timm_folder(vit, tmp_path / "export", CARD)
    loaded = load(tmp_path / "export")
    assert len(loaded.blocks) == 2
    assert loaded.patch_embed.patch_size == (4, 4)
    assert loaded.patch_embed.img_size == (32, 32)
    assert loaded.patch_embed.proj.in_channels == 1


def test_cnn_output_stride_comes_from_model_args(cnn: Encoder, tmp_path: Path) -> None:
    write_timm_folder(cnn, tmp_path / "export", {})
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_args"]["output_stride"] == cnn.spec["output_stride"]
    x = torch.randn(1, 1, 16, 16)
    stride = cnn.spec["output_stride"]
    assert load(tmp_path / "export").forward_features(x).shape[-2:] == (16 // stride,) * 2


def test_vit_config(vit: Encoder, tmp_path: Path) -> None:
    write_timm_folder(vit, tmp_path / "export", CARD)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["num_classes"] == 0
    assert config["num_features"] == 192
    assert config["model_args"] == {
        "depth": 2,
        "patch_size": 4,
        "img_size": [32, 32],
        "in_chans": 1,
        "num_classes": 0,
        "global_pool": "token",
    }
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [1, 32, 32]
    assert cfg["mean"] == [0.286]
    assert cfg["std"] == [0.353]
    assert cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == 1.0
    assert cfg["num_classes"] == 0
    assert cfg["fixed_input_size"] is True
    # Nothing copied from timm's ImageNet weights for this architecture.
    assert not {"tag", "license", "hf_hub_id", "url", "test_input_size"} & set(cfg)


def test_cnn_input_size_from_card(cnn: Encoder, tmp_path: Path) -> None:
    write_timm_folder(cnn, tmp_path / "export", {"img_size": 16})
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [1, 16, 16]
    assert cfg["fixed_input_size"] is False


@pytest.mark.parametrize("dropped", [["depth"], ["patch_size", "img_size"]])
def test_folder_without_its_model_args_does_not_pass(
    vit: Encoder, tmp_path: Path, dropped: list[str]
) -> None:
    """The round trip checks catch a folder built with timm's defaults: a deeper model fails
    the strict load, another patch grid loads resampled weights."""
    folder = tmp_path / "export"
    write_timm_folder(vit, folder, CARD)
    config = json.loads((folder / "config.json").read_text())
    for key in dropped:
        del config["model_args"][key]
    if "img_size" in dropped:
        config["pretrained_cfg"]["input_size"] = [1, 224, 224]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises((RuntimeError, AssertionError)):
        assert_same_model(load(folder), vit, 32)


def test_readme(vit: Encoder, tmp_path: Path) -> None:
    write_timm_folder(vit, tmp_path / "export", CARD)
    readme = (tmp_path / "export" / "README.md").read_text()
    assert readme.startswith("# vit_tiny_patch16_224 encoder, mfm pretraining\n")
    assert 'timm.create_model("local-dir:' in readme
    assert "push_to_hf_hub" in readme
    assert "- depth: 2" in readme
    assert "- input_size: [1, 32, 32]" in readme
    assert "## Training" in readme
    assert "- dataset: `fashion_mnist`" in readme
    assert "- linprobe_top1: 0.8125" in readme
    assert "- finetune_top1: 0.9031" in readme
    assert "- lr: 0.0015" in readme
    assert "  - radius: 4" in readme
    assert "drop_path_rate" not in readme


def test_second_write_replaces_the_folder(vit: Encoder, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    write_timm_folder(vit, folder, CARD)
    (folder / "stale.bin").write_bytes(b"old")
    write_timm_folder(vit, folder, {**CARD, "metrics": {"linprobe_top1": 0.5}})
    assert not (folder / "stale.bin").exists()
    readme = (folder / "README.md").read_text()
    assert "0.5" in readme
    assert "0.8125" not in readme
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary siblings left


def test_loaded_model_reexports_the_same_config(vit: Encoder, tmp_path: Path) -> None:
    """What push_to_hf_hub would upload from a loaded folder: the same architecture."""
    write_timm_folder(vit, tmp_path / "export", CARD)
    timm.models.save_for_hf(load(tmp_path / "export"), tmp_path / "again", safe_serialization=True)
    first = json.loads((tmp_path / "export" / "config.json").read_text())
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["model_args"] == first["model_args"]
    assert again["pretrained_cfg"]["mean"] == first["pretrained_cfg"]["mean"]
    assert_same_model(load(tmp_path / "again"), vit, 32)


def test_new_head_on_load(vit: Encoder, tmp_path: Path) -> None:
    write_timm_folder(vit, tmp_path / "export", CARD)
    classifier = load(tmp_path / "export", num_classes=3)
    assert classifier(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    torch.testing.assert_close(
        classifier.state_dict()["blocks.1.mlp.fc2.weight"],
        vit.backbone.state_dict()["blocks.1.mlp.fc2.weight"],
    )


def test_backbone_with_a_head_is_refused(vit: Encoder, tmp_path: Path) -> None:
    with_head = encoder_from_spec({**vit.spec, "num_classes": 5})
    with pytest.raises(ValueError, match="5-class head"):
        write_timm_folder(with_head, tmp_path / "export", CARD)
    assert not (tmp_path / "export").exists()
