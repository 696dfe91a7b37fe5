"""`benchmarks/bench_dense_to_sparse.py`: which runs it starts (one dense model per seed, finished runs read, a run
stopped after its dense part resumed from it) and how it pairs and summarises their figures."""

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("bench_dense_to_sparse")


def results(dense_accuracy: float, sparse_accuracy: float, dense_seconds: float = 100.0,
            sparse_seconds: float = 80.0, reused: bool = False, test: tuple = ()) -> list[dict]:
    dense = {"model": "dense", "accuracy": dense_accuracy, "f1": 0.5, "train_seconds": dense_seconds}
    if reused:
        dense["reused_from"] = "elsewhere"
    sparse = {"model": "monarch", "accuracy": sparse_accuracy, "f1": 0.5, "train_seconds": sparse_seconds,
              "teacher_logits_seconds": 3.0, "conversion": {"seconds": 9.0}, "train_examples": 10}
    if test:
        dense["test_accuracy"], sparse["test_accuracy"] = test
    return [dense, sparse]


def write_run(bench, root: Path, seed: int, setting: str, rows: list[dict]) -> None:
    folder = bench.run_folder(root, seed, setting)
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(rows))


def test_accuracy_is_paired_by_seed_and_summarised(bench, tmp_path):
    write_run(bench, tmp_path, 1, "mlp", results(0.80, 0.797, 100.0, 50.0))
    write_run(bench, tmp_path, 2, "mlp", results(0.90, 0.893, 100.0, 100.0))
    rows = bench.collect(tmp_path, [1, 2], ["mlp"])
    assert [round(row["points"], 6) for row in rows] == [-0.3, -0.7]
    summary = bench.summarise(rows)["mlp"]
    assert summary["points"]["mean"] == pytest.approx(-0.5)
    assert summary["points"]["std"] == pytest.approx(0.2828427, rel=1e-6)
    assert summary["training_speedup"]["mean"] == pytest.approx(1.5)
    assert (summary["sparse_accuracy"]["min"], summary["sparse_accuracy"]["max"]) == (0.797, 0.893)
    assert "| mlp | validation | 2 |" in bench.markdown({"mlp": summary})
    assert "test" not in summary and "| test |" not in bench.markdown({"mlp": summary})


def test_the_held_out_test_split_decides_where_every_run_scored_it(bench, tmp_path):
    write_run(bench, tmp_path, 1, "mlp", results(0.80, 0.80, test=(0.84, 0.83)))
    write_run(bench, tmp_path, 2, "mlp", results(0.90, 0.90, test=(0.82, 0.82)))
    summary = bench.summarise(bench.collect(tmp_path, [1, 2], ["mlp"]))
    assert summary["mlp"]["points"]["mean"] == 0.0
    assert summary["mlp"]["test_points"]["mean"] == pytest.approx(-0.5)
    assert summary["mlp"]["dense_test_accuracy"]["mean"] == pytest.approx(0.83)
    check = bench.verdicts(summary)[0]
    assert (check["value"], check["verdict"]) == (pytest.approx(-0.5), "PASS") and "test" in check["target"]
    assert "| mlp | test | 2 | 0.8300" in bench.markdown(summary)
    write_run(bench, tmp_path, 3, "mlp", results(0.80, 0.79))  # one run without the test split: validation decides
    summary = bench.summarise(bench.collect(tmp_path, [1, 2, 3], ["mlp"]))
    assert "test_points" not in summary["mlp"] and "validation" in bench.verdicts(summary)[0]["target"]


def test_verdicts_follow_the_issue_goals(bench):
    def summary(points, speedup):
        return {"points": {"mean": points}, "training_speedup": {"mean": speedup}}

    checks = bench.verdicts({"mlp": summary(-0.5, 1.3), "all": summary(-1.6, 0.9)})
    assert [(c["setting"], c["verdict"]) for c in checks] == [("mlp", "PASS"), ("mlp", "PASS"), ("all", "MISS")]
    checks = bench.verdicts({"mlp": summary(-0.51, 1.29)})
    assert [c["verdict"] for c in checks] == ["MISS", "MISS"]


