"""The segment stage: UPerNet on the encoder's feature pyramid, from MFM or from scratch.

The dense-transfer half of the paper's evaluation. The same recipe runs for both inits (the
BEiT/MAE one: AdamW with layer-wise lr decay for ViTs, linear warmup then poly decay per
step, drop path, cross-entropy that skips the ignore index, joint random scale / crop / flip
of image and mask), through the shared training loop (checkpoints, resume after a kill,
SIGTERM, dvclive, torchrun). Every epoch is scored on the test split for the curves only;
the last epoch's model and scores are the result.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mfm.config import INITS, Params
from mfm.data.augment import normalizer
from mfm.data.loaders import epoch_batches
from mfm.data.meta import DatasetMeta, load_meta
from mfm.data.segmentation_augment import train_transform
from mfm.data.segmentation_sets import segmentation_split, uniform_size
from mfm.device import resolve_device
from mfm.distributed import World, barrier, broadcast, setup, teardown, wrap
from mfm.engine import TrainLoop, stage_loop_config
from mfm.errors import UserError
from mfm.figures import segmentation_overlay
from mfm.models import fixed_input_size, place
from mfm.optim import optimizer_and_schedule
from mfm.paths import PREPARED_DIR, PRETRAIN_DIR, SCENES_DIR, SEGMENT_DIR
from mfm.segment_params import IGNORE_INDEX
from mfm.segmentation_inference import SegmentationEvaluation, evaluate_segmentation
from mfm.segmentation_metrics import segmentation_scores
from mfm.segmentation_model import build_segmenter, load_pretrained_encoder, save_segmenter

log = logging.getLogger("mfm.segment")

EVAL_BATCH = 32  # test images per forward pass when they all have one size


def training_config(params: Params, init: str) -> dict[str, Any]:
    """Settings that define the trained model (a checkpoint resumes only if they match)."""
    return {
        "init": init,
        "data": params.data.model_dump(mode="json"),
        "model": params.model.model_dump(mode="json"),
        "segment": params.segment.model_dump(
            mode="json", exclude={"checkpoint_every", "log_every", "overlay_images"}
        ),
        "seed": params.runtime.seed,
    }


def run(
    params: Params,
    init: str = "mfm",
    prepared_dir: str | Path = PREPARED_DIR,
    pretrain_dir: str | Path = PRETRAIN_DIR,
    out_root: str | Path = SEGMENT_DIR,
    scenes_dir: str | Path = SCENES_DIR,
) -> dict[str, Any]:
    """Train and score a segmenter from ``init`` (mfm: the pretrained encoder; scratch:
    random init). Under ``torchrun`` every rank trains its share of each global batch;
    rank 0 evaluates and writes."""
    if init not in INITS:
        raise UserError(f"segment --init {init!r}: choose one of {', '.join(INITS)}")
    torch.manual_seed(params.runtime.seed)
    here, device = setup(resolve_device(params.runtime.device))
    try:
        return _train(
            params,
            init,
            Path(prepared_dir),
            Path(pretrain_dir),
            Path(out_root) / init,
            Path(scenes_dir),
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
    scenes_dir: Path,
    here: World,
    device: torch.device,
) -> dict[str, Any]:
    cfg, runtime = params.segment, params.runtime
    meta = load_meta(prepared_dir, params.data.dataset)  # the encoder's channels and statistics
    # Both splits are read and checked before anything trains or is written.
    train_set = segmentation_split(cfg, "train", meta.channels, scenes_dir, train_transform(cfg))
    test_set = segmentation_split(cfg, "test", meta.channels, scenes_dir)
    classes = train_set.classes

    model, spec = build_segmenter(params.model, cfg.crop_size, meta.channels, len(classes), cfg)
    if init == "mfm":
        report = load_pretrained_encoder(model, pretrain_dir / "encoder.pt")
        log.info("segment: encoder loaded; not loaded: %s", report)
    if here.distributed and device.type == "cuda":  # torch syncs BatchNorm on GPUs only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = place(model, device)
    trained = wrap(model, here, device, params.runtime.compile)

    layer_decay = cfg.layer_decay if fixed_input_size(model.backbone) else None
    optimizer, scheduler, lr, steps_per_epoch = optimizer_and_schedule(
        model, cfg, len(train_set), "segment", layer_decay
    )
    normalize = normalizer(meta).to(device)
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def step(batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        images, masks = (t.to(device, non_blocking=True) for t in batch)
        logits = trained(normalize(images.float() / 255))
        return criterion(logits.float(), masks.long()), {}

    eval_batch = EVAL_BATCH if uniform_size(test_set) else 1
    last: dict[str, Any] = {}

    def on_epoch_end(epoch: int) -> dict[str, float]:
        scores = None
        if here.is_main:  # one evaluation, shared with the other ranks
            keep = cfg.overlay_images if epoch + 1 == cfg.epochs else 0
            result = evaluate_segmentation(
                model, test_set, cfg, normalize, len(classes), device, eval_batch, keep
            )
            last["evaluation"] = result
            scores = segmentation_scores(result.confusion.numpy(), classes)
            scores["eval_images_per_second"] = result.images_per_second
        last["scores"] = scores = broadcast(scores, here)
        return {
            "test_miou": scores["miou"],
            "test_pixel_accuracy": scores["pixel_accuracy"],
            "test_mean_class_accuracy": scores["mean_class_accuracy"],
        }

    settings = stage_loop_config(
        cfg, runtime, device, out_dir, training_config(params, init), f"segment[{init}]"
    )
    loop = TrainLoop(model, optimizer, scheduler, step, settings, here)
    log.info(
        "segment[%s]: %s on %s, %d classes, %d images, %d steps/epoch, lr %.2e, %d process(es)",
        init,
        params.model.name,
        cfg.dataset,
        len(classes),
        len(train_set),
        steps_per_epoch,
        lr,
        here.size,
    )
    batches = epoch_batches(train_set, cfg.batch_size, runtime.seed, runtime.workers, here)
    result = loop.fit(batches, on_epoch_end)
    if here.is_main:
        info = segmenter_info(meta, params, init, classes)
        save_segmenter(model, spec, info, out_dir / "model.pt")
        _overlay(last, out_dir / "overlay.png", classes, init)
    barrier(here)
    return {
        "init": init,
        **last["scores"],
        "train_loss": result.last_loss,
        "images_per_second": result.images_per_second,
        "recipe": {
            "dataset": cfg.dataset,
            "classes": len(classes),
            "train_images": len(train_set),
            "test_images": len(test_set),
            "crop_size": cfg.crop_size,
            "epochs": cfg.epochs,
            "iterations": cfg.epochs * steps_per_epoch,
            "batch_size": cfg.batch_size,
            "lr": lr,
            "layer_decay": layer_decay,
            "eval_mode": cfg.eval_mode,
        },
        "resumed_from_epoch": result.resumed_from,
    }


def _overlay(
    last: dict[str, Any],
    path: Path,
    classes: list[str],
    init: str,
) -> None:
    """The last evaluation's first test images with ground truth and prediction overlaid (the
    last epoch always runs in this process: a finished run's checkpoint is never resumed)."""
    evaluation: SegmentationEvaluation = last["evaluation"]  # kept overlay_images samples
    miou = last["scores"]["miou"]
    segmentation_overlay(evaluation.samples, classes, path, f"segment[{init}]: mIoU {miou:.1f} %")


def segmenter_info(
    meta: DatasetMeta, params: Params, init: str, classes: list[str]
) -> dict[str, Any]:
    """What a user of the segmenter needs besides the weights."""
    return {
        "classes": list(classes),
        "ignore_index": IGNORE_INDEX,
        "mean": list(meta.mean),
        "std": list(meta.std),
        "channels": meta.channels,
        "crop_size": params.segment.crop_size,
        "eval_mode": params.segment.eval_mode,
        "dataset": params.segment.dataset,
        "init": init,
    }
