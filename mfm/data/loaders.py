"""Which images form each batch, and in which order: the loaders every stage iterates.

A training epoch is a function of ``seed + epoch`` (the order) and of (seed, epoch, index)
(each sample's worker-side random draws) only. So a run resumed mid-epoch, a run with another
``runtime.workers`` and N torchrun processes together all see the batches of one
uninterrupted single-process run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mfm.data.datasets import ArrayImages
from mfm.data.workers import Workers, resolve_workers
from mfm.distributed import World, per_rank_batch
from mfm.seeding import sample_seed, seeded

PREFETCH_BATCHES = 4  # per worker (torch's default is 2)


class GlobalBatchShard(Sampler[int]):
    """This rank's slice of each global batch of a seeded shuffle.

    Step k of a run with N ranks sees exactly the images step k of a one-process run sees
    (same ``seed + epoch`` permutation, same global batches), split into N contiguous
    parts, so N processes and one process train on the same data in the same order.
    """

    def __init__(
        self,
        length: int,
        global_batch: int,
        here: World,
        seed: int,
        shuffle: bool = True,
        start_batch: int = 0,
        tagged: bool = False,
    ) -> None:
        self.length, self.global_batch, self.here = length, global_batch, here
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.local = global_batch // here.size
        self.start_batch = start_batch  # resume inside an epoch: skip the batches done
        self.tagged = tagged  # yield (epoch, index): persistent workers learn the epoch so

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(0, self.length // self.global_batch - self.start_batch) * self.local

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        start = self.here.rank * self.local
        begin = self.start_batch * self.global_batch
        for first in range(begin, self.length - self.global_batch + 1, self.global_batch):
            part = order[first + start : first + start + self.local]
            yield from ((self.epoch, index) for index in part) if self.tagged else part


class PerSampleSeeded(Dataset):
    """``dataset[index]`` under the seed of (seed, epoch, index), with the caller's torch,
    numpy and Python RNG streams restored afterwards.

    A sample's random crop then does not depend on the worker it lands on, the number of
    workers, or the batch a resumed loader starts from; and in the main process
    (``workers=0``) the training loop's own streams move exactly as without the wrapper.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | tuple[int, int]) -> Any:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        with seeded(sample_seed(self.seed, epoch, index)):
            return self.dataset[index]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    workers: Workers,
    drop_last: bool,
    epoch: int = 0,
) -> DataLoader:
    """A DataLoader whose order follows ``seed + epoch`` only (evaluation and feature passes,
    whose transforms draw nothing).

    Rebuilding it for a given epoch replays that epoch's order exactly.
    """
    return _seeded_loader(
        dataset,
        seed,
        epoch,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        drop_last=drop_last,
        persistent_workers=False,
    )


def _seeded_loader(dataset: Dataset, seed: int, epoch: int, **options: Any) -> DataLoader:
    """A DataLoader whose own generator (the shuffle, the workers' base seeds) starts from
    ``seed + epoch``: drawing them from it keeps the global torch stream (device-side
    augmentation) where the training loop left it."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    options["num_workers"] = resolve_workers(options["num_workers"], dataset)
    if options["num_workers"]:  # keep a GPU fed across the main process's slower steps
        options["prefetch_factor"] = PREFETCH_BATCHES
    return DataLoader(dataset, generator=generator, pin_memory=torch.cuda.is_available(), **options)


def training_loader(
    dataset: Dataset,
    global_batch: int,
    seed: int,
    workers: Workers,
    epoch: int,
    here: World | None = None,
    start_batch: int = 0,
    collate: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """This process's share of each shuffled global batch of ``epoch`` (full batches only),
    from global batch ``start_batch`` on, each sample drawn under its own seed.

    Prepared arrays are served as stored (they draw nothing), so they skip the per-sample
    RNG bookkeeping, some 75 us an image, which would slow a GPU run on CIFAR noticeably.
    """
    here = here or World()
    local = per_rank_batch(global_batch, here, "batch_size")
    sampler = GlobalBatchShard(len(dataset), global_batch, here, seed, True, start_batch)
    sampler.set_epoch(epoch)
    if not isinstance(dataset, ArrayImages):
        dataset = PerSampleSeeded(dataset, seed, epoch)
    return _seeded_loader(
        dataset,
        seed,
        epoch,
        batch_size=local,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        collate_fn=collate,
    )


def epoch_batches(
    dataset: Dataset,
    global_batch: int,
    seed: int,
    workers: Workers,
    here: World,
    collate: Callable[[list[Any]], Any] | None = None,
) -> Callable[[int, int], DataLoader]:
    """The ``epoch -> first global batch -> batches`` feed the training loop asks for.

    With worker processes, one DataLoader serves every epoch and keeps its workers (they
    would otherwise start again, importing torch, every epoch): its sampler tells them the
    epoch with each index, so each sample is drawn exactly as a fresh loader draws it.
    """
    if resolve_workers(workers, dataset) == 0 or isinstance(dataset, ArrayImages):

        def batches(epoch: int, start_batch: int) -> DataLoader:
            return training_loader(
                dataset, global_batch, seed, workers, epoch, here, start_batch, collate
            )

        return batches
    sampler = GlobalBatchShard(len(dataset), global_batch, here, seed, tagged=True)
    loader = _seeded_loader(
        PerSampleSeeded(dataset, seed, 0),
        seed,
        0,
        batch_size=per_rank_batch(global_batch, here, "batch_size"),
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        collate_fn=collate,
        persistent_workers=True,
    )

    def persistent(epoch: int, start_batch: int) -> DataLoader:
        sampler.set_epoch(epoch)
        sampler.start_batch = start_batch
        return loader

    return persistent
