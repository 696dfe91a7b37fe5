#!/usr/bin/env python
"""Dense-to-sparse fine-tuning over several seeds: `examples/dense_to_sparse.py` once per seed and sparse setting,
then the mean and spread of each setting's accuracy against the dense model of the same seed.

For each seed the first setting fine-tunes the dense baseline; the others reuse it (`--dense_run`), so every setting
of a seed is compared with the same dense model, trained once. Runs already finished in `--root` are read, not
repeated (a run stopped after its dense part resumes from it), so the script can be stopped and started again.

    python benchmarks/bench_dense_to_sparse.py --root runs/d2s-seeds --seeds 42 43 44 --settings mlp all \\
        --json benchmarks/results/dense_to_sparse_seeds_cpu_DATE.json

Options that this script does not know go to every `dense_to_sparse.py` run (for example `--distill_alpha 0.7` or
`--num_train_epochs 3`); by default the runs use the full Rotten Tomatoes training data and the setting chosen on the
validation split of seed 42 (benchmarks/RESULTS.md): the calibrated conversion of the fine-tuned dense model, then
fine-tuning with the task loss and the head-feature distillation (weight 10, no logit distillation), and score the
held-out test split too (`--do_predict`), which then decides the verdicts. Accuracy differences are paired: each
seed's sparse model minus that seed's dense model. Training
speed-up is the dense model's training time over the sparse model's, in the same run of `dense_to_sparse.py` (for
a reused dense model, timed in another process: compare the speed-ups of first settings for side-by-side figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from bench_common import cpu_model, load_average, log, write_json

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "dense_to_sparse.py"
DEFAULT_EXAMPLE_ARGUMENTS = ["--conversion_method", "calibrated", "--max_train_samples", "100000",
                             "--convert_from", "finetuned", "--distill", "--distill_alpha", "0",
                             "--distill_feature_weight", "10", "--do_predict", "--densify", "false"]
# Each setting: its dense_to_sparse.py options and the goals of issue 19 (accuracy points lost at most, training
# speed-up at least).
SETTINGS = {
    "mlp": {"arguments": ["--targets", "mlp", "--nblocks", "4"], "max_points_lost": 0.5, "min_speedup": 1.3},
    "all": {"arguments": ["--targets", "all", "--nblocks", "4"], "max_points_lost": 1.5, "min_speedup": None},
}


def run_folder(root: Path, seed: int, setting: str) -> Path:
    return root / f"seed{seed}-{setting}"


def finished_rows(folder: Path) -> list[dict]:
    results = folder / "results.json"
    return json.loads(results.read_text()) if results.is_file() else []


def example_command(root: Path, seed: int, setting: str, first_setting: str, extra: list[str]) -> list[str]:
    """The dense_to_sparse.py command of one run: the seed's first setting trains the dense model, unless an
    earlier attempt already did (then it reuses its own dense part)."""
    folder = run_folder(root, seed, setting)
    dense_source = run_folder(root, seed, first_setting)
    command = [sys.executable, str(EXAMPLE), *DEFAULT_EXAMPLE_ARGUMENTS, *SETTINGS[setting]["arguments"], *extra,
               "--seed", str(seed), "--output_dir", str(folder)]
    if setting != first_setting or finished_rows(folder):
        command += ["--dense_run", str(dense_source)]
    return command


def run_all(root: Path, seeds: list[int], settings: list[str], extra: list[str]) -> None:
    for seed in seeds:
        for setting in settings:
            folder = run_folder(root, seed, setting)
            if len(finished_rows(folder)) >= 2:
                log(f"seed {seed}, {setting}: finished earlier, read from {folder}")
                continue
            command = example_command(root, seed, setting, settings[0], extra)
            log(f"seed {seed}, {setting}: {' '.join(command)}")
            folder.mkdir(parents=True, exist_ok=True)
            with (root / f"seed{seed}-{setting}.log").open("w") as output:
                subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, check=True)


def paired_row(seed: int, setting: str, rows: list[dict]) -> dict:
    """One seed and setting: the dense and sparse figures side by side."""
    by_model = {row["model"]: row for row in rows}
    dense, sparse = by_model["dense"], by_model["monarch"]
    return {
        "seed": seed, "setting": setting,
        "dense_accuracy": dense["accuracy"], "sparse_accuracy": sparse["accuracy"],
        "points": 100 * (sparse["accuracy"] - dense["accuracy"]),
        "dense_f1": dense.get("f1"), "sparse_f1": sparse.get("f1"),
        "dense_train_seconds": dense["train_seconds"], "sparse_train_seconds": sparse["train_seconds"],
        "training_speedup": dense["train_seconds"] / sparse["train_seconds"],
        "dense_reused": "reused_from" in dense,
        "teacher_logits_seconds": sparse.get("teacher_logits_seconds", 0.0),
        "conversion_seconds": sparse.get("conversion", {}).get("seconds"),
        "train_examples": sparse.get("train_examples"),
        **test_figures(dense, sparse),
    }


def test_figures(dense: dict, sparse: dict) -> dict:
    """The held-out test split's accuracy (`--do_predict`), where both models were scored on it."""
    if "test_accuracy" not in dense or "test_accuracy" not in sparse:
        return {}
    return {"dense_test_accuracy": dense["test_accuracy"], "sparse_test_accuracy": sparse["test_accuracy"],
            "test_points": 100 * (sparse["test_accuracy"] - dense["test_accuracy"])}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(rows: list[dict]) -> dict:
    """Per setting: accuracy, points against dense (paired by seed) and training speed-up over the seeds."""
    summary = {}
    for setting in dict.fromkeys(row["setting"] for row in rows):
        chosen = [row for row in rows if row["setting"] == setting]
        keys = ["dense_accuracy", "sparse_accuracy", "points", "training_speedup"]
        if all("test_points" in row for row in chosen):
            keys += ["dense_test_accuracy", "sparse_test_accuracy", "test_points"]
        summary[setting] = {key: spread([row[key] for row in chosen]) for key in keys}
    return summary


