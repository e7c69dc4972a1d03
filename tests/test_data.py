"""The data layer: IDX parsing, meta, image files, the two Dataset kinds and their transforms,
device augmentation."""

from __future__ import annotations

import gzip
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfm.data.augment import device_augment, normalizer
from mfm.data.datasets import (
    EVAL_CROP_RATIO,
    ArrayImages,
    ManifestImages,
    image_dataset,
    image_transform,
)
from mfm.data.files import is_hidden, is_image_file
from mfm.data.meta import DatasetMeta, load_meta
from mfm.data.prepared import read_manifest
from mfm.data.sources.fashion_mnist import read_idx
from mfm.errors import UserError
from mfm.prepare import run

pytestmark = pytest.mark.usefixtures("offline_data")


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _meta(kind: str, channels: int = 1, size: tuple[int, int] | None = (28, 28)) -> DatasetMeta:
    return DatasetMeta(
        dataset="test",
        kind=kind,
        classes=["a", "b"],
        num_classes=2,
        channels=channels,
        image_size=size if kind == "arrays" else None,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        num_train=4,
        num_test=2,
        source="tests",
    )


@pytest.fixture
def digits_dir(tmp_path, make_params) -> Path:
    out = tmp_path / "digits"
    run(make_params(dataset="digits", train_limit=40, test_limit=10), out)
    return out


@pytest.fixture
def folder_dir(tmp_path, make_image_tree, make_params) -> Path:
    root = make_image_tree(tmp_path / "imgs")
    out = tmp_path / "folder"
    run(make_params(dataset="imagefolder", root=str(root)), out)
    return out


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    payload = _idx(array)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(gzip.compress(payload) if gz else payload)
    np.testing.assert_array_equal(read_idx(path, ndim=3), array)


def test_read_idx_rejects_wrong_magic(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(_idx(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(UserError, match="labels is not an IDX file of 3-d bytes"):
        read_idx(path, ndim=3)


def test_read_idx_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx(np.ones((3, 4, 4), dtype=np.uint8)))[:-10])
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz is unreadable or truncated"):
        read_idx(path, ndim=3)


def test_read_idx_extra_bytes_are_corrupt(tmp_path):
    path = tmp_path / "imgs"
    path.write_bytes(_idx(np.ones((2, 2, 2), dtype=np.uint8)) + b"\0")
    with pytest.raises(UserError, match="imgs is truncated or corrupt"):
        read_idx(path, ndim=3)


# --------------------------------------------------------------------------- meta


def test_load_meta_missing_says_run_prepare(tmp_path):
    with pytest.raises(UserError, match=r"meta.json not found; run `dvc repro prepare`"):
        load_meta(tmp_path)


def test_load_meta_damaged(tmp_path):
    (tmp_path / "meta.json").write_text('{"dataset": "x"')
    with pytest.raises(UserError, match="meta.json is damaged"):
        load_meta(tmp_path)


# --------------------------------------------------------------------------- datasets


def test_array_images_items(digits_dir):
    dataset = image_dataset(digits_dir, "train", img_size=32, train=True)
    assert isinstance(dataset, ArrayImages) and len(dataset) == 40
    image, label = dataset[3]
    assert image.shape == (1, 8, 8) and image.dtype == torch.uint8
    assert isinstance(label, int) and 0 <= label <= 9
    stored = np.load(digits_dir / "train_images.npy")[3]
    np.testing.assert_array_equal(image.numpy(), stored.transpose(2, 0, 1))
    clone = pickle.loads(pickle.dumps(dataset))  # what a spawned worker receives
    assert torch.equal(clone[3][0], image)
    assert len(image_dataset(digits_dir, "test", img_size=32, train=False)) == 10


@pytest.mark.parametrize("train", [True, False])
def test_manifest_images_items(folder_dir, train):
    dataset = image_dataset(folder_dir, "train", img_size=16, train=train)
    assert isinstance(dataset, ManifestImages) and len(dataset) == 5
    for index in range(len(dataset)):  # RGB, grey and RGBA files all come out RGB
        image, label = dataset[index]
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
        assert label in (0, 1)


def test_image_dataset_plans_drafts_for_manifests_only(folder_dir, digits_dir):
    for train in (True, False):
        dataset = image_dataset(folder_dir, "train", 16, train, jpeg_draft=True)
        assert isinstance(dataset, ManifestImages) and dataset.draft is not None
        assert dataset[0][0].shape == (3, 16, 16)
        assert image_dataset(folder_dir, "train", 16, train).draft is None
    arrays = image_dataset(digits_dir, "train", 32, True, jpeg_draft=True)
    assert not isinstance(arrays, ManifestImages)


def test_manifest_images_grey(folder_dir):
    paths, labels = read_manifest(folder_dir / "test.csv")
    dataset = ManifestImages(paths, labels, image_transform(12, train=False), channels=1)
    assert dataset[0][0].shape == (1, 12, 12)


def test_manifest_corrupt_image_names_the_file(folder_dir, tmp_path):
    bad = tmp_path / "imgs" / "train" / "cat" / "y.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dataset = image_dataset(folder_dir, "train", img_size=16, train=False)
    with pytest.raises(UserError, match=r"cannot read image .*cat/y.png .*remove or replace it"):
        dataset[1]


@pytest.mark.parametrize(
    ("name", "image"),
    [
        ("a.png", True),
        ("b.JPEG", True),
        ("dir/c.webp", True),
        ("notes.txt", False),
        (".DS_Store", False),
        ("._a.jpg", False),  # a macOS resource fork, not a JPEG
        (".ipynb_checkpoints", False),
        ("dir/.hidden.png", False),
    ],
)
def test_image_files_and_hidden_names(name, image):
    assert is_image_file(name) is image
    assert is_hidden(name) is Path(name).name.startswith(".")


def _photo(size: tuple[int, int], mode: str) -> Image.Image:
    channels = (3,) if mode == "RGB" else ()
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], *channels), np.uint8)
    return Image.fromarray(pixels, mode=mode)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_eval_transform_is_bicubic_resize_then_centre_crop(mode):
    from torchvision.transforms import v2

    image = _photo((50, 37), mode)
    bicubic = v2.InterpolationMode.BICUBIC
    expected = v2.Compose(
        [v2.Resize(int(24 / EVAL_CROP_RATIO), interpolation=bicubic), v2.CenterCrop(24)]
    )(image)
    got = image_transform(24, train=False)(image)
    assert got.dtype == torch.uint8 and got.shape == (len(mode), 24, 24)
    assert torch.equal(got, v2.functional.pil_to_tensor(expected))


