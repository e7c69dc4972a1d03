"""Typed params: one ``params.yaml`` read by every stage, by DVC and by Snakemake.

Each section is a pydantic model that forbids unknown keys, so a typo never silently falls
back to a default. ``load_params`` turns any validation failure into a single ``UserError``
line that names the key, the value given and what is allowed.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from mfm.errors import UserError
from mfm.overrides import apply_overrides, override_of
from mfm.segment_params import SegmentParams

PARAMS_FILE = "params.yaml"

DatasetName = Literal["fashion_mnist", "digits", "cifar10", "cifar100", "imagefolder"]
PretextName = Literal["mfm", "sr", "deblur", "denoise", "mim"]
# How a classifier starts: from the pretrained encoder, or from random init (the baseline).
InitName = Literal["mfm", "scratch"]
INITS: tuple[str, ...] = get_args(InitName)


def _check_crop_scale(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not 0 < low <= high <= 1:
        raise ValueError("crop_scale must be [low, high] with 0 < low <= high <= 1")
    return value


CropScale = Annotated[tuple[float, float], AfterValidator(_check_crop_scale)]


class StrictModel(BaseModel):
    """Base for every section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataParams(StrictModel):
    """Which dataset to prepare and the resolution the models train at."""

    dataset: DatasetName = "fashion_mnist"
    root: str | None = Field(
        None, description="Folder holding the dataset's files; null = the dataset's usual places."
    )
    download: bool = Field(True, description="Allow torchvision's download when files are missing.")
    img_size: int = Field(32, ge=8, le=1024, description="Side of the square training crop.")
    train_limit: int | None = Field(
        None, ge=1, description="Keep a seeded random subset of this many training images."
    )
    test_limit: int | None = Field(
        None, ge=1, description="Keep a seeded random subset of this many test images."
    )


class ModelParams(StrictModel):
    """A timm encoder by name; ``kwargs`` go straight to ``timm.create_model``."""

    name: str = "vit_tiny_patch16_224"
    patch_size: int | None = Field(
        4, ge=1, description="ViT patch size (null = the model's own); ignored by CNNs."
    )
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class MaskParams(StrictModel):
    """The MFM frequency mask: a disc (or ring) in the centred spectrum."""

    radius: float | tuple[float, float] = Field(
        4.0, description="Outer radius, fixed or a [low, high] range sampled per image."
    )
    inner_radius: float = Field(0.0, ge=0.0, description="> 0 turns the disc into a band.")
    radius_unit: Literal["bins", "fraction"] = Field(
        "bins", description="'fraction' scales radii by the image side."
    )
    p_low: float = Field(0.5, ge=0.0, le=1.0, description="Probability of a low-pass mask.")
    clamp: bool = Field(True, description="Clamp the filtered image to [0, 1] (rectifies HPF).")

    @field_validator("radius")
    @classmethod
    def _positive_radius(cls, value: float | tuple[float, float]) -> float | tuple[float, float]:
        low, high = (value, value) if isinstance(value, float | int) else value
        if low <= 0 or high < low:
            raise ValueError("radius must be > 0, or a [low, high] range with 0 < low <= high")
        return value


class LossParams(StrictModel):
    """Frequency loss: |F_pred - F_target| ** gamma, optionally focal-weighted."""

    gamma: float = Field(1.0, gt=0.0)
    alpha: float = Field(0.0, ge=0.0, description="Focal weight exponent; 0 turns it off.")
    log_weight: bool = False
    batch_weight: bool = Field(False, description="Normalise the focal weight by the batch max.")


class SRParams(StrictModel):
    scale: int = Field(8, ge=2, description="Bicubic down-sampling factor.")


class DeblurParams(StrictModel):
    sigma: float = Field(5.0, gt=0.0)
    kernel_sizes: list[int] = Field(default_factory=lambda: list(range(7, 22, 2)), min_length=1)

    @field_validator("kernel_sizes")
    @classmethod
    def _odd_kernels(cls, value: list[int]) -> list[int]:
        if any(k < 3 or k % 2 == 0 for k in value):
            raise ValueError("kernel sizes must be odd and >= 3")
        return value


class DenoiseParams(StrictModel):
    sigma: float = Field(75 / 255, gt=0.0, description="Noise std on the [0, 1] scale.")


