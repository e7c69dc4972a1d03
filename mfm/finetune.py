"""The finetune stage: the same supervised recipe from the MFM encoder or from scratch.

timm does the recipe: layer-wise lr decay through ``create_optimizer_v2``, drop path,
RandAugment, random erasing, Mixup/CutMix with soft-target cross-entropy, label smoothing.
The shared loop does the rest (schedule, AMP, checkpoints, resume, dvclive). Every epoch is
scored on the test split for the curves only: the last epoch's classifier and scores are the
result, since picking an epoch on the test set would flatter the number.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image

from mfm.config import INITS, FinetuneParams, Params
from mfm.data.augment import device_augment, normalizer
from mfm.data.datasets import image_dataset
from mfm.data.loaders import epoch_batches
from mfm.data.meta import DatasetMeta, load_meta
from mfm.device import resolve_device
from mfm.distributed import World, barrier, broadcast, setup, teardown, wrap
from mfm.engine import TrainLoop, stage_loop_config
from mfm.errors import UserError
from mfm.evaluation import evaluate
from mfm.imported_outputs import write_imported_outputs
from mfm.io import atomic_path
from mfm.models import (
    build_classifier,
    fixed_input_size,
    load_encoder_weights,
    place,
    save_classifier,
)
from mfm.optim import optimizer_and_schedule
from mfm.paths import FINETUNE_DIR, PREPARED_DIR, PRETRAIN_DIR
from mfm.weights_import import classifier_from, read_weights, report_of

log = logging.getLogger("mfm.finetune")


class RandAugmented(Dataset):
    """Applies timm's RandAugment to each uint8 (C, H, W) image of ``dataset`` (via PIL)."""

    def __init__(self, dataset: Dataset, config: str, channels: int, img_size: int) -> None:
        self.dataset = dataset
        fill = 124 if channels == 1 else (124, 116, 104)  # grey images need a scalar fill
        hparams = {"translate_const": int(img_size * 0.45), "img_mean": fill}
        self.transform = rand_augment_transform(config, hparams)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return pil_to_tensor(self.transform(to_pil_image(image))), label


def _mixer(cfg: FinetuneParams, num_classes: int) -> Mixup | None:
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


