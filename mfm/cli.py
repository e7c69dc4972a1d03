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

from mfm.config import PARAMS_FILE, load_params
from mfm.errors import Interrupted, UserError
from mfm.io import write_json
from mfm.paths import metrics_file

STAGES = {
    "prepare": "prepare the dataset into data/prepared (arrays or a manifest + meta.json)",
    "pretrain": "MFM (or restoration) pretraining; writes results/pretrain/encoder.pt",
    "linprobe": "logistic-regression and k-NN probes of frozen features, pretrained vs random",
    "finetune": "supervised fine-tuning from the MFM encoder (--init mfm) or from scratch",
    "corrupt": "ImageNet-C-style corruptions of the test split (CIFAR-10-C layout), built once",
    "robustness": "every classifier on the corrupted test set: errors, mCE, relative mCE",
    "export": "the fine-tuned classifier as ONNX, checked against torch on test images",
}
# Matrix dimensions of a stage (DVC matrix / Snakemake wildcard): option -> choices.
VARIANTS = {"finetune": {"init": ("mfm", "scratch")}}


BENCH_HELP = "time pretraining steps on synthetic images; prints JSON (img/s, FFT share)"
PREDICT_HELP = "classify image files or folders with the ONNX model (onnxruntime, no torch)"
REPORT_HELP = "print MFM vs random/scratch from metrics/*.json as a Markdown table"


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="stage", required=True, metavar="COMMAND")
    for name, help_text in STAGES.items():
        stage = commands.add_parser(name, help=help_text, description=help_text)
        _add_params_arguments(stage)
        for option, choices in VARIANTS.get(name, {}).items():
            stage.add_argument(f"--{option}", choices=choices, required=True)
    bench = commands.add_parser("bench", help=BENCH_HELP, description=BENCH_HELP)
    _add_params_arguments(bench)
    bench.add_argument("--batch-size", type=int, default=None, help="default: pretrain's")
    bench.add_argument("--steps", type=int, default=10, help="timed steps")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    bench.add_argument("--channels", type=int, default=3, help="image channels")
    predict = commands.add_parser("predict", help=PREDICT_HELP, description=PREDICT_HELP)
    predict.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files or folders")
    predict.add_argument("--model", default="results/export/model.onnx", help="ONNX model")
    predict.add_argument("--top-k", type=int, default=5, help="classes per image")
    predict.add_argument("--batch-size", type=int, default=64, help="images per run")
    predict.add_argument("--output", default=None, help="write .csv or .json (default: print)")
    report = commands.add_parser("report", help=REPORT_HELP, description=REPORT_HELP)
    report.add_argument("--root", default=".", help="project root holding metrics/")
    return parser


def run_stage(
    stage: str, params_file: str, overrides: list[str], variant: dict[str, str] | None = None
) -> dict:
    """Validate params, run the stage, store its metrics; returns the metrics."""
    variant = variant or {}
    params = load_params(params_file, overrides)
    module = importlib.import_module(f"mfm.{stage}")
    metrics = module.run(params, **variant)
    if int(os.environ.get("RANK", 0)) != 0:  # torchrun: rank 0 alone writes results
        return metrics
    if getattr(module, "METRICS_PER_KEY", False):  # one stage, one file per classifier
        for key, values in metrics.items():
            write_json(metrics_file(stage, *variant.values(), key), values)
    else:
        write_json(metrics_file(stage, *variant.values()), metrics)
    return metrics


def run_bench(args: argparse.Namespace) -> dict:
    """The throughput benchmark: prints figures, writes no pipeline output."""
    from mfm import bench

    params = load_params(args.params, args.overrides)
    batch_size = args.batch_size or params.pretrain.batch_size
    if min(batch_size, args.steps, args.channels) < 1 or args.warmup < 0:
        raise UserError("bench: --batch-size, --steps and --channels must be >= 1, --warmup >= 0")
    return bench.run(params, batch_size, args.steps, args.warmup, args.channels)


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
        if args.stage == "bench":
            metrics = run_bench(args)
        else:
            variant = {name: getattr(args, name) for name in VARIANTS.get(args.stage, {})}
            metrics = run_stage(args.stage, args.params, args.overrides, variant)
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