class MIMParams(StrictModel):
    """The spatial-masking baseline (SimMIM): square patches of the image hidden at random.

    SimMIM masks 32 px patches at ratio 0.6 on 224 px images; scaled to the default 32 px
    images that is 32 / 224 * 32 = 4.6 px, so the default is 4 px: the nearest multiple of
    the default ViT's 4 px patches (one mask patch per token) that divides the image. The
    224 px presets set SimMIM's 32 px. A ViT's mask patch must be a multiple of its patch
    size and ``data.img_size`` a multiple of the mask patch (checked when pretrain starts).
    """

    mask_patch_size: int = Field(
        4, ge=1, description="Side of a mask patch in pixels (SimMIM: 32 at 224 px)."
    )
    mask_ratio: float = Field(
        0.6, gt=0.0, lt=1.0, description="Fraction of mask patches hidden in every image."
    )


class PretrainParams(StrictModel):
    """MFM (or a restoration or spatial-masking baseline) pretraining recipe."""

    pretext: PretextName = "mfm"
    weights: str | None = Field(
        None,
        description="A released checkpoint under weights/ to import instead of training "
        "(python -m mfm import FILE sets it); null = pretrain.",
    )
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1.5e-3, gt=0.0, description="Base lr per 512 images (linear scaling).")
    min_lr: float = Field(1e-5, ge=0.0, description="Final cosine lr per 512 images.")
    warmup_epochs: float = Field(1.0, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    crop_scale: CropScale = Field((0.2, 1.0), description="RandomResizedCrop area range.")
    clip_grad: float | None = Field(3.0, gt=0.0)
    checkpoint_every: int = Field(1, ge=1, description="Epochs between resumable checkpoints.")
    log_every: int = Field(10, ge=1, description="Steps between logged losses.")
    mask: MaskParams = Field(default_factory=MaskParams)
    loss: LossParams = Field(default_factory=LossParams)
    sr: SRParams = Field(default_factory=SRParams)
    deblur: DeblurParams = Field(default_factory=DeblurParams)
    denoise: DenoiseParams = Field(default_factory=DenoiseParams)
    mim: MIMParams = Field(default_factory=MIMParams)


class LinprobeParams(StrictModel):
    """Frozen-feature probes: logistic regression (C picked on held-out train) and k-NN."""

    pool: Literal["mean", "cls"] = Field(
        "mean",
        description="ViT feature: mean of patch tokens or cls token (CNN, Swin: own pooling).",
    )
    train_limit: int | None = Field(
        10000, ge=10, description="Seeded subset of training images to fit the probes on."
    )
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Held out to pick C.")
    c_grid: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0], min_length=1)
    max_iter: int = Field(1000, ge=10)
    knn_k: int = Field(20, ge=1)
    knn_temperature: float = Field(0.07, gt=0.0)
    batch_size: int = Field(256, ge=1, description="Images per feature-extraction batch.")
    pixel_size: int | None = Field(
        32,
        ge=1,
        description=(
            "Side the raw-pixel reference probe area-averages larger images down to before "
            "flattening (never up); null = data.img_size. 32 keeps the default 32 px run at "
            "full resolution and a 224 px RGB one at 3,072 values (CIFAR's size) instead of "
            "150k, which the logistic C sweep and k-NN could not handle in memory or time."
        ),
    )

    @field_validator("c_grid")
    @classmethod
    def _positive_c(cls, value: list[float]) -> list[float]:
        if any(c <= 0 for c in value):
            raise ValueError("every C must be > 0")
        return value


