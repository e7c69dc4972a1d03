"""The segmentation scenes built from prepared arrays: layout, determinism, split hygiene,
labels that match the pasted pixels, occlusion and clipping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mfm.data.meta import DatasetMeta, save_meta
from mfm.data.prepared import write_prepared
from mfm.data.scenes import SceneObject, build_scenes, compose_scene
from mfm.data.sources.common import ArrayData
from mfm.errors import UserError
from mfm.segment_params import ScenesParams

CLASSES = [f"thing{c}" for c in range(10)]
TRAIN_CLASSES, TEST_CLASSES = range(5), range(5, 10)  # disjoint: a scene shows its source


def value(label: int) -> int:
    """The brightness of every image of class ``label``: train 60-100, test 200-220."""
    return 60 + 10 * label if label < 5 else 200 + 5 * (label - 5)


def solid_images(classes: range, count: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 12x10 images, each a solid block of its class's brightness on black."""
    labels = np.array([classes[i % len(classes)] for i in range(count)], dtype=np.int64)
    images = np.zeros((count, 12, 10, channels), dtype=np.uint8)
    for image, label in zip(images, labels, strict=True):
        image[2:10, 2:8] = value(int(label))
    return images, labels


def write_arrays(folder: Path, channels: int = 1) -> Path:
    train_images, train_labels = solid_images(TRAIN_CLASSES, 20, channels)
    test_images, test_labels = solid_images(TEST_CLASSES, 8, channels)
    data = ArrayData(train_images, train_labels, test_images, test_labels, CLASSES, "fake")
    meta = DatasetMeta(
        dataset="fake",
        kind="arrays",
        classes=CLASSES,
        num_classes=len(CLASSES),
        channels=channels,
        image_size=(12, 10),
        mean=[0.5] * channels,
        std=[0.25] * channels,
        num_train=20,
        num_test=8,
        source="fake",
    )
    write_prepared(data, meta, folder)
    return folder


CFG = ScenesParams(size=24, train=30, test=12, objects=(2, 4), scale=(0.8, 1.5), threshold=32)