def mix_batch(
    mixer: Mixup | None, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup/CutMix pairs images, so an odd batch loses its last image instead of failing."""
    if mixer is None:
        return images, labels
    if images.shape[0] % 2:
        images, labels = images[:-1], labels[:-1]
    return mixer(images, labels)


def _criterion(cfg: FinetuneParams, mixing: bool) -> nn.Module:
    if mixing:
        return SoftTargetCrossEntropy()  # Mixup already smoothed the targets
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.label_smoothing)
    return nn.CrossEntropyLoss()


def write_predictions(
    path: Path, labels: np.ndarray, preds: np.ndarray, classes: list[str]
) -> None:
    """``actual,predicted`` class names per test image: DVC's confusion-matrix template."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(labels, preds, strict=True))


def training_config(params: Params, init: str) -> dict[str, Any]:
    """Settings that define the fine-tuned weights (a checkpoint resumes only if they match)."""
    return {
        "init": init,
        "data": params.data.model_dump(mode="json"),
        "model": params.model.model_dump(mode="json"),
        "finetune": params.finetune.model_dump(
            mode="json", exclude={"checkpoint_every", "log_every"}
        ),
        "seed": params.runtime.seed,
    }


def _train_dataset(prepared_dir: Path, meta: DatasetMeta, params: Params) -> Dataset:
    cfg, img_size = params.finetune, params.data.img_size
    dataset = image_dataset(
        prepared_dir, "train", img_size, True, cfg.crop_scale, jpeg_draft=params.runtime.jpeg_draft
    )
    native = min(meta.image_size) if meta.image_size else img_size
    if cfg.auto_augment and native >= cfg.min_augment_size:
        dataset = RandAugmented(dataset, cfg.auto_augment, meta.channels, native)
    return dataset


def run(
    params: Params,
    init: str = "mfm",
    prepared_dir: str | Path = PREPARED_DIR,
    pretrain_dir: str | Path = PRETRAIN_DIR,
    out_root: str | Path = FINETUNE_DIR,
) -> dict[str, Any]:
    """Fine-tune from ``init`` (mfm: the pretrained encoder; scratch: random init).

    Under ``torchrun`` every rank trains its share of each global batch; rank 0 evaluates
    and writes.
    """
    if init not in INITS:
        raise UserError(f"finetune --init {init!r}: choose one of {', '.join(INITS)}")
    torch.manual_seed(params.runtime.seed)
    weights = imported_weights(params.finetune, init)
    if weights:
        device = resolve_device(params.runtime.device)
        out_dir = Path(out_root) / init
        return _import(params, init, Path(weights), Path(prepared_dir), out_dir, device)
    here, device = setup(resolve_device(params.runtime.device))
    try:
        return _train(
            params,
            init,
            Path(prepared_dir),
            Path(pretrain_dir),
            Path(out_root) / init,
            here,
            device,
        )
    finally:
        teardown()


def _train(
    params: Params,
    init: str,
    prepared_dir: Path,
    pretrain_dir: Path,
    out_dir: Path,
    here: World,
    device: torch.device,
) -> dict[str, Any]:
    cfg, runtime, img_size = params.finetune, params.runtime, params.data.img_size
    meta = load_meta(prepared_dir, params.data.dataset)

    model, spec = build_classifier(
        params.model, img_size, meta.channels, meta.num_classes, cfg.drop_path_rate
    )
    if init == "mfm":
        report = load_encoder_weights(model, pretrain_dir / "encoder.pt")
        log.info("finetune: encoder loaded; new: %s; dropped: %s", *report.values())
    model = place(model, device)
    trained = wrap(model, here, device, params.runtime.compile)

    train_set = _train_dataset(prepared_dir, meta, params)
    test_set = image_dataset(
        prepared_dir, "test", img_size, False, jpeg_draft=params.runtime.jpeg_draft
    )
    layer_decay = cfg.layer_decay if fixed_input_size(model) else None
    optimizer, scheduler, lr, steps_per_epoch = optimizer_and_schedule(
        model, cfg, len(train_set), "finetune", layer_decay
    )
    augment = device_augment(meta, img_size, train=True, crop_scale=cfg.crop_scale).to(device)
    normalize = normalizer(meta).to(device)
    erase = None
    if cfg.reprob > 0 and img_size >= cfg.min_augment_size:
        erase = RandomErasing(cfg.reprob, mode="pixel", device=str(device))
    mixer = _mixer(cfg, meta.num_classes)
    criterion = _criterion(cfg, mixing=mixer is not None)
    info = classifier_info(meta, params, init)

    def step(batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        images = normalize(augment(images))
        if erase is not None:
            images = erase(images)
        images, targets = mix_batch(mixer, images, labels)
        return criterion(trained(images), targets), {}

    last: dict[str, Any] = {}

    def on_epoch_end(epoch: int) -> dict[str, float]:
        scores = None
        if here.is_main:  # one evaluation, shared with the other ranks
            scores, labels, preds = evaluate(
                model, test_set, meta, img_size, 256, device, runtime.workers
            )
            last.update(labels=labels, preds=preds)
        last["scores"] = scores = broadcast(scores, here)
        return {f"test_{name}": value for name, value in scores.items()}

    settings = stage_loop_config(
        cfg, runtime, device, out_dir, training_config(params, init), f"finetune[{init}]"
    )
    loop = TrainLoop(model, optimizer, scheduler, step, settings, here)
    log.info(
        "finetune[%s]: %s on %s, %d images, %d steps/epoch, lr %.2e, %d process(es)",
        init,
        params.model.name,
        meta.dataset,
        len(train_set),
        steps_per_epoch,
        lr,
        here.size,
    )
    batches = epoch_batches(train_set, cfg.batch_size, runtime.seed, runtime.workers, here)
    result = loop.fit(batches, on_epoch_end)
    if here.is_main:
        save_classifier(model, spec, info, out_dir / "classifier.pt")
        write_predictions(out_dir / "predictions.csv", last["labels"], last["preds"], meta.classes)
    barrier(here)
    return {
        "init": init,
        "epochs": cfg.epochs,
        **last["scores"],
        "train_loss": result.last_loss,
        "images_per_second": result.images_per_second,
        "resumed_from_epoch": result.resumed_from,
    }


def imported_weights(cfg: FinetuneParams, init: str) -> str | None:
    """The released classifier ``init`` uses instead of training, if params name one."""
    return cfg.weights if init == "mfm" else cfg.scratch_weights


def _import(
    params: Params, init: str, path: Path, prepared_dir: Path, out_dir: Path, device: torch.device
) -> dict[str, Any]:
    """The classifier at ``path`` instead of training, scored on the test split and written as
    the stage writes a trained one (robustness and export read it)."""
    meta = load_meta(prepared_dir, params.data.dataset)
    converted = read_weights(path)
    model, spec = classifier_from(converted, params, meta.channels, meta.num_classes, str(path))
    img_size, runtime = params.data.img_size, params.runtime
    test_set = image_dataset(prepared_dir, "test", img_size, False, jpeg_draft=runtime.jpeg_draft)
    model = place(model, device)
    scores, labels, preds = evaluate(model, test_set, meta, img_size, 256, device, runtime.workers)
    info = {**classifier_info(meta, params, init), "imported_from": str(path)}
    save_classifier(model, spec, info, out_dir / "classifier.pt")
    write_predictions(out_dir / "predictions.csv", labels, preds, meta.classes)
    tally = {f"test_{name}": value for name, value in scores.items()}
    write_imported_outputs(out_dir, model, training_config(params, init), tally)
    log.info("finetune[%s]: imported %s (%s) instead of training", init, path, converted.format)
    report = report_of(converted, path, len(model.state_dict()))
    return {"init": init, "epochs": 0, **scores, "imported": report.as_metrics()}


def classifier_info(meta: DatasetMeta, params: Params, init: str) -> dict[str, Any]:
    """What a user of the classifier needs besides the weights."""
    return {
        "classes": list(meta.classes),
        "mean": list(meta.mean),
        "std": list(meta.std),
        "img_size": params.data.img_size,
        "channels": meta.channels,
        "dataset": meta.dataset,
        "init": init,
    }
