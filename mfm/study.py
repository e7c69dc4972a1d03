"""The study stage: MFM next to the restoration pretexts, the paper's unified frequency view.

Each pretext ran pretrain -> linprobe -> finetune -> robustness under
``results/study/<pretext>/`` (``--out``), all scored against the main job's scratch
classifier. This stage collects their metrics into ``metrics/study.json``, a Markdown table
and a bar chart (fine-tune top-1, probe top-1, mCE by pretext).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, get_args

from mfm.config import Params, PretrainParams
from mfm.errors import UserError
from mfm.figures import plt
from mfm.io import atomic_path
from mfm.paths import STUDY_DIR
from mfm.report import metric_value

log = logging.getLogger("mfm.study")

PRETEXTS: tuple[str, ...] = get_args(PretrainParams.model_fields["pretext"].annotation)
BASELINE = "random init / scratch"
TABLE_FILE, CHART_FILE = "study.md", "study.png"
CURVES_FILE, RECONSTRUCTIONS_FILE = "curves.png", "reconstructions.png"
LOSS_TSV = Path("live/plots/metrics/train/loss.tsv")  # dvclive's per-step training loss
# column -> (stage, (run, key)) for a pretext's run and for the baseline
COLUMNS: dict[str, tuple[str, tuple[str, str], tuple[str, str]]] = {
    "probe_top1": ("linprobe", ("pretrained", "logreg_top1"), ("random", "logreg_top1")),
    "knn_top1": ("linprobe", ("pretrained", "knn_top1"), ("random", "knn_top1")),
    "finetune_top1": ("finetune", ("mfm", "top1"), ("scratch", "top1")),
    "clean_error": ("robustness", ("mfm", "clean_error"), ("scratch", "clean_error")),
    "mce": ("robustness", ("mfm", "mce"), ("scratch", "mce")),
}
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


def collect(study_dir: Path = STUDY_DIR, main_root: Path = Path(".")) -> dict[str, Any]:
    """{pretext: {column: value}} plus the baseline row; the scratch classifier is the main
    job's (its fine-tune metrics live there), its robustness and the random-init probe are
    scored in every pretext's run (identical numbers; the first is taken)."""
    rows = {}
    for pretext in PRETEXTS:
        root = study_dir / pretext
        rows[pretext] = {col: _value(s, ours, root) for col, (s, ours, _) in COLUMNS.items()}
    first = study_dir / PRETEXTS[0]
    baseline = {}
    for column, (stage, _, theirs) in COLUMNS.items():
        baseline[column] = _value(stage, theirs, main_root if stage == "finetune" else first)
    return {"pretexts": rows, "baseline": baseline}


def table(study: dict[str, Any]) -> str:
    """Markdown: one row per pretext and one for the baseline."""
    header = "| pretext | " + " | ".join(LABELS[c] for c in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    named = [*study["pretexts"].items(), (BASELINE, study["baseline"])]
    for name, row in named:
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def chart(study: dict[str, Any], path: Path, title: str) -> None:
    """Bars per pretext for each charted column, the baseline as a dashed line."""
    names = list(study["pretexts"])
    fig, axes = plt.subplots(1, len(CHART), figsize=(4 * len(CHART), 3.4))
    for ax, column in zip(axes, CHART, strict=True):
        values = [study["pretexts"][name][column] for name in names]
        bars = ax.bar(names, values, color="tab:blue")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.axhline(study["baseline"][column], color="tab:red", linestyle="--", label=BASELINE)
        ax.set_title(LABELS[column])
        low = min([*values, study["baseline"][column]])
        ax.set_ylim(max(0.0, low - 10), None)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _loss_curve(tsv: Path) -> tuple[list[int], list[float]]:
    if not tsv.is_file():
        raise UserError(f"{tsv} not found; run the study first: dvc repro study/dvc.yaml")
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
    return [int(r[0]) for r in rows], [float(r[1]) for r in rows]


def curves(study_dir: Path, main_root: Path, path: Path) -> None:
    """Training loss per step: pretraining by pretext, fine-tuning by init (scratch: the main
    job's), from the dvclive curves the stages logged."""
    fig, (pre, fine) = plt.subplots(1, 2, figsize=(11, 3.6))
    for pretext in PRETEXTS:
        pre.plot(*_loss_curve(study_dir / pretext / "pretrain" / LOSS_TSV), label=pretext)
        tuned = study_dir / pretext / "finetune" / "mfm" / LOSS_TSV
        fine.plot(*_loss_curve(tuned), label=f"{pretext} init")
    scratch = main_root / "results" / "finetune" / "scratch" / LOSS_TSV
    fine.plot(*_loss_curve(scratch), label="scratch", color="black", linestyle="--")
    pre.set(title="pretraining loss (frequency space)", xlabel="step", yscale="log")
    fine.set(title="fine-tuning loss", xlabel="step")
    for ax in (pre, fine):
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def reconstructions(study_dir: Path, path: Path) -> None:
    """The pretrain stages' corruption/reconstruction figures, one per pretext, stacked."""
    images = []
    for pretext in PRETEXTS:
        figure = study_dir / pretext / "pretrain" / "reconstruction.png"
        if not figure.is_file():
            raise UserError(f"{figure} not found; run the study first: dvc repro study/dvc.yaml")
        images.append(plt.imread(figure))
    fig, axes = plt.subplots(len(images), 1, figsize=(8, 2.6 * len(images)))
    for ax, image in zip(axes, images, strict=True):
        ax.imshow(image)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run(
    params: Params, study_dir: str | Path = STUDY_DIR, main_root: str | Path = "."
) -> dict[str, Any]:
    """Collect, write the table and the figures; returns ``metrics/study.json``."""
    study_dir, main_root = Path(study_dir), Path(main_root)
    study = collect(study_dir, main_root)
    text = table(study)
    with atomic_path(study_dir / TABLE_FILE) as tmp:
        tmp.write_text(text)
    chart(study, study_dir / CHART_FILE, f"Pretext study on {params.data.dataset}")
    curves(study_dir, main_root, study_dir / CURVES_FILE)
    reconstructions(study_dir, study_dir / RECONSTRUCTIONS_FILE)
    log.info("study:\n%s", text)
    return study
