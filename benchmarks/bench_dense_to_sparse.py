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
seed's sparse model minus that seed's dense model.

The offline Rotten Tomatoes splits are buckets of about 50 films each, so a split's accuracy carries film-level noise
that more seeds do not average out. `--folds 0 1 2` runs every seed on several test folds (other films in the test and
validation splits, `--offline_test_fold`); the verdict then takes the mean over the folds of each fold's mean.
`--rows-from` adds the runs of earlier `--json` files (for example fold 0's, whose folders are gone):

    python benchmarks/bench_dense_to_sparse.py --root runs/folds --seeds 42 --settings mlp --folds 1 2 3 4 \\
        --refine_steps 256 --rows-from benchmarks/results/dense_to_sparse_seeds_refine256_mlp_cpu_2026-12-03.json

Training speed-up is the dense model's training time over the sparse model's, in the same run of `dense_to_sparse.py`
(for a reused dense model, timed in another process: compare the speed-ups of first settings for side-by-side
figures). Runs that shared the machine (two folds side by side) time each other's load, not the models: for the
training step's speed on a quiet machine, read `bench_converted.py --modes training --train-batch 32 --length 56`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

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


def fold_root(root: Path, fold: int) -> Path:
    """Where the runs of one test fold live: fold 0 (the splits of every recorded run) in ``root`` itself."""
    return root if fold == 0 else root / f"fold{fold}"


def fold_arguments(fold: int) -> list[str]:
    return [] if fold == 0 else ["--offline_test_fold", str(fold)]


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


def run_all(root: Path, seeds: list[int], settings: list[str], extra: list[str], folds: Sequence[int] = (0,)) -> None:
    for fold in folds:
        _run_fold(fold_root(root, fold), seeds, settings, extra + fold_arguments(fold))


def _run_fold(root: Path, seeds: list[int], settings: list[str], extra: list[str]) -> None:
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


def paired_row(seed: int, setting: str, rows: list[dict], fold: int = 0) -> dict:
    """One seed and setting (on one test fold): the dense and sparse figures side by side."""
    by_model = {row["model"]: row for row in rows}
    dense, sparse = by_model["dense"], by_model["monarch"]
    return {
        "seed": seed, "setting": setting, "fold": fold,
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
    """Per setting: accuracy, points against dense (paired by seed and fold) and training speed-up over all runs.

    Where the runs span several test folds, also ``across_folds``: the spread of the folds' mean points (each fold's
    splits are other films, an independent sample; a fold counts once however many seeds ran on it), and
    ``folds``: each fold's own figures."""
    summary = {}
    for setting in dict.fromkeys(row["setting"] for row in rows):
        chosen = [row for row in rows if row["setting"] == setting]
        keys = ["dense_accuracy", "sparse_accuracy", "points", "training_speedup"]
        if all("test_points" in row for row in chosen):
            keys += ["dense_test_accuracy", "sparse_test_accuracy", "test_points"]
        summary[setting] = {key: spread([row[key] for row in chosen]) for key in keys}
        folds = sorted({row.get("fold", 0) for row in chosen})
        if len(folds) > 1:
            per_fold = {fold: {key: spread([row[key] for row in chosen if row.get("fold", 0) == fold])
                               for key in keys} for fold in folds}
            summary[setting]["folds"] = per_fold
            summary[setting]["across_folds"] = {
                key: spread([figures[key]["mean"] for figures in per_fold.values()])
                for key in keys if key.endswith("points")
            }
    return summary


def verdicts(summary: dict) -> list[dict]:
    checks = []
    for setting, figures in summary.items():
        goals = SETTINGS.get(setting, {})
        if goals.get("max_points_lost") is not None:
            # The test split, where scored, took no part in choosing settings: it decides; over several test folds,
            # the mean of the folds' means.
            split = "test" if "test_points" in figures else "validation"
            across = figures.get("across_folds", figures)
            # Rounded: a difference of accuracies is not exact in floating point (-0.5 may come out as -0.5000000004).
            points = round(across["test_points" if split == "test" else "points"]["mean"], 9)
            limit = -goals["max_points_lost"]
            which = (f"mean over {len(figures['folds'])} test folds of the {split}" if "folds" in figures
                     else f"mean {split}")
            checks.append({"setting": setting, "target": f"{which} accuracy within {goals['max_points_lost']} "
                           "points of dense", "value": points, "verdict": "PASS" if points >= limit else "MISS"})
        if goals.get("min_speedup") is not None:
            speedup = figures["training_speedup"]["mean"]
            checks.append({"setting": setting, "target": f"training >= {goals['min_speedup']}x dense (the runs' own "
                           "timings: a speed figure only where each run had the machine to itself)",
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
    folded = {setting: f for setting, f in summary.items() if "folds" in f}
    if folded:
        lines += ["", "| setting | test fold | seeds | validation points | test points |", "|---|---|---|---|---|"]
        for setting, f in folded.items():
            for fold, figures in f["folds"].items():
                test = spread_cell(figures["test_points"], digits=2) if "test_points" in figures else "-"
                lines.append(f"| {setting} | {fold} | {figures['points']['n']} | "
                             f"{spread_cell(figures['points'], digits=2)} | {test} |")
            across = f["across_folds"]
            test = spread_cell(across["test_points"], digits=2) if "test_points" in across else "-"
            lines.append(f"| {setting} | mean of {across['points']['n']} folds | - | "
                         f"{spread_cell(across['points'], digits=2)} | {test} |")
    return "\n".join(lines)


def collect(root: Path, seeds: list[int], settings: list[str], folds: Sequence[int] = (0,)) -> list[dict]:
    rows = []
    for fold in folds:
        for seed in seeds:
            for setting in settings:
                folder = run_folder(fold_root(root, fold), seed, setting)
                results = finished_rows(folder)
                if len(results) < 2:
                    raise SystemExit(f"seed {seed}, {setting}, test fold {fold}: no finished run in {folder}.")
                rows.append(paired_row(seed, setting, results, fold))
    return rows


def recorded_rows(paths: Sequence[Path], settings: list[str]) -> list[dict]:
    """The runs of earlier raw files of this script (``--json``) for ``settings``; a run without a fold is fold 0."""
    rows = []
    for path in paths:
        for row in json.loads(path.read_text())["results"]:
            if row["setting"] in settings:
                rows.append({**row, "fold": row.get("fold", 0), "recorded_in": str(path)})
    return rows


def without_repeats(rows: list[dict]) -> list[dict]:
    seen = {}
    for row in rows:
        key = (row["fold"], row["seed"], row["setting"])
        if key in seen:
            raise SystemExit(f"seed {key[1]}, {key[2]}, test fold {key[0]} appears twice (in "
                             f"{seen[key]} and {row.get('recorded_in', 'the runs')}): keep one.")
        seen[key] = row.get("recorded_in", "the runs")
    return rows


def parse_arguments(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="Folder of the runs (kept; finished runs are read).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--settings", nargs="+", default=["mlp", "all"], choices=sorted(SETTINGS))
    parser.add_argument("--json", type=Path, help="Write every run's figures and the summary here.")
    parser.add_argument("--report-only", action="store_true", help="Summarise the finished runs; run nothing.")
    parser.add_argument("--folds", type=int, nargs="+", default=[0],
                        help="Test folds of the offline Rotten Tomatoes data (--offline_test_fold; fold 0, the "
                             "recorded splits, in --root, fold K in --root/foldK): every seed runs on every fold.")
    parser.add_argument("--rows-from", type=Path, nargs="+", default=[], metavar="JSON",
                        help="Also summarise the runs of earlier --json files of this script (runs not kept on disk).")
    return parser.parse_known_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args, extra = parse_arguments(argv)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
            "load_average_at_start": load_average(), "seeds": args.seeds, "settings": args.settings,
            "folds": args.folds, "rows_from": [str(path) for path in args.rows_from],
            "example_arguments": DEFAULT_EXAMPLE_ARGUMENTS + extra}
    if not args.report_only:
        run_all(args.root, args.seeds, args.settings, extra, args.folds)
    rows = without_repeats(collect(args.root, args.seeds, args.settings, args.folds)
                           + recorded_rows(args.rows_from, args.settings))
    summary = summarise(rows)
    checks = verdicts(summary)
    print(markdown(summary))
    for check in checks:
        print(f"  {check['verdict']:<4}  {check['setting']:<5} {check['target']} ({check['value']:.2f})")
    if args.json:
        write_json(args.json, {**meta, "load_average_at_end": load_average(), "summary": summary}, rows, checks)


if __name__ == "__main__":
    main()
