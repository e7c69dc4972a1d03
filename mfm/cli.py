"""One entry point, one subcommand per stage: ``python -m mfm <stage> [-S key=value ...]``.

DVC and Snakemake call exactly these commands. Every stage reads ``params.yaml`` (with
``-S`` overrides applied, as in ``dvc exp run -S``), runs ``mfm.<stage>.run(params)`` and
writes the returned numbers to ``metrics/<stage>.json``. A ``UserError`` becomes one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from mfm.config import INITS, PARAMS_FILE, load_params
from mfm.errors import Interrupted, UserError
from mfm.io import write_json
from mfm.paths import RunDirs, metrics_file

STAGES = {
    "prepare": "prepare the dataset into data/prepared (arrays or a manifest + meta.json)",
    "pretrain": "MFM (or restoration) pretraining; writes results/pretrain/encoder.pt",
    "linprobe": "logistic-regression and k-NN probes of frozen features, pretrained vs random",
    "finetune": "supervised fine-tuning from the MFM encoder (--init mfm) or from scratch",
    "scenes": "segmentation scenes from the prepared images into data/scenes (built once)",
    "segment": "UPerNet segmentation from the MFM encoder (--init mfm) or from scratch: mIoU",
    "corrupt": "ImageNet-C-style corruptions of the test split (CIFAR-10-C layout), built once",
    "robustness": "every classifier on the corrupted test set: errors, mCE, relative mCE",
    "export": "the fine-tuned classifier as ONNX, checked against torch on test images",
    "study": "collect the study (variants x seeds) into tables, a chart and metrics/study.json",
}
# Stages whose results can go under another folder (--out), e.g. one per study variant and seed.
RELOCATABLE = ("pretrain", "linprobe", "finetune", "segment", "robustness", "export")
# Matrix dimensions of a stage (DVC matrix / Snakemake wildcard): option -> choices.
VARIANTS = {"finetune": {"init": INITS}, "segment": {"init": INITS}}


BENCH_HELP = (
    "time MFM vs supervised steps on synthetic images, and with --data the input path on an "
    "image folder; prints JSON (img/s, FFT share)"
)
PREDICT_HELP = "classify image files or folders with the ONNX model (onnxruntime, no torch)"
REPORT_HELP = "print MFM vs random/scratch from metrics/*.json as a Markdown table"
IMPORT_HELP = "a released checkpoint (the authors' MFM, MAE, timm) as our encoder or classifier"
PRESET_HELP = "merge one of the paper's recipes (presets/NAME.yaml) into params.yaml"


def _add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (params.yaml)")
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. -S pretrain.epochs=3 (repeatable)",
    )


def _workers_option(text: str) -> int | str:
    """``bench --workers``: a count or ``auto``, as ``runtime.workers`` takes."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or auto: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="stage", required=True, metavar="COMMAND")
    for name, help_text in STAGES.items():
        stage = commands.add_parser(name, help=help_text, description=help_text)
        _add_params_arguments(stage)
        for option, choices in VARIANTS.get(name, {}).items():
            stage.add_argument(f"--{option}", choices=choices, required=True)
        if name in RELOCATABLE:
            stage.add_argument(
                "--out",
                default=None,
                metavar="DIR",
                help="put this run's results and metrics under DIR (default: results/, metrics/)",
            )
            stage.add_argument(
                "--variant",
                dest="study_variant",
                default=None,
                metavar="NAME",
                help="apply params.yaml's study.variants.NAME overrides first (-S still wins)",
            )
        if name == "robustness":
            stage.add_argument(
                "--scratch-from",
                default=None,
                metavar="DIR",
                help="results folder whose finetune/scratch classifier is the baseline",
            )
    bench = commands.add_parser("bench", help=BENCH_HELP, description=BENCH_HELP)
    _add_params_arguments(bench)
    bench.add_argument("--batch-size", type=int, default=None, help="default: pretrain's")
    bench.add_argument("--steps", type=int, default=10, help="timed steps")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 2)")
    bench.add_argument("--channels", type=int, default=3, help="image channels")
    bench.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast on CUDA (default: runtime.amp; no effect on CPU)",
    )
    bench.add_argument(
        "--channels-last", action="store_true", help="channels_last model and input (CNNs only)"
    )
    bench.add_argument(
        "--compile", action="store_true", help="torch.compile the models (errors are reported)"
    )
    bench.add_argument("--mfu", action="store_true", help="count FLOPs; MFU on known GPUs")
    bench.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for --mfu (implies --mfu)"
    )
    bench.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="also time pretrain's loader on this image folder (train/<class>/*, val/), alone "
        "and feeding the step",
    )
    bench.add_argument(
        "--workers",
        type=_workers_option,
        default=None,
        metavar="N|auto",
        help="DataLoader workers for --data (default: runtime.workers)",
    )
    bench.add_argument(
        "--make-jpeg-folder",
        default=None,
        metavar="DIR",
        help="write an ImageNet-like JPEG folder (real photos) to DIR for --data, then exit",
    )
    bench.add_argument(
        "--images", type=int, default=256, help="training images --make-jpeg-folder writes"
    )
    bench.add_argument(
        "--jpeg-quality", type=int, default=None, help="--make-jpeg-folder JPEG quality (95)"
    )
    predict = commands.add_parser("predict", help=PREDICT_HELP, description=PREDICT_HELP)
    predict.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders")
    predict.add_argument("--model", default="results/export/model.onnx", help="ONNX model")
    predict.add_argument("--top-k", type=int, default=5, help="classes per image")
    predict.add_argument("--batch-size", type=int, default=64, help="images per run")
    predict.add_argument("--output", default=None, help="write .csv or .json (default: print)")
    report = commands.add_parser("report", help=REPORT_HELP, description=REPORT_HELP)
    report.add_argument("--root", default=".", help="project root holding metrics/")
    imports = commands.add_parser("import", help=IMPORT_HELP, description=IMPORT_HELP)
    _add_params_arguments(imports)
    imports.add_argument("file", metavar="FILE", help="the checkpoint (.pth/.pt)")
    imports.add_argument(
        "--format", default=None, help="mfm-vit|mfm-resnet|mae|timm|project (default: detect)"
    )
    imports.add_argument(
        "--as",
        dest="kind",
        choices=("pretrain", "finetune", "scratch"),
        default=None,
        help="encoder for pretrain.weights, classifier for finetune.weights, or the baseline "
        "classifier for finetune.scratch_weights (default: a file with a head is finetune)",
    )
    imports.add_argument("--out", default=None, metavar="PATH", help="default: weights/<name>.*.pt")
    imports.add_argument(
        "--write-params",
        action="store_true",
        help="set <stage>.weights and the architecture (model.*, data.img_size) in params.yaml",
    )
    preset = commands.add_parser("preset", help=PRESET_HELP, description=PRESET_HELP)
    _add_params_arguments(preset)
    preset.add_argument("name", nargs="?", metavar="NAME", help="preset name (see --list)")
    preset.add_argument("--list", action="store_true", help="list the presets and exit")
    preset.add_argument(
        "--as-overrides",
        action="store_true",
        help="print -S arguments for `dvc exp run` instead of writing params.yaml",
    )
    return parser