class FinetuneParams(StrictModel):
    """Supervised fine-tuning recipe, shared by the pretrained and the scratch run."""

    @field_validator("auto_augment")
    @classmethod
    def _posterize_safe(cls, value: str | None) -> str | None:
        # timm's increasing posterize keeps 4 - int(4 * m / 10) bits: 0 at magnitude 10,
        # which current Pillow rejects mid-training. Capping the magnitude at 9 avoids it.
        if (
            value
            and "inc1" in value.split("-")
            and not any(
                part.startswith("mmax") and part[4:].isdigit() and int(part[4:]) <= 9
                for part in value.split("-")
            )
        ):
            raise ValueError(
                "with inc1, add -mmax9 (e.g. rand-m9-mstd0.5-inc1-mmax9): at magnitude 10 "
                "timm asks Pillow to posterize to 0 bits, which Pillow rejects"
            )
        return value

    weights: str | None = Field(
        None,
        description="A released fine-tuned classifier under weights/ that init=mfm imports "
        "and scores instead of fine-tuning; null = fine-tune.",
    )
    scratch_weights: str | None = Field(
        None,
        description="A released classifier trained from random init (e.g. timm's DeiT) that "
        "init=scratch imports instead of training the baseline; null = train it.",
    )
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(2e-3, gt=0.0, description="Base lr per 512 images (linear scaling).")
    min_lr: float = Field(1e-5, ge=0.0)
    warmup_epochs: float = Field(0.5, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float | None = Field(
        0.75, gt=0.0, le=1.0, description="Layer-wise lr decay (ViTs); null = off."
    )
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    clip_grad: float | None = Field(None, gt=0.0)
    mixup: float = Field(0.8, ge=0.0, description="Mixup alpha; 0 = off.")
    cutmix: float = Field(1.0, ge=0.0, description="CutMix alpha; 0 = off.")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    auto_augment: str | None = Field(
        "rand-m9-mstd0.5-inc1-mmax9", description="timm RandAugment string; null = off."
    )
    reprob: float = Field(0.25, ge=0.0, le=1.0, description="Random erasing probability.")
    min_augment_size: int = Field(
        24, ge=1, description="RandAugment and erasing only for images at least this large."
    )
    crop_scale: CropScale = Field(
        (0.35, 1.0), description="RandomResizedCrop area range (small images need > 0.08)."
    )
    checkpoint_every: int = Field(1, ge=1)
    log_every: int = Field(10, ge=1)


class RobustnessParams(StrictModel):
    """ImageNet-C-style corruption of the test split, and the real benchmarks when given."""

    num_images: int | None = Field(
        1000, ge=1, description="Seeded subset of the prepared test split to corrupt (null = all)."
    )
    corruptions: Literal["common", "all"] = Field(
        "common", description="common = the 15 mCE corruptions; all adds the 4 held-out ones."
    )
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5], min_length=1)
    baseline: Literal["scratch"] = Field(
        "scratch", description="Classifier whose errors normalise CE on non-ImageNet data."
    )
    batch_size: int = Field(256, ge=1)
    imagenet_c: str | None = Field(None, description="Root of ImageNet-C (released layout).")
    imagenet_a: str | None = None
    imagenet_r: str | None = None
    imagenet_sketch: str | None = None

    @field_validator("severities")
    @classmethod
    def _severities(cls, value: list[int]) -> list[int]:
        if any(s < 1 or s > 5 for s in value) or len(set(value)) != len(value):
            raise ValueError("severities must be distinct values in 1..5")
        return sorted(value)


class ExportParams(StrictModel):
    """ONNX export of a fine-tuned classifier and its parity check against torch."""

    init: InitName = Field("mfm", description="Which classifier to export.")
    opset: int = Field(18, ge=17, le=23, description="ONNX opset (>= 17).")
    parity_images: int = Field(256, ge=1, description="Test images the parity check runs on.")
    atol: float = Field(1e-4, gt=0.0, description="Largest allowed |logit difference|.")
    latency_repeats: int = Field(
        10, ge=1, description="Timed runs per batch size for the torch vs onnxruntime latency."
    )


class RuntimeParams(StrictModel):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: int = 0
    workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        0,
        description="DataLoader worker processes per training process; auto = the CPUs this "
        "job may use (SLURM's allocation included) over this node's processes, minus one.",
    )
    amp: bool = Field(True, description="bf16 autocast on CUDA; ignored on CPU.")
    loader: Literal["pil", "device"] = Field(
        "pil",
        description="How pretraining reads image folders: pil = decode and crop in the "
        "workers; device = workers read bytes, the training device decodes (nvJPEG on CUDA).",
    )
    jpeg_draft: bool = Field(
        False,
        description="Decode JPEGs of image folders at 1/2, 1/4 or 1/8 scale (libjpeg's DCT "
        "scaling) where the crop still spans img_size there (pretrain, finetune, linprobe; "
        "PIL path): the same crop boxes, pixels within a few grey levels.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the training model (pretrain, finetune, segment); saved "
        "weights stay plain. Off by default: on a CPU it costs more than it saves.",
    )


VARIANT_NAME = r"^[A-Za-z][A-Za-z0-9_-]*$"
STUDY_BASELINE = "scratch"  # the per-seed scratch classifier's run folder; no variant's name
# What a study variant may not change: the data, corrupted set and seeds all variants share.
SHARED_BY_VARIANTS = ("data", "robustness", "runtime.seed", "study")


