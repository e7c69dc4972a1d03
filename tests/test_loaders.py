"""Loaders: the order follows the seed and epoch, and an image folder's random crops follow
(seed, epoch, index) only, so worker counts and mid-epoch resumes replay the same batches."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from mfm.data.datasets import image_dataset
from mfm.data.loaders import PerSampleSeeded, epoch_batches, make_loader, training_loader
from mfm.distributed import World
from mfm.engine import TrainLoop
from mfm.errors import Interrupted
from mfm.optim import build_optimizer, build_scheduler
from mfm.prepare import run
from mfm.seeding import rng_state
from tests.conftest import cpu_loop_config, save_image

IMAGES, BATCH, EPOCHS, SIZE = 40, 8, 2, 8
STEPS = IMAGES // BATCH


@pytest.fixture(scope="module")
def folder_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 training PNGs of different sizes in two classes, prepared as a manifest."""
    from mfm.config import Params

    root = tmp_path_factory.mktemp("imgs")
    for i in range(IMAGES):
        save_image(root / "train" / f"c{i % 2}" / f"{i:02}.png", (20 + i, 14 + 2 * i), "RGB", i)
    for c in range(2):
        save_image(root / "val" / f"c{c}" / "v.png", (24, 24), "RGB", 100 + c)
    out = tmp_path_factory.mktemp("prepared")
    params = {"data": {"dataset": "imagefolder", "root": str(root), "download": False}}
    run(Params.model_validate(params), out)
    return out


@pytest.fixture(scope="module")
def crops(folder_prepared: Path) -> Dataset:
    return image_dataset(folder_prepared, "train", SIZE, train=True, crop_scale=(0.2, 1.0))


def _images(loader: torch.utils.data.DataLoader) -> list[torch.Tensor]:
    return [images for images, _ in loader]


# --------------------------------------------------------------------------- order


def _order(seed: int, epoch: int, workers: int = 0) -> list[int]:
    dataset = TensorDataset(torch.arange(40))
    loader = make_loader(
        dataset, 8, shuffle=True, seed=seed, workers=workers, drop_last=False, epoch=epoch
    )
    return torch.cat([batch for (batch,) in loader]).tolist()


def test_make_loader_order_follows_seed_and_epoch() -> None:
    assert _order(0, 0) == _order(0, 0)
    assert _order(0, 3) == _order(0, 3)
    assert _order(0, 0) != _order(0, 1)
    assert sorted(_order(0, 1)) == list(range(40))