def read_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All scenes of ``split`` as (N, H, W[, C]) images and (N, H, W) label maps."""
    names = sorted(p.name for p in (root / "images" / split).iterdir())
    images = np.stack([np.asarray(Image.open(root / "images" / split / n)) for n in names])
    masks = np.stack([np.asarray(Image.open(root / "masks" / split / n)) for n in names])
    return images, masks


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    return write_arrays(tmp_path / "prepared")


def test_layout_and_metrics(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "scenes"
    metrics = build_scenes(prepared, CFG, 0, out)
    assert (out / "classes.txt").read_text().splitlines() == ["background", *CLASSES]
    for split, count in (("train", CFG.train), ("test", CFG.test)):
        for kind in ("images", "masks"):
            names = sorted(p.name for p in (out / kind / split).iterdir())
            assert names == [f"{i:05d}.png" for i in range(count)]
            with Image.open(out / kind / split / names[0]) as image:
                assert (image.mode, image.size) == ("L", (CFG.size, CFG.size))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    assert {k: metrics[k] for k in ("num_train", "num_test", "size", "num_classes")} == {
        "num_train": 30,
        "num_test": 12,
        "size": 24,
        "num_classes": 11,
    }
    fractions = metrics["train_pixel_fraction"]
    assert list(fractions) == ["background", *CLASSES]
    assert sum(fractions.values()) == pytest.approx(1.0)
    _, masks = read_split(out, "train")
    counts = np.bincount(masks.ravel(), minlength=11)
    assert [fractions[name] for name in fractions] == pytest.approx(counts / counts.sum())
    json.dumps(metrics)  # plain numbers, ready for the metrics file


def test_same_seed_same_files_other_seed_other_files(prepared: Path, tmp_path: Path) -> None:
    build_scenes(prepared, CFG, 3, tmp_path / "a")
    build_scenes(prepared, CFG, 3, tmp_path / "b")
    build_scenes(prepared, CFG, 4, tmp_path / "c")
    first = file_bytes(tmp_path / "a")
    assert first == file_bytes(tmp_path / "b")
    other = file_bytes(tmp_path / "c")
    assert first.keys() == other.keys()
    for split in ("train", "test"):
        assert first[f"images/{split}/00000.png"] != other[f"images/{split}/00000.png"]


def test_test_scenes_do_not_depend_on_the_number_of_train_scenes(
    prepared: Path, tmp_path: Path
) -> None:
    build_scenes(prepared, CFG, 0, tmp_path / "a")
    build_scenes(prepared, CFG.model_copy(update={"train": 7}), 0, tmp_path / "b")
    assert np.array_equal(
        read_split(tmp_path / "a", "test")[0], read_split(tmp_path / "b", "test")[0]
    )


def test_train_scenes_use_training_images_only(prepared: Path, tmp_path: Path) -> None:
    build_scenes(prepared, CFG, 0, tmp_path / "scenes")
    train_images, train_masks = read_split(tmp_path / "scenes", "train")
    test_images, test_masks = read_split(tmp_path / "scenes", "test")
    assert set(np.unique(train_masks)) == {0, *(c + 1 for c in TRAIN_CLASSES)}
    assert set(np.unique(test_masks)) <= {0, *(c + 1 for c in TEST_CLASSES)}
    assert train_images.max() <= value(max(TRAIN_CLASSES))  # no test image's brightness
    assert test_images.max() >= value(min(TEST_CLASSES))


def test_labels_match_the_pasted_pixels(prepared: Path, tmp_path: Path) -> None:
    build_scenes(prepared, CFG, 0, tmp_path / "scenes")
    for split in ("train", "test"):
        images, masks = read_split(tmp_path / "scenes", split)
        assert (images[masks == 0] == 0).all()  # background stays blank
        assert (images[masks > 0] > CFG.threshold).all()  # a labelled pixel is bright
        # an object's pixels are at most its class's brightness (its edges are blended
        # with black); a pixel labelled with another object's class would exceed it
        brightest = np.array([0, *(value(c) for c in range(10))])
        assert (images <= brightest[masks]).all()
        for label in np.unique(masks[masks > 0]):
            assert (images[masks == label] == brightest[label]).any()  # interiors exact


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_objects_are_scaled_and_keep_at_least_half_inside(tmp_path: Path, scale: float) -> None:
    """One full-bright object per scene at a fixed scale: its visible area is its label area."""
    bright = write_arrays(tmp_path / "bright")
    for split in ("train", "test"):
        images = np.load(bright / f"{split}_images.npy")
        np.save(bright / f"{split}_images.npy", np.full_like(images, 255))
    cfg = CFG.model_copy(
        update={"size": 24, "train": 200, "objects": (1, 1), "scale": (scale, scale)}
    )
    build_scenes(bright, cfg, 0, tmp_path / "scenes")
    _, masks = read_split(tmp_path / "scenes", "train")
    visible = (masks > 0).sum(axis=(1, 2))
    area = round(12 * scale) * round(10 * scale)
    assert visible.max() == area  # objects fully inside show the scaled size
    assert (visible >= area / 2).all()
    assert (visible < area).any()  # some objects do hang off the canvas


def test_later_objects_occlude_and_objects_are_clipped() -> None:
    first = np.full((4, 4, 1), 100, dtype=np.uint8)
    second = np.full((4, 4, 1), 200, dtype=np.uint8)
    second[0, 0] = 10  # dark: not part of the object, the first one shows through
    objects = [SceneObject(first, 1, 1, 3), SceneObject(second, 3, 3, 7)]
    image, labels = compose_scene(6, 1, objects, threshold=32)
    expected = np.zeros((6, 6), dtype=np.uint8)
    expected[1:5, 1:5] = 3
    expected[3:6, 3:6] = 7  # clipped at the canvas edge
    expected[3, 3] = 3
    assert np.array_equal(labels, expected)
    assert np.array_equal(image[..., 0], np.select([expected == 3, expected == 7], [100, 200]))
    hanging = compose_scene(6, 1, [SceneObject(second, -2, 4, 1)], threshold=32)[1]
    assert hanging[:2, 4:].all() and hanging.sum() == 4  # 2x2 of the 4x4 lands on the canvas


def test_rgb_arrays_give_rgb_scenes(tmp_path: Path) -> None:
    build_scenes(write_arrays(tmp_path / "rgb", channels=3), CFG, 0, tmp_path / "scenes")
    images, masks = read_split(tmp_path / "scenes", "train")
    assert images.shape == (CFG.train, CFG.size, CFG.size, 3)
    assert (images[masks > 0] > CFG.threshold).all()


def test_image_folders_give_scenes_of_their_photos(tmp_path: Path) -> None:
    """A manifest (image folder) split: photos decoded when drawn, shrunk to objects; train
    scenes from train photos only. Train photos are bright red, test photos bright green."""
    photos = tmp_path / "photos"
    rows = {"train": [], "test": []}
    for split, colour in (("train", (250, 40, 40)), ("test", (40, 250, 40))):
        for index in range(4):
            path = photos / split / f"{index}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (90 + 10 * index, 60), colour).save(path, quality=95)
            rows[split].append((f"{split}/{index}.jpg", index % 2))
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for split, entries in rows.items():
        lines = ["path,label", *(f"{p},{label}" for p, label in entries)]
        (prepared / f"{split}.csv").write_text("\n".join(lines) + "\n")
    meta = DatasetMeta(
        dataset="imagefolder",
        kind="manifest",
        classes=["a", "b"],
        num_classes=2,
        channels=3,
        image_size=None,
        mean=[0.5] * 3,
        std=[0.25] * 3,
        num_train=4,
        num_test=4,
        source=str(photos),
    )
    save_meta(meta, prepared)
    cfg = ScenesParams(size=32, train=6, test=3, objects=(1, 1), scale=(1.0, 1.0))
    stats = build_scenes(prepared, cfg, 0, tmp_path / "scenes")
    assert stats["num_classes"] == 3 and stats["train_pixel_fraction"]["background"] < 1
    for split, channel in (("train", 0), ("test", 1)):
        images, masks = read_split(tmp_path / "scenes", split)
        objects = images[masks > 0]
        assert len(objects) and (objects[:, channel] > 200).all(), split
        # the one object is at most 0.45 of the canvas wide: 14 px of a 32 px canvas
        assert (masks > 0).sum(axis=2).max() <= 14


def test_missing_prepared_data_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="meta.json"):
        build_scenes(tmp_path / "nothing", CFG, 0, tmp_path / "scenes")
