"""The export stage (ONNX + parity) and the torch-free ``predict`` command."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import mfm.export
from mfm.cli import main
from mfm.config import Params
from mfm.data.augment import device_augment, normalizer
from mfm.data.datasets import ManifestImages, image_transform
from mfm.data.meta import DatasetMeta, load_meta
from mfm.errors import UserError
from mfm.export import run
from mfm.finetune import classifier_info
from mfm.models import build_classifier, load_classifier, save_classifier
from mfm.predict import METADATA_KEYS, OnnxClassifier, Preprocessing, find_images, predict
from mfm.prepare import run as prepare

TINY_VIT = {
    "name": "vit_tiny_patch16_224",
    "patch_size": 4,
    "kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2},
}
TINY_CNN = {"name": "resnet10t", "patch_size": None}
IMG = 16


def _workspace(root: Path, model: dict, parity_images: int = 256) -> Params:
    """Prepared digits and one saved classifier, as finetune leaves them."""
    params = Params.model_validate(
        {
            "data": {"dataset": "digits", "img_size": IMG},
            "model": model,
            "export": {"parity_images": parity_images, "latency_repeats": 1},
            "runtime": {"device": "cpu"},
        }
    )
    prepare(params, root / "data/prepared")
    meta = load_meta(root / "data/prepared")
    torch.manual_seed(0)
    classifier, spec = build_classifier(params.model, IMG, meta.channels, meta.num_classes, 0.0)
    info = classifier_info(meta, params, "mfm")
    save_classifier(classifier, spec, info, root / "results/finetune/mfm/classifier.pt")
    return params


def _export(root: Path, params: Params) -> dict:
    return run(params, root / "data/prepared", root / "results/finetune", root / "results/export")


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, Path, dict]:
    root = tmp_path_factory.mktemp("vit")
    params = _workspace(root, TINY_VIT)
    return params, root, _export(root, params)


def _torch_model(root: Path) -> torch.nn.Module:
    return load_classifier(root / "results/finetune/mfm/classifier.pt")[0].eval()


def test_vit_export_passes_parity_on_real_test_images(vit_export: tuple) -> None:
    _, root, metrics = vit_export
    path = root / "results/export/model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    assert metrics["parity_images"] == 256
    assert metrics["max_abs_diff"] <= 1e-4
    assert metrics["top1_agreement"] == 100.0
    assert metrics["torch_top1"] == metrics["onnx_top1"]
    assert metrics["file_bytes"] == path.stat().st_size
    assert metrics["input_shape"] == ["batch", 1, IMG, IMG]  # a ViT's size is fixed
    assert set(metrics["latency"]) == {
        "torch_b1_ms",
        "onnxruntime_b1_ms",
        "torch_b64_ms",
        "onnxruntime_b64_ms",
    }
    assert not [p for p in path.parent.iterdir() if p.name != "model.onnx"]  # no temp left


@pytest.mark.parametrize("batch", [1, 7])
def test_one_file_serves_any_batch_size(vit_export: tuple, batch: int) -> None:
    _, root, _ = vit_export
    session = ort.InferenceSession(str(root / "results/export/model.onnx"))
    x = torch.randn(batch, 1, IMG, IMG)
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = _torch_model(root)(x).numpy()
    assert logits.shape == (batch, 10)
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_metadata_tells_a_deployer_everything(vit_export: tuple) -> None:
    params, root, _ = vit_export
    model = onnx.load(str(root / "results/export/model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert set(METADATA_KEYS) <= set(props)
    assert model.opset_import[0].version >= 17
    assert json.loads(props["classes"]) == [str(i) for i in range(10)]
    assert int(props["img_size"]) == IMG and int(props["channels"]) == 1
    assert len(json.loads(props["mean"])) == len(json.loads(props["std"])) == 1
    assert props["resize"] == "square"
    assert Params.model_validate_json(props["params"]) == params
    assert props["mfm_version"] == mfm.__version__


def test_cnn_export_has_dynamic_height_and_width(tmp_path: Path) -> None:
    params = _workspace(tmp_path, TINY_CNN, parity_images=64)
    metrics = _export(tmp_path, params)
    assert metrics["input_shape"] == ["batch", 1, "height", "width"]
    assert metrics["parity_images"] == 64 and metrics["top1_agreement"] == 100.0
    session = ort.InferenceSession(str(tmp_path / "results/export/model.onnx"))
    x = torch.randn(3, 1, 24, 20)  # another size than the one exported
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = _torch_model(tmp_path)(x).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_failed_parity_stops_the_stage_and_writes_no_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = _workspace(tmp_path, TINY_VIT, parity_images=8)
    real = mfm.export.onnx_logits
    monkeypatch.setattr(mfm.export, "onnx_logits", lambda *a: real(*a) + 1e-3)
    with pytest.raises(UserError, match=r"parity failed.*model.onnx was not written"):
        _export(tmp_path, params)
    out = tmp_path / "results/export"
    assert not out.exists() or not list(out.iterdir())


def test_export_of_a_missing_classifier_is_one_clear_error(tmp_path: Path) -> None:
    params = _workspace(tmp_path, TINY_VIT)
    (tmp_path / "results/finetune/mfm/classifier.pt").unlink()
    with pytest.raises(UserError, match="classifier .* not found; run the finetune stage"):
        _export(tmp_path, params)


# -- predict --------------------------------------------------------------------------------


def _pipeline_probs(root: Path, images: np.ndarray) -> np.ndarray:
    """Softmax of the torch classifier on the pipeline's own test-time preprocessing."""
    meta = load_meta(root / "data/prepared")
    prepare = torch.nn.Sequential(device_augment(meta, IMG, train=False), normalizer(meta))
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        return torch.softmax(_torch_model(root)(prepare(batch)), dim=1).numpy()


