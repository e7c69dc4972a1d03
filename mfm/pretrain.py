"""The pretrain stage: MFM (or a restoration or spatial-masking pretext) on the training images.

A step: batched crop + flip on the device, corrupt (frequency mask, SR, blur, noise or hidden
patches), normalise, predict the clean image, and score the prediction in frequency space (or,
for the SimMIM baseline, on the hidden pixels). Writes the encoder weights, a resumable
checkpoint, dvclive curves and a reconstruction figure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mfm.config import Params
from mfm.data.augment import device_augment, normalizer
from mfm.data.datasets import image_dataset
from mfm.data.device_decode import batch_collate, batch_images, decodes_on_device
from mfm.data.loaders import epoch_batches
from mfm.data.meta import load_meta
from mfm.device import resolve_device
from mfm.distributed import World, setup, teardown, wrap
from mfm.engine import TrainLoop, stage_loop_config
from mfm.figures import reconstruction_figure
from mfm.flops import count_flops, training_utilisation
from mfm.frequency import build_corruption, filter_spectrum
from mfm.imported_outputs import write_imported_outputs
from mfm.losses import build_loss
from mfm.models import (
    MFMModel,
    build_encoder,
    encoder_patch_size,
    place,
    pretext_model,
    save_encoder,
)
from mfm.optim import optimizer_and_schedule
from mfm.paths import PREPARED_DIR, PRETRAIN_DIR
from mfm.spatial_mask import check_geometry
from mfm.timm_folder import write_timm_folder
from mfm.weights_import import encoder_from, read_weights, report_of

log = logging.getLogger("mfm.pretrain")

FIGURE_IMAGES = 4
TIMING_KEYS = ("images_per_second", "train_seconds")


def training_config(params: Params) -> dict[str, Any]:
    """The settings that define the trained weights (a checkpoint resumes only if they match)."""
    return {
        "data": params.data.model_dump(mode="json"),
        "model": params.model.model_dump(mode="json"),
        "pretrain": params.pretrain.model_dump(
            mode="json", exclude={"checkpoint_every", "log_every"}
        ),
        "seed": params.runtime.seed,
    }


def run(
    params: Params, prepared_dir: str | Path = PREPARED_DIR, out_dir: str | Path = PRETRAIN_DIR
) -> dict[str, Any]:
    """Pretrain an encoder; returns the numbers stored in ``metrics/pretrain.json``.

    Under ``torchrun`` every rank trains its share of each global batch; rank 0 writes.
    """
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    torch.manual_seed(params.runtime.seed)
    if params.pretrain.weights:
        return _import(params, prepared_dir, out_dir, resolve_device(params.runtime.device))
    here, device = setup(resolve_device(params.runtime.device))
    try:
        return _train(params, prepared_dir, out_dir, here, device)
    finally:
        teardown()


def _train(
    params: Params, prepared_dir: Path, out_dir: Path, here: World, device: torch.device
) -> dict[str, Any]:
    cfg, runtime = params.pretrain, params.runtime
    meta = load_meta(prepared_dir, params.data.dataset)
    img_size = params.data.img_size

    encoder = build_encoder(params.model, img_size, meta.channels)
    spatial = cfg.pretext == "mim"  # the model must know which patches are hidden
    if spatial:
        check_geometry(cfg.mim, img_size, encoder_patch_size(encoder))
    model = place(pretext_model(encoder, meta.channels, cfg.pretext), device)
    trained = wrap(model, here, device, params.runtime.compile)
    corruption = build_corruption(cfg).to(device)
    loss_fn = build_loss(cfg)
    augment = device_augment(meta, img_size, train=True, crop_scale=cfg.crop_scale).to(device)
    normalize = normalizer(meta).to(device)

    on_device = decodes_on_device(runtime.loader, meta.kind)
    train_set = image_dataset(
        prepared_dir, "train", img_size, True, cfg.crop_scale, on_device, runtime.jpeg_draft
    )
    optimizer, scheduler, lr, steps_per_epoch = optimizer_and_schedule(
        model, cfg, len(train_set), "pretrain"
    )

    def step(
        batch: list[torch.Tensor], net: torch.nn.Module = trained
    ) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch_images(batch, on_device, img_size, meta.channels, device)
        clean = augment(images)
        corrupted, mask = corruption.corrupt(clean)
        inputs = (normalize(corrupted), mask) if spatial else (normalize(corrupted),)
        prediction = net(*inputs)
        return loss_fn(prediction, normalize(clean), mask), {}

    settings = stage_loop_config(
        cfg, runtime, device, out_dir, training_config(params), f"pretrain[{cfg.pretext}]"
    )
    loop = TrainLoop(model, optimizer, scheduler, step, settings, here)
    log.info(
        "pretrain: %s on %s, %d images, %d steps/epoch, lr %.2e, device %s, %d process(es)",
        params.model.name,
        meta.dataset,
        len(train_set),
        steps_per_epoch,
        lr,
        device,
        here.size,
    )
    started = time.perf_counter()
    collate = batch_collate(on_device)
    batches = epoch_batches(train_set, cfg.batch_size, runtime.seed, runtime.workers, here, collate)
    result = loop.fit(batches)
    if here.is_main:
        save_encoder(encoder, out_dir / "encoder.pt")
        save_reconstructions(model, corruption, meta, params, prepared_dir, out_dir, device)
    metrics = {
        "pretext": cfg.pretext,
        "epochs": cfg.epochs,
        "final_loss": result.last_loss,
        "images_per_second": result.images_per_second,
        "train_seconds": time.perf_counter() - started,
        "resumed_from_epoch": result.resumed_from,
        "encoder_parameters": sum(p.numel() for p in encoder.parameters()),
        "lr": lr,
        "processes": here.size,
    }
    if device.type == "cuda":  # MFU on GPUs (FLOPs of one step of the plain model)
        batch = next(iter(batches(0, 0)))
        flops = step_flops(lambda: step(batch, model)[0], model, device)
        metrics |= training_utilisation(
            flops, result.images_per_second, cfg.batch_size, device, runtime.amp
        )
    if here.is_main:
        write_timm_folder(encoder, out_dir / "timm", model_card(params, meta, metrics))
    return metrics


def step_flops(
    loss: Callable[[], torch.Tensor], model: torch.nn.Module, device: torch.device
) -> int:
    """FLOPs of one forward and backward pass, counted without touching the run: the random
    streams are restored and the gradients dropped afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        flops = count_flops(lambda: loss().backward())
    model.zero_grad(set_to_none=True)
    return flops


