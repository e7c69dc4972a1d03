"""MFM vs scratch fine-tune at one budget, over seeds: top-1 and minutes per stage.

The default job's budget is a trade-off between accuracy and minutes on a laptop; this
measures one point of it. It runs the main job's own commands (pretrain, then finetune
from the encoder and from scratch) with the given -S overrides into
results/budget-trial/<name>/seed<k>/, then prints each seed's row, mean ± std over seeds and
the seed-paired MFM - scratch difference with its 95 % interval, and writes them to
results/budget-trial/<name>/summary.json. Needs data/prepared (`dvc repro prepare`).

    python workflow/scripts/budget_trial.py --name patch8 --seeds 0 1 2 \\
        -S model.patch_size=8 -S finetune.epochs=5 -S 'finetune.crop_scale=[0.8,1.0]'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from mfm.data.meta import META_FILE
from mfm.paths import PREPARED_DIR, RunDirs, metrics_file
from mfm.seed_stats import format_difference, format_summary, paired_difference, summary

ROOT = Path("results/budget-trial")


def run_stage(stage: list[str], out: Path, seed: int, overrides: list[str]) -> float:
    """One `python -m mfm` stage into ``out``; its wall seconds (the log goes next to it)."""
    command = [sys.executable, "-m", "mfm", *stage, "--out", str(out), "-S", f"runtime.seed={seed}"]
    for override in overrides:
        command += ["-S", override]
    log = out / f"{'_'.join(stage).replace('--', '')}.log"
    start = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def run_seed(name: str, seed: int, overrides: list[str]) -> dict[str, float]:
    """Pretrain, fine-tune from MFM and from scratch for one seed: top-1s and minutes."""
    out = ROOT / name / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    minutes = {
        "pretrain_min": run_stage(["pretrain"], out, seed, overrides) / 60,
        "finetune_mfm_min": run_stage(["finetune", "--init", "mfm"], out, seed, overrides) / 60,
        "finetune_scratch_min": run_stage(["finetune", "--init", "scratch"], out, seed, overrides)
        / 60,
    }
    metrics_dir = RunDirs(out).metrics
    top1 = {
        init: json.loads(metrics_file("finetune", init, metrics_dir=metrics_dir).read_text())[
            "top1"
        ]
        for init in ("mfm", "scratch")
    }
    return {"mfm_top1": top1["mfm"], "scratch_top1": top1["scratch"], **minutes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="folder under results/budget-trial/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if not (PREPARED_DIR / META_FILE).is_file():
        sys.exit(f"{PREPARED_DIR} is missing: run `dvc repro prepare` first")
    data_overrides = [item for item in args.overrides if item.lstrip("~").startswith("data.")]
    if data_overrides:
        sys.exit(
            f"{', '.join(data_overrides)}: the trial trains on data/prepared as it is; set data.* "
            "in params.yaml and run `dvc repro prepare` first"
        )
    rows = {}
    for seed in args.seeds:
        rows[seed] = run_seed(args.name, seed, args.overrides)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[seed].items()))
    columns = next(iter(rows.values())).keys()
    stats = {column: summary([row[column] for row in rows.values()]) for column in columns}
    mfm = [row["mfm_top1"] for row in rows.values()]
    scratch = [row["scratch_top1"] for row in rows.values()]
    stats["mfm_minus_scratch"] = paired_difference(mfm, scratch)
    for column in columns:
        print(f"{column}: {format_summary(stats[column])}")
    print(f"mfm - scratch (paired by seed): {format_difference(stats['mfm_minus_scratch'])}")
    result = {"overrides": args.overrides, "seeds": args.seeds, "per_seed": rows, **stats}
    (ROOT / args.name / "summary.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