def run_stage(
    stage: str,
    params_file: str,
    overrides: list[str],
    variant: dict[str, str] | None = None,
    out: str | None = None,
    scratch_from: str | None = None,
    study_variant: str | None = None,
) -> dict:
    """Validate params, run the stage, store its metrics; returns the metrics."""
    variant = variant or {}
    params = load_params(params_file, overrides, study_variant)
    dirs = RunDirs(Path(out) if out else None)
    kwargs: dict[str, Any] = {**variant, **dirs.stage_kwargs(stage)}
    if scratch_from:
        kwargs["scratch_dir"] = RunDirs(Path(scratch_from)).finetune
    module = importlib.import_module(f"mfm.{stage}")
    metrics = module.run(params, **kwargs)
    if int(os.environ.get("RANK", 0)) != 0:  # torchrun: rank 0 alone writes results
        return metrics
    keys = metrics.items() if getattr(module, "METRICS_PER_KEY", False) else [(None, metrics)]
    for key, values in keys:  # one file, or one per classifier
        name = (*variant.values(), key) if key else tuple(variant.values())
        write_json(metrics_file(stage, *name, metrics_dir=dirs.metrics), values)
    return metrics


def run_bench(args: argparse.Namespace) -> dict:
    """The throughput benchmark: prints figures, writes no pipeline output."""
    import math

    from mfm import throughput

    params = load_params(args.params, args.overrides)
    if args.make_jpeg_folder is not None:
        return make_jpeg_folder(args, params.runtime.seed)
    batch_size = params.pretrain.batch_size if args.batch_size is None else args.batch_size
    if min(batch_size, args.steps, args.channels) < 1 or args.warmup < 0:
        raise UserError("bench: --batch-size, --steps and --channels must be >= 1, --warmup >= 0")
    if isinstance(args.workers, int) and args.workers < 0:
        raise UserError(f"bench: --workers must be >= 0, got {args.workers}")
    peak = args.peak_tflops
    if peak is not None and not (math.isfinite(peak) and peak > 0):
        raise UserError(f"bench: --peak-tflops must be a positive number, got {peak}")
    return throughput.run(
        params,
        batch_size,
        args.steps,
        args.warmup,
        args.channels,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        mfu=args.mfu,
        peak=peak,
        data=args.data,
        workers=args.workers,
    )