def _import(
    params: Params, prepared_dir: Path, out_dir: Path, device: torch.device
) -> dict[str, Any]:
    """The encoder from ``pretrain.weights`` instead of training: the same outputs, with the
    shipped pixel head (the authors' MFM files have one) drawing the reconstructions."""
    meta = load_meta(prepared_dir, params.data.dataset)
    path = Path(params.pretrain.weights)
    converted = read_weights(path)
    encoder = encoder_from(converted, params, meta.channels, str(path))
    model = pretext_model(encoder, meta.channels, params.pretrain.pretext)
    has_head = _load_pixel_head(model, converted.pixel_head)
    save_encoder(encoder, out_dir / "encoder.pt", converted.pixel_head)
    corruption = build_corruption(params.pretrain).to(device)
    save_reconstructions(
        model.to(device), corruption, meta, params, prepared_dir, out_dir, device, has_head
    )
    report = report_of(converted, path, len(encoder.backbone.state_dict()))
    metrics = {
        "pretext": params.pretrain.pretext,
        "imported": report.as_metrics(),
        "pixel_head": has_head,
        "encoder_parameters": sum(p.numel() for p in encoder.parameters()),
    }
    write_imported_outputs(out_dir, model, training_config(params), {"imported": 1.0})
    write_timm_folder(encoder, out_dir / "timm", model_card(params, meta, metrics))
    log.info("pretrain: imported %s (%s) instead of training", path, converted.format)
    return metrics


def _load_pixel_head(model: MFMModel, head: dict[str, torch.Tensor] | None) -> bool:
    """Put a shipped pixel head in place when it fits this model (same stride and channels)."""
    own = model.head.state_dict()
    if not head or set(head) != set(own):
        return False
    if any(head[key].shape != own[key].shape for key in own):
        return False
    model.head.load_state_dict(head)
    return True


def model_card(params: Params, meta: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """What the timm folder's README says about these weights (no timings, so the same run
    gives the same folder)."""
    recipe = params.pretrain.model_dump(mode="json", exclude={"checkpoint_every", "log_every"})
    results = {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
    return {
        "title": f"{params.model.name}: {params.pretrain.pretext} pretraining on {meta.dataset}",
        "mean": list(meta.mean),
        "std": list(meta.std),
        "img_size": params.data.img_size,
        "pretext": params.pretrain.pretext,
        "dataset": meta.dataset,
        "recipe": recipe,
        "metrics": results,
    }


@torch.no_grad()
def save_reconstructions(
    model: MFMModel,
    corruption: torch.nn.Module,
    meta: Any,
    params: Params,
    prepared_dir: Path,
    out_dir: Path,
    device: torch.device,
    predict: bool = True,
) -> None:
    """Corrupt a few test images with a fixed seed and draw what the model predicts, completed
    with what the input kept (the loss never scores that part); ``predict`` False draws the
    inputs only (a model without a trained head)."""
    test_set = image_dataset(
        prepared_dir, "test", params.data.img_size, False, jpeg_draft=params.runtime.jpeg_draft
    )
    count = min(FIGURE_IMAGES, len(test_set))
    images = torch.stack([test_set[i][0] for i in range(count)]).to(device)
    clean = device_augment(meta, params.data.img_size, train=False).to(device)(images)
    torch.manual_seed(params.runtime.seed)
    corrupted, mask = corruption.corrupt(clean)
    if mask is None:
        mask = torch.ones_like(clean[:, :1])
    spatial = params.pretrain.pretext == "mim"
    normalize = normalizer(meta).to(device)
    model.eval()
    inputs = (normalize(corrupted), mask) if spatial else (normalize(corrupted),)
    prediction = model(*inputs)
    mean = torch.tensor(meta.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta.std, device=device).view(1, -1, 1, 1)
    predicted = prediction.float() * std + mean
    if spatial:  # predicted pixels in the hidden patches, the input's everywhere else
        completed = predicted * (1 - mask) + clean * mask
    else:  # predicted bins where the spectrum was masked, the input's bins elsewhere
        completed = filter_spectrum(predicted, 1 - mask) + filter_spectrum(clean, mask)
    reconstruction_figure(
        clean,
        mask,
        corrupted,
        completed if predict else None,
        out_dir / "reconstruction.png",
        title=f"{params.pretrain.pretext} pretext on {meta.dataset}",
        mask_title="kept pixels" if spatial else "kept frequencies",
    )