def _write_pngs(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"img{i:02d}.png")
        Image.fromarray(image[..., 0]).save(paths[-1])
    return paths


def test_predict_equals_the_torch_classifier(vit_export: tuple, tmp_path: Path) -> None:
    _, root, _ = vit_export
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, IMG, IMG, 1), dtype=np.uint8)  # the model's size
    paths = _write_pngs(tmp_path / "imgs", images)
    out = tmp_path / "pred.json"
    code = main(
        [
            "predict",
            str(tmp_path / "imgs"),
            "--model",
            str(root / "results/export/model.onnx"),
            "--top-k",
            "3",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())
    expected = _pipeline_probs(root, images)
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    for row, probs in zip(rows, expected, strict=True):
        assert [t["index"] for t in row["top"]] == list(np.argsort(-probs)[:3])
        got = [t["probability"] for t in row["top"]]
        np.testing.assert_allclose(got, np.sort(probs)[::-1][:3], atol=1e-5)
        assert [t["class"] for t in row["top"]] == [str(t["index"]) for t in row["top"]]


def test_predict_writes_csv_of_the_pipelines_scores(vit_export: tuple, tmp_path: Path) -> None:
    _, root, _ = vit_export
    images = np.load(root / "data/prepared/test_images.npy")[:4]  # 8x8: resized to 16
    paths = _write_pngs(tmp_path / "imgs", images)
    out = tmp_path / "pred.csv"
    model = str(root / "results/export/model.onnx")
    assert main(["predict", *map(str, paths), "--model", model, "--output", str(out)]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0][:5] == ["path", "class_1", "prob_1", "class_2", "prob_2"]
    assert len(rows) == 5 and len(rows[1]) == 1 + 2 * 5
    for row, probs in zip(rows[1:], _pipeline_probs(root, images), strict=True):
        assert row[1] == str(int(probs.argmax()))
        assert float(row[2]) == pytest.approx(float(probs.max()), abs=1e-5)


def _pipeline_input(path: Path, prep: Preprocessing) -> np.ndarray:
    """What the pipeline feeds the classifier for one image file at test time.

    Image folders (``center_crop``) go through the loader's per-image transform; arrays
    (``square``) are stored whole and resized on the device. Then the device step and the
    normaliser, as in evaluation.
    """
    kind = "manifest" if prep.resize == "center_crop" else "arrays"
    meta = DatasetMeta(
        dataset="files",
        kind=kind,
        classes=prep.classes,
        num_classes=len(prep.classes),
        channels=prep.channels,
        image_size=None,
        mean=prep.mean.tolist(),
        std=prep.std.tolist(),
        num_train=0,
        num_test=1,
        source=str(path.parent),
    )
    if kind == "manifest":
        transform = image_transform(IMG, train=False)
        image = ManifestImages([str(path)], [0], transform, prep.channels)[0][0]
    else:
        with Image.open(path) as opened:
            array = np.array(opened.convert("L" if prep.channels == 1 else "RGB"))
        image = torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)
    prepare = torch.nn.Sequential(device_augment(meta, IMG, train=False), normalizer(meta))
    with torch.no_grad():
        return prepare(image[None])[0].numpy()