def test_one_dense_model_per_seed_and_finished_runs_are_not_repeated(bench, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(bench.subprocess, "run", lambda command, **kwargs: started.append(command))
    write_run(bench, tmp_path, 7, "mlp", results(0.8, 0.8))  # finished
    write_run(bench, tmp_path, 8, "mlp", results(0.8, 0.8)[:1])  # stopped after its dense part
    bench.run_all(tmp_path, [7, 8, 9], ["mlp", "all"], ["--num_train_epochs", "3"])

    def option(command, name):
        return command[command.index(name) + 1] if name in command else None

    runs = [(option(c, "--seed"), Path(option(c, "--output_dir")).name, option(c, "--dense_run")) for c in started]
    assert runs == [
        ("7", "seed7-all", str(tmp_path / "seed7-mlp")),
        ("8", "seed8-mlp", str(tmp_path / "seed8-mlp")),  # resumes from its own dense model
        ("8", "seed8-all", str(tmp_path / "seed8-mlp")),
        ("9", "seed9-mlp", None),  # trains the dense model of seed 9
        ("9", "seed9-all", str(tmp_path / "seed9-mlp")),
    ]
    assert all(option(c, "--num_train_epochs") == "3" and c[0] == sys.executable for c in started)
    assert option(started[0], "--targets") == "all" and option(started[1], "--targets") == "mlp"


def test_missing_runs_are_named(bench, tmp_path):
    write_run(bench, tmp_path, 1, "mlp", results(0.8, 0.8)[:1])
    with pytest.raises(SystemExit, match="seed 1, mlp, test fold 0: no finished run"):
        bench.collect(tmp_path, [1], ["mlp"])


def test_test_folds_run_in_their_own_folders_with_their_fold(bench, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(bench.subprocess, "run", lambda command, **kwargs: started.append(command))
    bench.run_all(tmp_path, [7], ["mlp"], ["--refine_steps", "8"], folds=[0, 3])
    folds = [(c[c.index("--output_dir") + 1], c[c.index("--offline_test_fold") + 1] if "--offline_test_fold" in c
              else None) for c in started]
    assert folds == [(str(tmp_path / "seed7-mlp"), None), (str(tmp_path / "fold3" / "seed7-mlp"), "3")]
    assert all("--refine_steps" in c for c in started)


def test_each_test_fold_counts_once_in_the_verdict(bench, tmp_path):
    # Fold 0: two seeds at -1.0 point on test; fold 1: one seed at +0.2. Over the runs the mean is -0.6 (a miss);
    # over the folds' means it is -0.4 (within 0.5 points).
    write_run(bench, tmp_path, 1, "mlp", results(0.80, 0.80, test=(0.84, 0.83)))
    write_run(bench, tmp_path, 2, "mlp", results(0.80, 0.80, test=(0.84, 0.83)))
    write_run(bench, tmp_path / "fold1", 1, "mlp", results(0.80, 0.79, test=(0.80, 0.802)))
    rows = bench.collect(tmp_path, [1, 2], ["mlp"], folds=[0]) + bench.collect(tmp_path, [1], ["mlp"], folds=[1])
    summary = bench.summarise(rows)["mlp"]
    assert summary["test_points"]["mean"] == pytest.approx(-0.6)
    assert summary["across_folds"]["test_points"]["mean"] == pytest.approx(-0.4)
    assert summary["across_folds"]["points"]["mean"] == pytest.approx(-0.5)
    assert summary["folds"][1]["test_points"]["n"] == 1
    (check,) = [c for c in bench.verdicts({"mlp": summary}) if "accuracy" in c["target"]]
    assert (check["value"], check["verdict"]) == (pytest.approx(-0.4), "PASS") and "2 test folds" in check["target"]
    table = bench.markdown({"mlp": summary})
    assert "| mlp | 1 | 1 | -1.00" in table and "| mlp | mean of 2 folds | - |" in table


def test_runs_of_earlier_raw_files_join_the_summary_once(bench, tmp_path):
    write_run(bench, tmp_path, 1, "mlp", results(0.80, 0.80, test=(0.84, 0.83)))
    recorded = tmp_path / "earlier.json"
    earlier = [bench.paired_row(5, "mlp", results(0.80, 0.81, test=(0.84, 0.84))),
               bench.paired_row(5, "all", results(0.80, 0.78))]
    del earlier[0]["fold"]  # raw files written before folds existed: fold 0
    bench.write_json(recorded, {}, earlier, [])
    rows = bench.recorded_rows([recorded], ["mlp"])
    assert [(row["seed"], row["fold"], row["setting"]) for row in rows] == [(5, 0, "mlp")]
    summary = bench.summarise(bench.without_repeats(bench.collect(tmp_path, [1], ["mlp"]) + rows))["mlp"]
    assert summary["points"]["mean"] == pytest.approx(0.5) and "folds" not in summary
    with pytest.raises(SystemExit, match="seed 5, mlp, test fold 0 appears twice"):
        bench.without_repeats(rows + rows)