def test_make_loader_drop_last_and_no_shuffle() -> None:
    dataset = TensorDataset(torch.arange(10))
    loader = make_loader(dataset, 4, shuffle=False, seed=0, workers=0, drop_last=True)
    assert [batch.tolist() for (batch,) in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_make_loader_workers_match_in_process(tmp_path: Path, make_params) -> None:
    run(make_params(dataset="digits", train_limit=40, test_limit=10), tmp_path)
    dataset = image_dataset(tmp_path, "train", img_size=8, train=True)
    batches = [
        list(make_loader(dataset, 16, shuffle=True, seed=5, workers=w, drop_last=False, epoch=2))
        for w in (0, 2)
    ]
    for (x0, y0), (x2, y2) in zip(*batches, strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


# --------------------------------------------------------------------------- per-sample seeds


def test_crops_follow_seed_epoch_and_index(crops: Dataset) -> None:
    """The same (seed, epoch, index) gives the same crop; another epoch another crop."""
    first = PerSampleSeeded(crops, seed=0, epoch=1)[3][0]
    assert torch.equal(first, PerSampleSeeded(crops, seed=0, epoch=1)[3][0])
    assert not torch.equal(first, PerSampleSeeded(crops, seed=0, epoch=2)[3][0])
    assert not torch.equal(first, PerSampleSeeded(crops, seed=1, epoch=1)[3][0])


def test_batches_do_not_depend_on_the_worker_count_or_the_start_batch(crops: Dataset) -> None:
    epoch = 1
    alone = _images(training_loader(crops, BATCH, seed=0, workers=0, epoch=epoch))
    pooled = _images(training_loader(crops, BATCH, seed=0, workers=2, epoch=epoch))
    resumed = _images(training_loader(crops, BATCH, 0, workers=2, epoch=epoch, start_batch=3))
    assert len(alone) == STEPS and alone[0].shape == (BATCH, 3, SIZE, SIZE)
    for a, b in zip(alone, pooled, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(alone[3:], resumed, strict=True):
        assert torch.equal(a, b)


def test_persistent_workers_serve_every_epoch_as_fresh_loaders_do(crops: Dataset) -> None:
    feed = epoch_batches(crops, BATCH, seed=0, workers=2, here=World())
    for epoch, start in ((0, 0), (1, 0), (2, 3)):
        loader = feed(epoch, start)
        assert loader is feed(epoch, start) and loader.persistent_workers
        fresh = _images(training_loader(crops, BATCH, 0, workers=0, epoch=epoch, start_batch=start))
        assert len(loader) == len(fresh) == STEPS - start
        for a, b in zip(fresh, _images(loader), strict=True):
            assert torch.equal(a, b)
    per_epoch = epoch_batches(crops, BATCH, seed=0, workers=0, here=World())
    assert per_epoch(0, 0) is not per_epoch(0, 0)  # in-process: a loader per epoch


def test_loading_leaves_the_main_process_streams_alone(crops: Dataset, tmp_path: Path) -> None:
    """workers=0: the crops draw under their own seeds, and the training loop's torch, numpy
    and Python streams (device augmentation, masks, Mixup) are where they were; arrays are
    served exactly as stored."""
    from mfm.config import Params

    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    before = rng_state()
    _images(training_loader(crops, BATCH, seed=0, workers=0, epoch=0))
    run(Params.model_validate({"data": {"dataset": "digits", "train_limit": 16}}), tmp_path)
    arrays = image_dataset(tmp_path, "train", 8, train=True)
    loaded = torch.cat(_images(training_loader(arrays, BATCH, seed=0, workers=0, epoch=0)))
    after = rng_state()
    assert torch.equal(after["torch"], before["torch"]) and after["python"] == before["python"]
    assert torch.equal(after["numpy"][1], before["numpy"][1])
    stored = torch.stack([arrays[i][0] for i in range(len(arrays))])
    assert sorted(map(tuple, loaded.flatten(1).tolist())) == sorted(
        map(tuple, stored.flatten(1).tolist())
    )


# --------------------------------------------------------------------------- exact resume


def _fit(
    out: Path, crops: Dataset, seen: list[torch.Tensor], stop_at: int | None = None
) -> list[torch.Tensor]:
    """Train a linear model on the crops with 2 workers, appending each batch to ``seen``;
    returns the final weights. ``stop_at``: after that step, ask the loop to stop, as
    SIGTERM's handler does."""
    torch.manual_seed(0)
    model = nn.Linear(3 * SIZE * SIZE, 1)
    optimizer = build_optimizer(model, lr=0.05, weight_decay=0.05, betas=(0.9, 0.95))
    scheduler = build_scheduler(optimizer, EPOCHS * STEPS, 1, min_lr=1e-4)

    def step(batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch
        seen.append(images.clone())
        if len(seen) == stop_at:
            loop.stop_requested = True
        prediction = model(images.flatten(1).float() / 255).squeeze(1)
        return nn.functional.mse_loss(prediction, labels.float()), {}

    cfg = cpu_loop_config(out, EPOCHS)
    loop = TrainLoop(model, optimizer, scheduler, step, cfg)
    loop.fit(lambda epoch, start: training_loader(crops, BATCH, 0, 2, epoch, None, start))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("stop_at", [2, STEPS + 3])  # mid-epoch, in the first and second epoch
def test_a_resumed_run_with_workers_replays_the_uninterrupted_run(
    crops: Dataset, tmp_path: Path, stop_at: int
) -> None:
    straight: list[torch.Tensor] = []
    weights = _fit(tmp_path / "straight", crops, straight)
    assert len(straight) == EPOCHS * STEPS

    stopped: list[torch.Tensor] = []
    with pytest.raises(Interrupted):
        _fit(tmp_path / "stopped", crops, stopped, stop_at=stop_at)
    state = torch.load(tmp_path / "stopped/checkpoint.pt", weights_only=True)
    assert state["partial"]["steps"] == stop_at % STEPS  # stopped inside an epoch

    resumed = _fit(tmp_path / "stopped", crops, stopped)  # appends the rest
    assert len(stopped) == len(straight)
    for a, b in zip(stopped, straight, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(resumed, weights, strict=True):
        assert torch.equal(a, b)
