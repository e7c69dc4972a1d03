"""The segmentation data formats (ADE20K, folder, scenes) read one way, and every bad input
refused up front with one line naming the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from mfm.data.scenes import build_scenes
from mfm.data.segmentation_sets import (
    SegmentationSet,
    find_split,
    segmentation_split,
    uniform_size,
)
from mfm.errors import UserError
from mfm.segment_params import ScenesParams, SegmentParams
from tests.test_scenes import write_arrays


def labels_block(height: int, width: int, values: list[int]) -> np.ndarray:
    """A (height, width) uint8 label map: vertical stripes of ``values``."""
    stripes = np.array_split(np.arange(width), len(values))
    out = np.zeros((height, width), dtype=np.uint8)
    for value, columns in zip(values, stripes, strict=True):
        out[:, columns] = value
    return out


def save_image(path: Path, height: int, width: int, mode: str = "RGB", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).convert(mode).save(path)


def save_mask(path: Path, labels: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.fromarray(labels)
    if mode == "P":
        mask = mask.convert("P")  # identity palette for grey values: index == value
        mask.putpalette([v for i in range(256) for v in ((i * 7) % 256, i, 255 - i)])
    mask.save(path)


def make_folder(root: Path) -> Path:
    """images/{train,test} (jpg, png, bmp, L and RGB, non-square) + masks + classes.txt."""
    save_image(root / "images/train/a.jpg", 10, 14)
    save_image(root / "images/train/b.png", 12, 8, mode="L", seed=1)
    save_image(root / "images/train/c.bmp", 10, 14, seed=2)
    save_mask(root / "masks/train/a.png", labels_block(10, 14, [0, 1, 2, 255]))
    save_mask(root / "masks/train/b.png", labels_block(12, 8, [2, 1]), mode="P")
    save_mask(root / "masks/train/c.png", labels_block(10, 14, [1]))
    save_image(root / "images/test/z.png", 9, 9, seed=3)
    save_mask(root / "masks/test/z.png", labels_block(9, 9, [0, 2]))
    (root / "images/train/.DS_Store").write_bytes(b"junk")  # hidden: never an image
    (root / "masks/train/._a.png").write_bytes(b"junk")  # a macOS resource fork
    (root / "classes.txt").write_text("sky\nroad\ncar\n\n")
    return root


def make_ade(root: Path, with_names: bool = True) -> Path:
    """A two-image ADEChallengeData2016 tree; stored labels 0 (other), 1, 150 and 255."""
    save_image(root / "images/training/ADE_train_1.jpg", 8, 12)
    save_mask(root / "annotations/training/ADE_train_1.png", labels_block(8, 12, [0, 1, 150, 255]))
    save_image(root / "images/validation/ADE_val_1.jpg", 6, 6)
    save_mask(root / "annotations/validation/ADE_val_1.png", labels_block(6, 6, [2, 3]))
    if with_names:
        rows = ["Idx\tRatio\tTrain\tVal\tName"]
        rows += [f"{i}\t0.01\t10\t1\tname{i}, alias{i}" for i in range(1, 150)]
        rows += ["150\t0.01\t10\t1\tname150;alias150"]  # the devkit spells lists with ;
        (root / "objectInfo150.txt").write_text("\n".join(rows) + "\n")
    return root


def folder_cfg(root: Path, **changes: Any) -> SegmentParams:
    return SegmentParams(dataset="folder", root=str(root), **changes)


def test_folder_format(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "set")
    data = segmentation_split(folder_cfg(root), "train", channels=3)
    assert data.classes == ["sky", "road", "car"] and data.num_classes == 3
    assert [(i.name, m.name) for i, m in data.files.pairs] == [
        ("a.jpg", "a.png"),
        ("b.png", "b.png"),
        ("c.bmp", "c.png"),
    ]
    image, mask = data[0]
    assert type(image) is tv_tensors.Image and type(mask) is tv_tensors.Mask
    assert image.dtype == torch.uint8 and image.shape == (3, 10, 14)
    assert mask.dtype == torch.int64 and mask.shape == (10, 14)
    assert torch.equal(mask, torch.from_numpy(labels_block(10, 14, [0, 1, 2, 255])).long())
    _, palette_mask = data[1]  # mode P: the palette index is the label
    assert torch.equal(palette_mask, torch.from_numpy(labels_block(12, 8, [2, 1])).long())
    with Image.open(root / "images/train/b.png") as grey:
        expected = torch.from_numpy(np.array(grey.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(data[1][0], expected)
    test = segmentation_split(folder_cfg(root), "test", channels=3)
    assert [i.name for i, _ in test.files.pairs] == ["z.png"]


def test_channels_conversion(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "set")
    grey = segmentation_split(folder_cfg(root), "train", channels=1)
    image, _ = grey[0]
    with Image.open(root / "images/train/a.jpg") as rgb:
        expected = torch.from_numpy(np.array(rgb.convert("L")))[None]
    assert image.shape == (1, 10, 14) and torch.equal(image, expected)
    colour = segmentation_split(folder_cfg(root), "train", channels=3)
    image, _ = colour[1]  # a grey png as three equal channels
    assert image.shape == (3, 12, 8)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    with pytest.raises(ValueError, match="channels"):
        SegmentationSet(grey.files, channels=4)


def test_transform_gets_image_and_mask(tmp_path: Path) -> None:
    seen: list[tuple[type, type]] = []

    def transform(image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[Any, Any]:
        seen.append((type(image), type(mask)))
        return image[:, :2, :2], mask[:2, :2]

    root = make_folder(tmp_path / "set")
    data = segmentation_split(folder_cfg(root), "train", 3, transform=transform)
    image, mask = data[0]
    assert image.shape == (3, 2, 2) and mask.shape == (2, 2)
    assert seen == [(tv_tensors.Image, tv_tensors.Mask)]


def test_ade20k_shifts_labels_and_reads_names(tmp_path: Path) -> None:
    root = make_ade(tmp_path / "ADEChallengeData2016")
    cfg = SegmentParams(dataset="ade20k", root=str(root))
    train = segmentation_split(cfg, "train", channels=3)
    assert train.num_classes == 150
    assert train.classes[:2] == ["name1", "name2"] and train.classes[-1] == "name150"
    _, mask = train[0]
    # 0 (other) -> ignore, c -> c - 1, 255 stays ignored
    assert torch.equal(mask, torch.from_numpy(labels_block(8, 12, [255, 0, 149, 255])).long())
    test = segmentation_split(cfg, "test", channels=1)  # "test" is ADE20K's validation split
    assert [i.name for i, _ in test.files.pairs] == ["ADE_val_1.jpg"]
    assert torch.equal(test[0][1], torch.from_numpy(labels_block(6, 6, [1, 2])).long())
    assert test[0][0].shape == (1, 6, 6)


def test_ade20k_without_names_file(tmp_path: Path) -> None:
    root = make_ade(tmp_path / "ade", with_names=False)
    files = find_split(SegmentParams(dataset="ade20k", root=str(root)), "train")
    assert files.classes == [f"class_{i:03d}" for i in range(150)]


def test_scenes_format_reads_what_build_scenes_writes(tmp_path: Path) -> None:
    cfg = ScenesParams(size=20, train=6, test=3)
    build_scenes(write_arrays(tmp_path / "prepared"), cfg, 0, tmp_path / "scenes")
    params = SegmentParams(dataset="scenes")
    data = segmentation_split(params, "train", channels=3, scenes_dir=tmp_path / "scenes")
    assert len(data) == 6 and data.num_classes == 11 and data.classes[0] == "background"
    image, mask = data[5]
    assert image.shape == (3, 20, 20) and mask.shape == (20, 20)
    with Image.open(tmp_path / "scenes/masks/train/00005.png") as stored:
        assert torch.equal(mask, torch.from_numpy(np.array(stored)).long())
    assert uniform_size(data) == (20, 20)


def test_uniform_size(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "set")
    train = segmentation_split(folder_cfg(root), "train", 3)
    assert uniform_size(train) is None  # 10x14 and 12x8
    test = segmentation_split(folder_cfg(root), "test", 3)
    assert uniform_size(test) == (9, 9)
    unchecked = SegmentationSet(find_split(folder_cfg(root), "train"), 3)  # sizes from headers
    assert uniform_size(unchecked) is None
    (root / "images/train/b.png").unlink()
    (root / "masks/train/b.png").unlink()
    assert uniform_size(SegmentationSet(find_split(folder_cfg(root), "train"), 3)) == (10, 14)


def _no_root(root: Path) -> tuple[SegmentParams, str]:
    return SegmentParams(dataset="folder"), "segment.root"


def _missing_root(root: Path) -> tuple[SegmentParams, str]:
    return folder_cfg(root / "nope"), str(root / "nope")


def _missing_scenes(root: Path) -> tuple[SegmentParams, str]:
    return SegmentParams(dataset="scenes"), "scenes stage"


def _empty_split(root: Path) -> tuple[SegmentParams, str]:
    for path in (root / "images/train").iterdir():
        path.unlink()
    return folder_cfg(root), str(root / "images/train")


def _image_without_mask(root: Path) -> tuple[SegmentParams, str]:
    (root / "masks/train/b.png").unlink()
    return folder_cfg(root), str(root / "images/train/b.png")


def _mask_without_image(root: Path) -> tuple[SegmentParams, str]:
    save_mask(root / "masks/train/d.png", labels_block(4, 4, [1]))
    return folder_cfg(root), str(root / "masks/train/d.png")


def _size_mismatch(root: Path) -> tuple[SegmentParams, str]:
    save_mask(root / "masks/train/b.png", labels_block(8, 12, [1]))  # transposed
    return folder_cfg(root), str(root / "masks/train/b.png")


def _label_out_of_range(root: Path) -> tuple[SegmentParams, str]:
    save_mask(root / "masks/train/c.png", labels_block(10, 14, [1, 3, 254]))
    return folder_cfg(root), str(root / "masks/train/c.png")


def _rgb_mask(root: Path) -> tuple[SegmentParams, str]:
    Image.fromarray(np.zeros((12, 8, 3), dtype=np.uint8)).save(root / "masks/train/b.png")
    return folder_cfg(root), str(root / "masks/train/b.png")


def _unreadable_mask(root: Path) -> tuple[SegmentParams, str]:
    (root / "masks/train/c.png").write_bytes(b"not a png")
    return folder_cfg(root), str(root / "masks/train/c.png")


def _unreadable_image(root: Path) -> tuple[SegmentParams, str]:
    (root / "images/train/a.jpg").write_bytes(b"not a jpeg")
    return folder_cfg(root), str(root / "images/train/a.jpg")


def _duplicate_stem(root: Path) -> tuple[SegmentParams, str]:
    save_image(root / "images/train/a.png", 10, 14)
    return folder_cfg(root), str(root / "images/train/a.png")


def _no_classes_file(root: Path) -> tuple[SegmentParams, str]:
    (root / "classes.txt").unlink()
    return folder_cfg(root), str(root / "classes.txt")


def _empty_classes_file(root: Path) -> tuple[SegmentParams, str]:
    (root / "classes.txt").write_text("\n\n")
    return folder_cfg(root), str(root / "classes.txt")


def _ade_label_out_of_range(root: Path) -> tuple[SegmentParams, str]:
    ade = make_ade(root / "ade")
    mask = ade / "annotations/training/ADE_train_1.png"
    save_mask(mask, labels_block(8, 12, [0, 151]))  # stored 151: class 150 after the shift
    return SegmentParams(dataset="ade20k", root=str(ade)), str(mask)


BAD_INPUTS: list[Callable[[Path], tuple[SegmentParams, str]]] = [
    _no_root,
    _missing_root,
    _missing_scenes,
    _empty_split,
    _image_without_mask,
    _mask_without_image,
    _size_mismatch,
    _label_out_of_range,
    _rgb_mask,
    _unreadable_mask,
    _unreadable_image,
    _duplicate_stem,
    _no_classes_file,
    _empty_classes_file,
    _ade_label_out_of_range,
]


@pytest.mark.parametrize("spoil", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_one_line_naming_the_file(
    tmp_path: Path, spoil: Callable[[Path], tuple[SegmentParams, str]]
) -> None:
    root = make_folder(tmp_path / "set")
    cfg, named = spoil(root)
    with pytest.raises(UserError) as err:
        segmentation_split(cfg, "train", channels=3, scenes_dir=tmp_path / "no-scenes")
    message = str(err.value)
    assert named in message
    assert "\n" not in message


def test_label_error_says_which_values(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "set")
    _label_out_of_range(root)
    with pytest.raises(UserError, match=r"values 3, 254 \(valid: 0-2 and 255\)"):
        segmentation_split(folder_cfg(root), "train", channels=3)
