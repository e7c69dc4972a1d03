"""Pretraining throughput on synthetic images: img/s, what the frequency work costs, and the floor.

The same step the pretrain stage runs (device-side crop and flip, corruption, forward,
frequency loss, backward, AdamW), timed after a warm-up, next to the corruption alone and
the loss (forward and backward) alone; their share of the step is MFM's overhead over plain
pixel regression. Next to it: the same encoder in a plain supervised step (the floor MFM
should cost), the batched corruption against the per-image loop the authors' data loader
runs, and optionally the model FLOPs utilisation. Given an image folder (``data``), also
the pretrain stage's real input path on it: its loader alone, and the step fed from it.

``run`` returns one flat dict (printed as JSON by ``python -m mfm bench``). Times are means
over ``timed_steps`` calls after ``warmup_steps`` untimed ones, taken by ``mfm.timing``
(``torch.utils.benchmark``, which synchronises CUDA); a key that was not measured is
``null``. FLOP counting, the GPUs' peak table and the MFU are in ``mfm.flops``.

What ran
    model, pretext, img_size, channels, batch_size, timed_steps,
    warmup_steps (untimed calls before each timing: the warm-up asked for, but at least the
    max(2, timed_steps // 100) that torch's Timer always makes)
    device ("cuda", "cpu", ...), device_name (GPU name, or the CPU model from /proc/cpuinfo),
    threads (torch CPU threads), torch (version)
Options as requested and as applied
    amp_requested, amp (bf16 autocast really on: CUDA only), amp_note (why not, or null)
    channels_last (applied to model and input: CNN encoders only), channels_last_note
    compile (torch.compile applied to both models), compile_seconds (the first compiled MFM
    step, compilation included; warm-up and timed steps come after it), compile_error (the
    error, one line, when compiling failed and the eager model was timed instead)
MFM pretraining step
    images_per_second, step_ms
    corruption_ms (batched corruption on the device), loss_ms (frequency loss fwd + bwd),
    frequency_share ((corruption_ms + loss_ms) / step_ms)
The floor: the same encoder as a supervised classifier (build_classifier: mean-pooled
features, linear head of ``supervised_classes`` outputs), cross-entropy on fixed random
labels, forward + backward + AdamW, same batch, crop/flip, normalisation and options
    supervised_classes, supervised_images_per_second, supervised_step_ms,
    mfm_over_supervised (step_ms / supervised_step_ms)
Batched corruption vs the authors' per-image loop (mfm pretext only, else null)
    corruption_loop_ms (per_image_frequency_mask over the batch, on the CPU),
    corruption_loop_over_batched (corruption_loop_ms / corruption_ms)
Model FLOPs utilisation (with ``mfu=True``, else null)
    step_gflop (FLOPs of one MFM step, forward + backward, as FlopCounterMode counts them:
    matmuls, convolutions, attention; FFTs and element-wise work are not counted),
    achieved_tflops (step_gflop / step time), peak_tflops (the device's dense peak for
    peak_precision: "bf16" under AMP, "tf32" or "fp32" without, "given" for --peak-tflops),
    mfu (achieved / peak; null on a CPU or an unknown GPU unless a peak is given),
    supervised_step_gflop, supervised_achieved_tflops, supervised_mfu, mfu_note
The input path on an image folder (``data``, ``bench --data DIR``; all null without it): the
pretrain stage's Dataset and DataLoader on DIR's training images (``mfm.bench_data``), a fresh
loader for each timing, with the ``workers`` processes
    data (the folder), data_images (its training images), data_repeats (how often the file
    list is repeated so that a timing stays inside one epoch; 1 for a large folder),
    loader (runtime.loader: "pil", the workers decode and crop; "device", the workers read
    the files and draw the crop boxes, and the step decodes and crops on the device),
    jpeg_draft (runtime.jpeg_draft on the "pil" path: JPEGs decoded at a reduced scale where
    the crop allows; false for "device"),
    workers (DataLoader worker processes, ``auto`` resolved; 0 = in the main process)
    loader_batches (batches timed), loader_warmup_batches (batches drawn untimed first: at
    least warmup and workers, so the workers' start is not timed),
    loader_images_per_second (the loader alone, nothing else running: read, decode, random
    crop, collate; for "device" reading and crop boxes only),
    loader_images_per_second_per_worker (/ max(workers, 1))
    end_to_end_images_per_second, end_to_end_step_ms (the MFM step above, fed from the
    loader: host-to-device copy (or, for "device", decoding and cropping there), the stage's
    device augmentation for image folders (the flip), corruption, forward, loss, backward,
    AdamW; timed_steps after warmup_steps),
    end_to_end_over_synthetic (end_to_end_images_per_second / images_per_second: near 1 the
    input keeps up, below 1 it holds the step back; the synthetic step also crops on the
    device, so a small model can pass 1 when it keeps up)
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfm import bench_data
from mfm.config import Params
from mfm.data.augment import device_augment, normalizer
from mfm.data.meta import DatasetMeta
from mfm.device import autocast, resolve_device
from mfm.errors import UserError
from mfm.flops import count_flops, mfu_figures
from mfm.frequency import SPATIAL_DIMS, RandomFrequencyMask, build_corruption
from mfm.losses import build_loss
from mfm.models import build_classifier, build_encoder, encoder_patch_size, pretext_model
from mfm.optim import build_optimizer, scaled_lr
from mfm.spatial_mask import check_geometry
from mfm.timing import mean_seconds, seconds_once, untimed_calls

SUPERVISED_CLASSES = 10
LOADER_ROUNDS = 4  # the loader is timed over at least this many batches per worker
DATA_KEYS = (
    "data",
    "data_images",
    "data_repeats",
    "loader",
    "jpeg_draft",
    "workers",
    "loader_batches",
    "loader_warmup_batches",
    "loader_images_per_second",
    "loader_images_per_second_per_worker",
    "end_to_end_images_per_second",
    "end_to_end_step_ms",
    "end_to_end_over_synthetic",
)


def synthetic_meta(channels: int, img_size: int) -> DatasetMeta:
    """Stand-in dataset description: the bench needs shapes and statistics, not data."""
    return DatasetMeta(
        dataset="synthetic",
        kind="arrays",
        classes=["0"],
        num_classes=1,
        channels=channels,
        image_size=(img_size, img_size),
        mean=[0.5] * channels,
        std=[0.25] * channels,
        num_train=0,
        num_test=0,
        source="synthetic",
    )


# -- the device --------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({cpu_model()})"
    return cpu_model()


# -- the authors' way: one image at a time -------------------------------------------------


def per_image_frequency_mask(
    images: Tensor,
    keep_low: Sequence[bool],
    radii: Sequence[float],
    inner_radius: float = 0.0,
    clamp: bool = True,
) -> Tensor:
    """MFM's corruption the way the authors' data loader applies it: image by image.

    For each (C, H, W) image: ``fftshift(fft2(x))``, build the disc of bins whose squared
    distance to the centre (H // 2, W // 2) lies in [inner**2, r**2), keep it (low-pass) or
    its complement (high-pass), ``ifft2(ifftshift(.)).real`` and clamp to [0, 1]. The full
    complex FFT and both shifts, as the textbook (and the loader) writes it; radii in bins.
    """
    out = []
    for image, low, radius in zip(images, keep_low, radii, strict=True):
        height, width = image.shape[-2:]
        ys = torch.arange(height) - height // 2
        xs = torch.arange(width) - width // 2
        dist2 = ys[:, None] ** 2 + xs[None, :] ** 2
        disc = ((dist2 >= inner_radius**2) & (dist2 < radius**2)).to(image.dtype)
        mask = disc if low else 1.0 - disc
        spectrum = torch.fft.fftshift(torch.fft.fft2(image), dim=SPATIAL_DIMS)
        filtered = torch.fft.ifft2(torch.fft.ifftshift(spectrum * mask, dim=SPATIAL_DIMS)).real
        out.append(filtered.clamp(0.0, 1.0) if clamp else filtered)
    return torch.stack(out)


# -- timing a training step ---------------------------------------------------------------


def _error_line(err: BaseException, max_chars: int = 300) -> str:
    """An exception as one short line for the JSON: compiler errors run to pages, and
    dynamo's first line only names the backend, so the first two lines are kept."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {' / '.join(lines[:2])}"[:max_chars]


@dataclass
class StepTiming:
    """Mean seconds of one training step, its FLOPs when counted, and how compiling went."""

    seconds: float
    flops: int | None = None
    compile_seconds: float | None = None
    compile_error: str | None = None


def time_training_step(
    model: nn.Module,
    make_step: Callable[[nn.Module], Callable[[], None]],
    steps: int,
    warmup: int,
    compile: bool = False,
    flops: bool = False,
) -> StepTiming:
    """Time ``make_step(model)`` (one training step), optionally through ``torch.compile``.

    FLOPs are counted on one eager step (the count is the model's, not the compiler's). A
    compiled model is called once before the warm-up, which absorbs the compilation and
    is reported as ``compile_seconds``; if compiling fails (at ``torch.compile`` or at that
    first call), the error is kept and the eager step is timed instead.
    """
    eager = make_step(model)
    result = StepTiming(seconds=math.nan)
    if flops:
        result.flops = count_flops(eager)
    step = eager
    if compile:
        try:
            compiled = make_step(torch.compile(model))
            step, result.compile_seconds = compiled, seconds_once(compiled)
        except Exception as err:  # noqa: BLE001 - any compiler failure is a result, not a crash
            result.compile_error = _error_line(err)
    result.seconds = mean_seconds(step, steps, warmup)
    return result


# -- the benchmark -------------------------------------------------------------------------


@dataclass
class _Setup:
    """What both training steps share: the batch, its augmentation and the options."""

    params: Params
    device: torch.device
    images: Tensor
    augment: nn.Module
    normalize: nn.Module
    amp: bool
    memory_format: torch.memory_format
    steps: int
    warmup: int
    flops: bool

    def model_input(self, images: Tensor) -> Tensor:
        return self.normalize(images).contiguous(memory_format=self.memory_format)

    def optimizer_for(self, model: nn.Module) -> torch.optim.Optimizer:
        recipe = self.params.pretrain
        lr = scaled_lr(recipe.lr, self.images.shape[0])
        return build_optimizer(model, lr, recipe.weight_decay, recipe.betas)

    def time_step(
        self,
        model: nn.Module,
        loss_of: Callable[[nn.Module], Tensor],
        compile: bool,
        flops: bool | None = None,
    ) -> StepTiming:
        """Time ``loss_of(forward)`` under autocast, backward and an AdamW step (FLOPs
        counted as the setup says, unless ``flops`` says otherwise)."""
        flops = self.flops if flops is None else flops
        model = model.to(self.device, memory_format=self.memory_format).train()
        optimizer = self.optimizer_for(model)

        def make_step(forward: nn.Module) -> Callable[[], None]:
            def step() -> None:
                with autocast(self.device, self.amp):
                    loss = loss_of(forward)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            return step

        return time_training_step(model, make_step, self.steps, self.warmup, compile, flops)


def run(
    params: Params,
    batch_size: int,
    steps: int,
    warmup: int,
    channels: int,
    amp: bool | None = None,
    channels_last: bool = False,
    compile: bool = False,
    mfu: bool = False,
    peak: float | None = None,
    data: str | Path | None = None,
    workers: int | str | None = None,
) -> dict[str, Any]:
    """Time the pretraining step, its frequency parts and the floor, and with an image folder
    ``data`` the stage's input path on it; returns the flat dict the module docstring
    describes. ``amp=None`` takes ``runtime.amp``; ``peak`` (TFLOP/s) overrides the table and
    implies ``mfu``; ``workers=None`` takes ``runtime.workers``."""
    folder = None
    if data is not None:  # a bad folder fails before any timing
        folder = _open_folder(params, data, batch_size, steps, warmup, channels, workers)
    torch.manual_seed(params.runtime.seed)
    device = resolve_device(params.runtime.device)
    img_size = params.data.img_size
    amp_requested = params.runtime.amp if amp is None else amp
    amp_on = bool(amp_requested and device.type == "cuda")
    mfu = mfu or peak is not None
    meta = synthetic_meta(channels, img_size)
    images = torch.randint(0, 256, (batch_size, channels, img_size, img_size), dtype=torch.uint8)
    encoder = build_encoder(params.model, img_size, channels)
    is_vit = encoder.is_vit
    spatial = params.pretrain.pretext == "mim"  # the model must know which patches are hidden
    if spatial:
        check_geometry(params.pretrain.mim, img_size, encoder_patch_size(encoder))
    cl = channels_last and not is_vit
    setup = _Setup(
        params=params,
        device=device,
        images=images.to(device),
        augment=device_augment(meta, img_size, True, params.pretrain.crop_scale).to(device),
        normalize=normalizer(meta).to(device),
        amp=amp_on,
        memory_format=torch.channels_last if cl else torch.contiguous_format,
        steps=steps,
        warmup=warmup,
        flops=mfu,
    )
    augment, normalize = setup.augment, setup.normalize

    # MFM: the pretrain stage's step.
    corruption = build_corruption(params.pretrain).to(device)
    loss_fn = build_loss(params.pretrain)

    def mfm_loss(forward: nn.Module) -> Tensor:
        clean = augment(setup.images)
        corrupted, mask = corruption.corrupt(clean)
        x = setup.model_input(corrupted)
        return loss_fn(forward(*((x, mask) if spatial else (x,))), normalize(clean), mask)

    model = pretext_model(encoder, channels, params.pretrain.pretext)
    mfm = setup.time_step(model, mfm_loss, compile)
    data_figures: dict[str, Any] = dict.fromkeys(DATA_KEYS)
    if folder is not None:
        compile_e2e = compile and mfm.compile_error is None
        step = _FolderStep(corruption, loss_fn, spatial)
        data_figures = folder.time(setup, model, step, compile_e2e, mfm.seconds)
    del encoder  # frees the device for the supervised model

    # The frequency parts alone, on a fixed batch.
    clean = augment(setup.images)
    _, fixed_mask = corruption.corrupt(clean)
    target = normalize(clean)
    prediction = torch.randn_like(target)

    def corrupt_only() -> None:
        with autocast(device, amp_on):
            corruption.corrupt(clean)

    def loss_only() -> None:
        pred = prediction.clone().requires_grad_(True)
        with autocast(device, amp_on):
            loss = loss_fn(pred, target, fixed_mask)
        loss.backward()

    corrupt_s = mean_seconds(corrupt_only, steps, warmup)
    loss_s = mean_seconds(loss_only, steps, warmup)
    loop_s = None
    if isinstance(corruption, RandomFrequencyMask):
        loop_s = mean_seconds(_loop_corruption(corruption, clean), steps, warmup)

    # The floor: the same encoder, supervised, on fixed random labels.
    classifier, _ = build_classifier(
        params.model, img_size, channels, SUPERVISED_CLASSES, params.model.drop_path_rate
    )
    labels = torch.randint(0, SUPERVISED_CLASSES, (batch_size,), device=device)

    def supervised_loss(forward: nn.Module) -> Tensor:
        return F.cross_entropy(forward(setup.model_input(augment(setup.images))), labels)

    # Both compiled or both eager: a failed MFM compile leaves the supervised model eager too.
    compile_both = compile and mfm.compile_error is None
    sup = setup.time_step(classifier, supervised_loss, compile_both)
    compile_error = mfm.compile_error
    if sup.compile_error is not None:
        compile_error = f"supervised: {sup.compile_error}"

    name = device_name(device)
    figures = mfu_figures(mfm, sup, device, name, amp_on, peak) if mfu else mfu_figures()
    return {
        "model": params.model.name,
        "pretext": params.pretrain.pretext,
        "img_size": img_size,
        "channels": channels,
        "batch_size": batch_size,
        "timed_steps": steps,
        "warmup_steps": untimed_calls(steps, warmup),
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "amp_requested": bool(amp_requested),
        "amp": amp_on,
        "amp_note": _amp_note(amp_requested, device),
        "channels_last": cl,
        "channels_last_note": (
            f"ignored: {params.model.name} is a ViT (channels_last is for CNN encoders)"
            if channels_last and is_vit
            else None
        ),
        "compile": compile and compile_error is None,
        "compile_seconds": mfm.compile_seconds if compile_error is None else None,
        "compile_error": compile_error,
        "images_per_second": batch_size / mfm.seconds,
        "step_ms": 1000 * mfm.seconds,
        "corruption_ms": 1000 * corrupt_s,
        "loss_ms": 1000 * loss_s,
        "frequency_share": (corrupt_s + loss_s) / mfm.seconds,
        "supervised_classes": SUPERVISED_CLASSES,
        "supervised_images_per_second": batch_size / sup.seconds,
        "supervised_step_ms": 1000 * sup.seconds,
        "mfm_over_supervised": mfm.seconds / sup.seconds,
        "corruption_loop_ms": None if loop_s is None else 1000 * loop_s,
        "corruption_loop_over_batched": None if loop_s is None else loop_s / corrupt_s,
        **figures,
        **data_figures,
    }


# -- the input path on an image folder ----------------------------------------------------


@dataclass
class _FolderStep:
    """What the MFM step does after the batch arrives (the synthetic step's parts)."""

    corruption: nn.Module
    loss_fn: Callable[..., Tensor]
    spatial: bool


@dataclass
class _Folder:
    """An image folder as the pretrain stage reads it, and how many batches each timing
    draws from it: the loader alone, then the MFM step fed from it."""

    source: bench_data.FolderInput
    workers: int
    loader_batches: int
    loader_warmup: int

    def time(
        self,
        setup: _Setup,
        model: nn.Module,
        step: _FolderStep,
        compile: bool,
        synthetic_seconds: float,
    ) -> dict[str, Any]:
        """Time the loader alone (epoch 0), then the step fed from a fresh loader (epoch 1);
        returns the ``DATA_KEYS`` figures."""
        params, device = setup.params, setup.device
        batch_size, seed = setup.images.shape[0], params.runtime.seed
        loader = bench_data.batches(self.source, batch_size, seed, self.workers, epoch=0)
        loader_s = mean_seconds(partial(next, loader), self.loader_batches, self.loader_warmup)
        del loader  # its workers stop here, not during the next timing

        meta, img_size = self.source.meta, params.data.img_size
        augment = device_augment(meta, img_size, True, params.pretrain.crop_scale).to(device)
        normalize = normalizer(meta).to(device)
        # its workers stop when this returns (nothing else holds the loader)
        feed = bench_data.batches(self.source, batch_size, seed, self.workers, epoch=1)

        def folder_loss(forward: nn.Module) -> Tensor:  # pretrain's step on the next batch
            clean = augment(bench_data.images_of(self.source, next(feed), img_size, device))
            corrupted, mask = step.corruption.corrupt(clean)
            x = normalize(corrupted).contiguous(memory_format=setup.memory_format)
            prediction = forward(*((x, mask) if step.spatial else (x,)))
            return step.loss_fn(prediction, normalize(clean), mask)

        end_to_end = setup.time_step(model, folder_loss, compile, flops=False).seconds
        loader_ips = batch_size / loader_s
        return {
            "data": str(self.source.root),
            "data_images": self.source.images,
            "data_repeats": self.source.repeats,
            "loader": "device" if self.source.on_device else "pil",
            "jpeg_draft": self.source.jpeg_draft,
            "workers": self.workers,
            "loader_batches": self.loader_batches,
            "loader_warmup_batches": untimed_calls(self.loader_batches, self.loader_warmup),
            "loader_images_per_second": loader_ips,
            "loader_images_per_second_per_worker": loader_ips / max(self.workers, 1),
            "end_to_end_images_per_second": batch_size / end_to_end,
            "end_to_end_step_ms": 1000 * end_to_end,
            "end_to_end_over_synthetic": synthetic_seconds / end_to_end,
        }


def _open_folder(
    params: Params,
    data: str | Path,
    batch_size: int,
    steps: int,
    warmup: int,
    channels: int,
    workers: int | str | None,
) -> _Folder:
    """Scan the folder and size its timings: one epoch holds every batch a timing draws.
    ``workers`` None takes ``runtime.workers``; ``auto`` is resolved as pretrain does."""
    if channels != 3:
        raise UserError(
            f"bench --data reads image folders as RGB (3 channels), not {channels}; drop --channels"
        )
    workers = bench_data.resolve_workers(params.runtime.workers if workers is None else workers)
    loader_batches = max(steps, LOADER_ROUNDS * max(workers, 1))
    loader_warmup = max(warmup, workers)
    loader_draws = untimed_calls(loader_batches, loader_warmup) + loader_batches
    step_draws = untimed_calls(steps, warmup) + steps + 2  # + a compiling call, its fallback
    least = max(loader_draws, step_draws) * batch_size
    crop_scale = params.pretrain.crop_scale
    source = bench_data.folder_input(params, data, params.data.img_size, crop_scale, least)
    return _Folder(source, workers, loader_batches, loader_warmup)


def _amp_note(requested: bool, device: torch.device) -> str | None:
    if requested and device.type != "cuda":
        return f"no effect on {device.type}: bf16 autocast is CUDA-only (mfm.device.autocast)"
    return None


def _loop_corruption(corruption: RandomFrequencyMask, clean: Tensor) -> Callable[[], Tensor]:
    """The per-image loop on a CPU copy of the batch, drawing low/high and the radius per
    image from the corruption's own settings, as the loader would."""
    images = clean.detach().float().cpu()
    batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    scale = min(height, width) if corruption.radius_unit == "fraction" else 1.0
    low, high = corruption.radius_range

    def loop() -> Tensor:
        keep_low = (torch.rand(batch) < corruption.p_low).tolist()
        radii = ((low + torch.rand(batch, dtype=torch.float64) * (high - low)) * scale).tolist()
        inner = corruption.inner_radius * scale
        return per_image_frequency_mask(images, keep_low, radii, inner, corruption.clamp)

    return loop