def verdicts(summary: dict) -> list[dict]:
    checks = []
    for setting, figures in summary.items():
        goals = SETTINGS.get(setting, {})
        if goals.get("max_points_lost") is not None:
            # The test split, where scored, took no part in choosing settings: it decides.
            split = "test" if "test_points" in figures else "validation"
            # Rounded: a difference of accuracies is not exact in floating point (-0.5 may come out as -0.5000000004).
            points = round(figures["test_points" if split == "test" else "points"]["mean"], 9)
            limit = -goals["max_points_lost"]
            checks.append({"setting": setting, "target": f"mean {split} accuracy within {goals['max_points_lost']} "
                           "points of dense", "value": points, "verdict": "PASS" if points >= limit else "MISS"})
        if goals.get("min_speedup") is not None:
            speedup = figures["training_speedup"]["mean"]
            checks.append({"setting": setting, "target": f"training >= {goals['min_speedup']}x dense",
                           "value": speedup, "verdict": "PASS" if speedup >= goals["min_speedup"] else "MISS"})
    return checks


def spread_cell(figures: dict, digits: int = 4, unit: str = "") -> str:
    """``mean ± std [min, max]`` of one figure of ``spread``."""
    return (f"{figures['mean']:.{digits}f}{unit} ± {figures['std']:.{digits}f} "
            f"[{figures['min']:.{digits}f}, {figures['max']:.{digits}f}]")


def markdown(summary: dict) -> str:
    lines = ["| setting | split | seeds | dense accuracy | sparse accuracy | points vs dense (paired) | "
             "training speed-up |", "|---|---|---|---|---|---|---|"]
    for setting, f in summary.items():
        speedup = spread_cell(f["training_speedup"], digits=2, unit="x")
        for split, prefix in (("validation", ""), ("test", "test_")):
            if f"{prefix}points" in f:
                lines.append(f"| {setting} | {split} | {f[prefix + 'points']['n']} | "
                             f"{spread_cell(f['dense_' + prefix + 'accuracy'])} | "
                             f"{spread_cell(f['sparse_' + prefix + 'accuracy'])} | "
                             f"{spread_cell(f[prefix + 'points'], digits=2)} | {speedup} |")
    return "\n".join(lines)


def collect(root: Path, seeds: list[int], settings: list[str]) -> list[dict]:
    rows = []
    for seed in seeds:
        for setting in settings:
            results = finished_rows(run_folder(root, seed, setting))
            if len(results) < 2:
                raise SystemExit(f"seed {seed}, {setting}: no finished run in {run_folder(root, seed, setting)}.")
            rows.append(paired_row(seed, setting, results))
    return rows


def parse_arguments(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="Folder of the runs (kept; finished runs are read).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--settings", nargs="+", default=["mlp", "all"], choices=sorted(SETTINGS))
    parser.add_argument("--json", type=Path, help="Write every run's figures and the summary here.")
    parser.add_argument("--report-only", action="store_true", help="Summarise the finished runs; run nothing.")
    return parser.parse_known_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args, extra = parse_arguments(argv)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
            "load_average_at_start": load_average(), "seeds": args.seeds, "settings": args.settings,
            "example_arguments": DEFAULT_EXAMPLE_ARGUMENTS + extra}
    if not args.report_only:
        run_all(args.root, args.seeds, args.settings, extra)
    rows = collect(args.root, args.seeds, args.settings)
    summary = summarise(rows)
    checks = verdicts(summary)
    print(markdown(summary))
    for check in checks:
        print(f"  {check['verdict']:<4}  {check['setting']:<5} {check['target']} ({check['value']:.2f})")
    if args.json:
        write_json(args.json, {**meta, "load_average_at_end": load_average(), "summary": summary}, rows, checks)


if __name__ == "__main__":
    main()