def _photo(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    """An image file of ``size`` (W, H): noise over a ramp, so resampling errors show."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size[0])[None, :, None]
    noise = rng.integers(-90, 90, size=(size[1], size[0], 3))
    pixels = np.clip(ramp + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


@pytest.mark.parametrize("resize", ["square", "center_crop"])
@pytest.mark.parametrize(
    ("size", "mode", "suffix"),
    [
        ((8, 8), "L", ".png"),  # the digits' own size: up
        ((5, 9), "RGB", ".png"),  # tall and tiny
        ((40, 23), "L", ".jpg"),  # wide: down
        ((19, 33), "RGB", ".jpg"),
        ((61, 17), "RGB", ".bmp"),
        ((16, 16), "L", ".webp"),  # already the model's size
    ],
)
def test_predict_preprocesses_files_as_the_pipeline_tests_them(
    vit_export: tuple,
    tmp_path: Path,
    resize: str,
    size: tuple[int, int],
    mode: str,
    suffix: str,
) -> None:
    """The torch-free path against the pipeline's own test-time transform, per resize mode:
    any drift between them (rounding, interpolation, crop box, statistics) fails here."""
    _, root, _ = vit_export
    classifier = OnnxClassifier(root / "results/export/model.onnx")
    channels = 1 if mode == "L" else 3
    classifier.prep = dataclasses.replace(
        classifier.prep,
        channels=channels,
        mean=np.asarray([0.4, 0.5, 0.6][:channels], dtype=np.float32),
        std=np.asarray([0.2, 0.25, 0.3][:channels], dtype=np.float32),
        resize=resize,
    )
    path = tmp_path / f"photo{suffix}"
    _photo(path, size, mode, seed=size[0])
    with Image.open(path) as image:
        got = classifier.preprocess(image)
    expected = _pipeline_input(path, classifier.prep)
    assert got.shape == expected.shape == (channels, IMG, IMG) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_predict_never_imports_torch(vit_export: tuple, tmp_path: Path) -> None:
    _, root, _ = vit_export
    _write_pngs(tmp_path / "imgs", np.zeros((2, IMG, IMG, 1), dtype=np.uint8))
    script = (
        "import sys, mfm.cli\n"
        f"code = mfm.cli.main(['predict', {str(tmp_path / 'imgs')!r}, '--model', "
        f"{str(root / 'results/export/model.onnx')!r}])\n"
        "assert code == 0 and 'torch' not in sys.modules, sorted(sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("img0") == 2


def _predict_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["predict", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_a_corrupted_onnx_file_is_one_clear_error(
    vit_export: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, root, _ = vit_export
    bad = tmp_path / "model.onnx"
    bad.write_bytes((root / "results/export/model.onnx").read_bytes()[:5000])  # truncated
    _write_pngs(tmp_path / "imgs", np.zeros((1, IMG, IMG, 1), dtype=np.uint8))
    err = _predict_error(capsys, str(tmp_path / "imgs"), "--model", str(bad))
    assert "is not a readable ONNX model" in err and "re-export" in err


def test_a_missing_metadata_key_is_one_clear_error(
    vit_export: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, root, _ = vit_export
    model = onnx.load(str(root / "results/export/model.onnx"))
    kept = [p for p in model.metadata_props if p.key != "classes"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    stripped = tmp_path / "stripped.onnx"
    onnx.save(model, str(stripped))
    _write_pngs(tmp_path / "imgs", np.zeros((1, IMG, IMG, 1), dtype=np.uint8))
    err = _predict_error(capsys, str(tmp_path / "imgs"), "--model", str(stripped))
    assert "lacks the metadata key 'classes'" in err


def test_an_unreadable_image_is_one_clear_error(
    vit_export: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, root, _ = vit_export
    (tmp_path / "broken.png").write_bytes(b"not a png")
    model = str(root / "results/export/model.onnx")
    err = _predict_error(capsys, str(tmp_path / "broken.png"), "--model", model)
    assert "broken.png is not a readable image" in err
    err = _predict_error(capsys, str(tmp_path / "nowhere"), "--model", model)
    assert "does not exist" in err


def test_predict_orders_rows_like_its_inputs(vit_export: tuple, tmp_path: Path) -> None:
    _, root, _ = vit_export
    paths = _write_pngs(tmp_path / "imgs", np.zeros((3, IMG, IMG, 1), dtype=np.uint8))
    classifier = OnnxClassifier(root / "results/export/model.onnx")
    rows = predict(classifier, paths[::-1], top_k=20, batch_size=2)
    assert [r["path"] for r in rows] == [str(p) for p in paths[::-1]]
    assert all(len(r["top"]) == 10 for r in rows)  # k capped at the class count
    assert all(sum(t["probability"] for t in r["top"]) == pytest.approx(1.0) for r in rows)


def test_predict_finds_images_by_the_pipelines_rule(tmp_path: Path) -> None:
    """Hidden files and folders (copying between machines leaves them) are never images."""
    for name in ("a.PNG", "sub/b.jpg", ".c.png", "._d.jpg", ".ipynb_checkpoints/e.png", "f.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert find_images([tmp_path]) == [tmp_path / "a.PNG", tmp_path / "sub/b.jpg"]