def make_jpeg_folder(args: argparse.Namespace, seed: int) -> dict:
    """``bench --make-jpeg-folder DIR``: write the folder, return what was written."""
    from mfm import jpeg_folder

    if args.data is not None:
        raise UserError(
            "bench: --make-jpeg-folder writes a folder and exits; run bench --data on it after"
        )
    quality = jpeg_folder.QUALITY if args.jpeg_quality is None else args.jpeg_quality
    summary = jpeg_folder.write_jpeg_folder(
        args.make_jpeg_folder, images=args.images, seed=seed, quality=quality
    )
    return summary.as_dict()


def run_preset(args: argparse.Namespace) -> str:
    """List the presets, print one as ``-S`` arguments, or merge it into params.yaml."""
    from mfm import presets

    if args.list:
        return presets.listing()
    if not args.name:
        raise UserError("name a preset, e.g. python -m mfm preset vit_b16_mfm (--list shows all)")
    if args.as_overrides:
        overrides = presets.as_overrides(args.name, args.params, args.overrides)
        return " ".join(f"-S {item}" for item in overrides)  # for `dvc exp run $(...)`
    return presets.apply(args.name, args.params, args.overrides)


def run_import(args: argparse.Namespace) -> str:
    """Convert a checkpoint, write the project's file and, on request, the params for it."""
    from mfm import presets
    from mfm.data.meta import load_meta
    from mfm.paths import PREPARED_DIR
    from mfm.weights_import import WEIGHTS_KEYS, describe, import_file, read_weights

    converted = read_weights(args.file, args.format)
    arch = converted.architecture
    values = arch.param_values() if arch and args.write_params else {}
    extra = [f"{key}={json.dumps(value)}" for key, value in values.items()]
    params = load_params(args.params, [*args.overrides, *extra])
    try:  # the prepared data decide channels and classes; before prepare, the file does
        meta = load_meta(PREPARED_DIR, params.data.dataset)
        channels, classes = meta.channels, meta.num_classes
    except UserError:
        channels, classes = None, None
    target, kind = import_file(converted, args.file, params, channels, classes, args.kind, args.out)
    lines = describe(converted, target, kind)
    if args.write_params:
        why = f"import of {Path(args.file).name}"
        values[WEIGHTS_KEYS[kind]] = str(target)
        lines.append(presets.set_values(args.params, values, why))
        lines.append("next: dvc repro (or snakemake --cores all)")
    else:
        lines.append(
            f"next: set {WEIGHTS_KEYS[kind]}: {target} in params.yaml, then dvc repro "
            f"(or: dvc exp run -S {WEIGHTS_KEYS[kind]}={target})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if args.stage == "report":
        from mfm.report import table

        print(table(args.root))
        return 0
    try:
        if args.stage == "predict":  # the deployment path: onnxruntime, no torch import
            from mfm import predict

            predict.run(args.model, args.inputs, args.top_k, args.batch_size, args.output)
            return 0
        if args.stage == "preset":  # edits params.yaml; prints text, not metrics
            print(run_preset(args))
            return 0
        if args.stage == "import":
            print(run_import(args))
            return 0
        if args.stage == "bench":
            metrics = run_bench(args)
        else:
            variant = {name: getattr(args, name) for name in VARIANTS.get(args.stage, {})}
            out, scratch_from = getattr(args, "out", None), getattr(args, "scratch_from", None)
            metrics = run_stage(
                args.stage,
                args.params,
                args.overrides,
                variant,
                out,
                scratch_from,
                getattr(args, "study_variant", None),
            )
    except UserError as err:
        print(f"mfm {args.stage}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"mfm {args.stage}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"mfm {args.stage}: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(metrics, indent=2))
    return 0