def test_train_transform_is_a_bicubic_random_resized_crop_without_flip():
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision.transforms import v2

    transform = image_transform(16, train=True, crop_scale=(0.3, 0.9))
    crop = transform.transforms[0]
    assert len(transform.transforms) == 2  # the crop, then uint8 pil_to_tensor: nothing else
    assert isinstance(crop, RandomResizedCropAndInterpolation)
    assert (crop.size, crop.scale) == ((16, 16), (0.3, 0.9))
    assert crop.interpolation == v2.InterpolationMode.BICUBIC
    image = _photo((41, 29), "RGB")
    for seed in range(5):
        random.seed(seed)
        top, left, height, width = crop.get_params(image, crop.scale, crop.ratio)
        expected = v2.functional.resized_crop(
            image, top, left, height, width, [16, 16], v2.InterpolationMode.BICUBIC
        )
        random.seed(seed)
        assert torch.equal(transform(image), v2.functional.pil_to_tensor(expected))


# --------------------------------------------------------------------------- device side


@pytest.mark.parametrize("train", [True, False])
def test_device_augment_arrays(train):
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    out = device_augment(_meta("arrays"), img_size=32, train=train)(batch)
    assert out.shape == (6, 1, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_device_augment_arrays_eval_is_deterministic_and_exact_at_native_size():
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    augment = device_augment(_meta("arrays", channels=3, size=(8, 8)), img_size=8, train=False)
    assert torch.equal(augment(batch), batch.float() / 255)


def test_device_augment_manifest():
    batch = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    meta = _meta("manifest", channels=3)
    evaluated = device_augment(meta, img_size=16, train=False)(batch)
    assert torch.equal(evaluated, batch.float() / 255)
    flipped = device_augment(meta, img_size=16, train=True)(batch)
    assert flipped.shape == (4, 3, 16, 16)
    for got, image in zip(flipped, batch.float() / 255, strict=True):
        assert torch.equal(got, image) or torch.equal(got, image.flip(-1))


def test_normalizer_uses_meta_stats():
    meta = _meta("arrays", channels=3)
    out = normalizer(meta)(torch.full((2, 3, 4, 4), 0.75))
    assert torch.allclose(out, torch.ones_like(out))


def test_load_meta_refuses_data_prepared_for_another_dataset(tmp_path: Path) -> None:
    from mfm.config import Params

    params = Params.model_validate({"data": {"dataset": "digits"}})
    run(params, tmp_path / "prepared")
    assert load_meta(tmp_path / "prepared", "digits").dataset == "digits"
    with pytest.raises(UserError, match="holds 'digits' but data.dataset is 'fashion_mnist'"):
        load_meta(tmp_path / "prepared", "fashion_mnist")