def _default_variants() -> dict[str, dict[str, Any]]:
    return {name: {"pretrain.pretext": name} for name in ("mfm", "sr", "deblur", "denoise", "mim")}


class StudyParams(StrictModel):
    """The study: every named variant x seed through pretrain -> linprobe -> finetune ->
    robustness, with a scratch classifier per seed, summarised as mean +- std and
    seed-paired differences."""

    variants: dict[str, dict[str, Any]] = Field(
        default_factory=_default_variants,
        min_length=1,
        description="name -> overrides of params.yaml as with -S (dotted keys).",
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)

    @field_validator("variants")
    @classmethod
    def _variant_names_and_keys(cls, value: dict[str, dict[str, Any]]) -> dict[str, Any]:
        for name, overrides in value.items():
            if not re.fullmatch(VARIANT_NAME, name) or name == STUDY_BASELINE:
                raise ValueError(
                    f"variant name {name!r} must be letters, digits, '_' or '-' (starting with "
                    f"a letter) and not {STUDY_BASELINE!r}"
                )
            if not isinstance(overrides, dict):
                raise ValueError(f"variant {name!r} must map dotted keys to values")
            for key in overrides:
                if any(key == fixed or key.startswith(f"{fixed}.") for fixed in SHARED_BY_VARIANTS):
                    raise ValueError(
                        f"variant {name!r} sets {key}, which all variants share "
                        f"({', '.join(SHARED_BY_VARIANTS)}); change it for the whole study instead"
                    )
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError("seeds must be distinct integers >= 0")
        return value


def variant_overrides(study: StudyParams, name: str) -> list[str]:
    """A variant's overrides as ``-S`` items (values as JSON, which YAML reads back)."""
    if name not in study.variants:
        raise UserError(
            f"unknown study variant {name!r}; params.yaml study.variants has "
            f"{', '.join(study.variants)}"
        )
    return [f"{key}={json.dumps(value)}" for key, value in study.variants[name].items()]


class Params(StrictModel):
    data: DataParams = Field(default_factory=DataParams)
    model: ModelParams = Field(default_factory=ModelParams)
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    linprobe: LinprobeParams = Field(default_factory=LinprobeParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    robustness: RobustnessParams = Field(default_factory=RobustnessParams)
    segment: SegmentParams = Field(default_factory=SegmentParams)
    export: ExportParams = Field(default_factory=ExportParams)
    runtime: RuntimeParams = Field(default_factory=RuntimeParams)
    study: StudyParams = Field(default_factory=StudyParams)


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the model that holds the key at ``loc`` (for 'unknown key' errors)."""
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def describe_validation_error(err: ValidationError, source: str) -> str:
    """One line naming the first bad key, its value and what is allowed."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "<top level>"
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{source}: unknown key {key!r}{hint}; allowed keys here: {', '.join(allowed)}"
    return f"{source}: {key} = {value!r} is invalid: {first['msg']}"


def validate_params(
    raw: dict[str, Any] | None, source: str = PARAMS_FILE, overrides: Sequence[str] = ()
) -> Params:
    """Validate a params mapping; the Snakefile calls this too, so both engines agree.

    A bad key that came from ``overrides`` is blamed on that ``-S`` option, not on ``source``.
    Every study variant is validated too (its overrides applied), so a typo in one fails
    before any run starts.
    """
    params = _validated(raw or {}, source, overrides)
    for name in params.study.variants:
        where = f"{source} study.variants.{name}"
        _validated(apply_overrides(raw or {}, variant_overrides(params.study, name)), where)
    return params


def _validated(raw: dict[str, Any], source: str, overrides: Sequence[str] = ()) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        item = override_of(err.errors()[0]["loc"], overrides)
        where = f"-S {item}" if item else source
        raise UserError(describe_validation_error(err, where)) from None


def load_params(
    path: str | Path = PARAMS_FILE,
    overrides: list[str] | None = None,
    variant: str | None = None,
) -> Params:
    """Read ``params.yaml``, apply a study ``variant``'s overrides, then ``-S`` overrides, and
    validate."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        kind = err.__class__.__name__
        raise UserError(f"{path} is not valid YAML ({kind}); fix its syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of sections (data, model, pretrain, runtime)")
    overrides = overrides or []
    if variant is not None:
        study = validate_params(raw, str(path)).study
        overrides = [*variant_overrides(study, variant), *overrides]
    return validate_params(apply_overrides(raw, overrides), str(path), overrides)
