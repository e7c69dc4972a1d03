"""The study stage: named variants x seeds, each against random init / scratch of its seed.

Every variant (``study.variants``: a name and its params overrides, e.g. a pretext, a mask
radius or a loss gamma) ran pretrain -> linprobe -> finetune -> robustness once per seed
under ``results/study/runs/<variant>/seed<k>/``; a scratch classifier per seed lives under
``runs/scratch/seed<k>/``. This stage collects them into ``metrics/study.json``: per variant
and column the mean +- std over seeds and the seed-paired difference to the baseline with a
95 % interval (:mod:`mfm.seed_stats`), the first variant head to head with each other one
(paired the same way), plus a Markdown table, a chart with error bars, the training curves
and the reconstructions (first seed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mfm.config import STUDY_BASELINE, Params
from mfm.errors import UserError
from mfm.figures import plt, save_figure
from mfm.io import atomic_path
from mfm.paths import STUDY_DIR, STUDY_RUNS_DIR, study_run_dir
from mfm.report import metric_value
from mfm.seed_stats import format_difference, format_summary, paired_difference, summary

log = logging.getLogger("mfm.study")

BASELINE = "random init / scratch"
PIXELS = "raw pixels (no encoder)"
TABLE_FILE, CHART_FILE = "study.md", "study.png"
CURVES_FILE, RECONSTRUCTIONS_FILE = "curves.png", "reconstructions.png"
LOSS_TSV = Path("live/plots/metrics/train/loss.tsv")  # dvclive's per-step training loss
# column -> (stage, the variant's (group, key), the baseline's (group, key)); the baseline of
# finetune is the seed's scratch run, of the others the variant's own run (same seed).
COLUMNS: dict[str, tuple[str, tuple[str, str], tuple[str, str]]] = {
    "probe_top1": ("linprobe", ("pretrained", "logreg_top1"), ("random", "logreg_top1")),
    "knn_top1": ("linprobe", ("pretrained", "knn_top1"), ("random", "knn_top1")),
    "finetune_top1": ("finetune", ("mfm", "top1"), ("scratch", "top1")),
    "clean_error": ("robustness", ("mfm", "clean_error"), ("scratch", "clean_error")),
    "mce": ("robustness", ("mfm", "mce"), ("scratch", "mce")),
}
PIXEL_COLUMNS = {"probe_top1": ("pixels", "logreg_top1"), "knn_top1": ("pixels", "knn_top1")}
LABELS = {
    "probe_top1": "linear probe top-1",
    "knn_top1": "k-NN top-1",
    "finetune_top1": "fine-tune top-1",
    "clean_error": "clean error (%)",
    "mce": "mCE (scratch = 100)",
}
CHART = ("finetune_top1", "probe_top1", "mce")


def _value(stage: str, where: tuple[str, str], root: Path) -> float:
    value = metric_value(stage, where, root)
    if value is None:
        raise UserError(
            f"{root / 'metrics'} lacks {stage} results ({where[0]} {where[1]}); run the study "
            "first: dvc repro study/dvc.yaml (or snakemake study)"
        )
    return value


def _baseline_root(stage: str, variant_root: Path, scratch_root: Path) -> Path:
    return scratch_root if stage == "finetune" else variant_root


def collect(params: Params, runs_dir: Path = STUDY_RUNS_DIR) -> dict[str, Any]:
    """Per-seed values of every variant and of the baseline, summarised over seeds.

    The baseline's random-init probe and scratch robustness are scored in every variant's
    run (identical for a seed); the first variant's are taken.
    """
    seeds, names = params.study.seeds, list(params.study.variants)
    per_seed: dict[str, dict[str, list[float]]] = {name: {c: [] for c in COLUMNS} for name in names}
    baseline: dict[str, list[float]] = {c: [] for c in COLUMNS}
    pixels: dict[str, list[float]] = {c: [] for c in PIXEL_COLUMNS}
    for seed in seeds:
        scratch_root = study_run_dir(STUDY_BASELINE, seed, runs_dir)
        for name in names:
            root = study_run_dir(name, seed, runs_dir)
            for column, (stage, ours, theirs) in COLUMNS.items():
                per_seed[name][column].append(_value(stage, ours, root))
                if name == names[0]:
                    base_root = _baseline_root(stage, root, scratch_root)
                    baseline[column].append(_value(stage, theirs, base_root))
        first = study_run_dir(names[0], seed, runs_dir)
        for column, where in PIXEL_COLUMNS.items():
            value = metric_value("linprobe", where, first)
            if value is not None:
                pixels[column].append(value)
    variants = {}
    for name in names:
        variants[name] = {
            "overrides": params.study.variants[name],
            **{column: summary(values) for column, values in per_seed[name].items()},
            "difference": {
                column: paired_difference(values, baseline[column])
                for column, values in per_seed[name].items()
            },
        }
    study: dict[str, Any] = {
        "seeds": list(seeds),
        "variants": variants,
        "baseline": {column: summary(values) for column, values in baseline.items()},
        "versus_first": versus_first(per_seed),
    }
    if all(len(values) == len(seeds) for values in pixels.values()):
        study["pixels"] = {column: summary(values) for column, values in pixels.items()}
    return study


def versus_first(per_seed: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """The first variant minus each other one, paired by seed: the head-to-head answer
    ("frequency or spatial masking?") that two differences to the baseline only imply."""
    names = list(per_seed)
    if len(names) < 2:
        return {}
    first = per_seed[names[0]]
    return {
        "reference": names[0],
        "differences": {
            name: {
                column: paired_difference(first[column], per_seed[name][column])
                for column in COLUMNS
            }
            for name in names[1:]
        },
    }


def _row(label: str, cells: list[str]) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def table(study: dict[str, Any]) -> str:
    """Markdown: mean +- std per variant, the baseline and raw pixels; then each variant's
    seed-paired difference to the baseline with its 95 % interval; then the first variant
    minus each other one, paired the same way."""
    seeds = len(study["seeds"])
    labels = " | ".join(LABELS[c] for c in COLUMNS)
    header = f"| variant | {labels} |"
    rule = "|---" * (len(COLUMNS) + 1) + "|"
    lines = [f"Mean ± std over {seeds} seed(s):", "", header, rule]
    rows = [*study["variants"].items(), (BASELINE, study["baseline"])]
    if "pixels" in study:
        rows.append((PIXELS, study["pixels"]))
    for name, row in rows:
        lines.append(_row(name, [format_summary(row[c]) if c in row else "" for c in COLUMNS]))
    lines += ["", f"Difference to {BASELINE}, paired by seed (mean [95 % CI]):", ""]
    lines += [header, rule]
    for name, row in study["variants"].items():
        lines.append(_row(name, [format_difference(row["difference"][c]) for c in COLUMNS]))
    versus = study.get("versus_first") or {}
    if versus:
        first = versus["reference"]
        lines += ["", f"`{first}` minus each other variant, paired by seed (mean [95 % CI]):", ""]
        lines += [f"| | {labels} |", rule]
        for name, row in versus["differences"].items():
            lines.append(_row(f"{first} - {name}", [format_difference(row[c]) for c in COLUMNS]))
    return "\n".join(lines) + "\n"


def chart(study: dict[str, Any], path: Path, title: str) -> None:
    """Bars per variant (error bars: std over seeds) for each charted column; the baseline
    as a dashed line with its std as a band."""
    names = list(study["variants"])
    fig, axes = plt.subplots(1, len(CHART), figsize=(4 * len(CHART), 3.6))
    for ax, column in zip(axes, CHART, strict=True):
        rows = [study["variants"][name][column] for name in names]
        means = [row["mean"] for row in rows]
        spread = [row["std"] or 0.0 for row in rows]
        bars = ax.bar(names, means, yerr=spread, capsize=4, color="tab:blue")
        ax.bar_label(bars, fmt="%.1f", fontsize=8, label_type="center", color="white")
        base = study["baseline"][column]
        ax.axhline(base["mean"], color="tab:red", linestyle="--", label=BASELINE)
        if base["std"]:
            low, high = base["mean"] - base["std"], base["mean"] + base["std"]
            ax.axhspan(low, high, color="tab:red", alpha=0.15)
        ax.set_title(LABELS[column])
        ax.tick_params(axis="x", labelrotation=30)
        low = min([*(m - s for m, s in zip(means, spread, strict=True)), base["mean"]])
        ax.set_ylim(max(0.0, low - 10), None)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{title} (error bars: std over {len(study['seeds'])} seed(s))")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _loss_curve(tsv: Path) -> tuple[list[int], list[float]]:
    if not tsv.is_file():
        raise UserError(f"{tsv} not found; run the study first: dvc repro study/dvc.yaml")
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
    return [int(r[0]) for r in rows], [float(r[1]) for r in rows]


def curves(params: Params, runs_dir: Path, path: Path) -> None:
    """Training loss per step at the first seed: pretraining by variant, fine-tuning by
    variant and scratch, from the dvclive curves the stages logged."""
    seed = params.study.seeds[0]
    fig, (pre, fine) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name in params.study.variants:
        root = study_run_dir(name, seed, runs_dir)
        pre.plot(*_loss_curve(root / "pretrain" / LOSS_TSV), label=name)
        fine.plot(*_loss_curve(root / "finetune" / "mfm" / LOSS_TSV), label=f"{name} init")
    scratch = study_run_dir(STUDY_BASELINE, seed, runs_dir) / "finetune" / "scratch" / LOSS_TSV
    fine.plot(*_loss_curve(scratch), label="scratch", color="black", linestyle="--")
    pre.set(title=f"pretraining loss (seed {seed})", xlabel="step", yscale="log")
    fine.set(title=f"fine-tuning loss (seed {seed})", xlabel="step")
    for ax in (pre, fine):
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def reconstructions(params: Params, runs_dir: Path, path: Path) -> None:
    """The pretrain stages' corruption/reconstruction figures at the first seed, stacked."""
    images = []
    for name in params.study.variants:
        root = study_run_dir(name, params.study.seeds[0], runs_dir)
        figure = root / "pretrain" / "reconstruction.png"
        if not figure.is_file():
            raise UserError(f"{figure} not found; run the study first: dvc repro study/dvc.yaml")
        images.append(plt.imread(figure))
    fig, axes = plt.subplots(len(images), 1, figsize=(8, 2.6 * len(images)), squeeze=False)
    for ax, image in zip(axes[:, 0], images, strict=True):
        ax.imshow(image)
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def run(
    params: Params, study_dir: str | Path = STUDY_DIR, runs_dir: str | Path = STUDY_RUNS_DIR
) -> dict[str, Any]:
    """Collect, write the table and the figures; returns ``metrics/study.json``."""
    study_dir, runs_dir = Path(study_dir), Path(runs_dir)
    study = collect(params, runs_dir)
    text = table(study)
    with atomic_path(study_dir / TABLE_FILE) as tmp:
        tmp.write_text(text)
    chart(study, study_dir / CHART_FILE, f"Study on {params.data.dataset}")
    curves(params, runs_dir, study_dir / CURVES_FILE)
    reconstructions(params, runs_dir, study_dir / RECONSTRUCTIONS_FILE)
    log.info("study:\n%s", text)
    return study
