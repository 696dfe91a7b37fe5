"""`benchmarks/bench_minilm_conversion.py`'s evaluation protocol: the calibration, development and test sentences are
disjoint, deterministic and of the documented sizes, and the settings grid covers every combination."""

import argparse

from benchmark_scripts import load_benchmark_script


def load_benchmark():
    return load_benchmark_script("bench_minilm_conversion")


def test_splits_are_disjoint_deterministic_and_sized():
    bench = load_benchmark()
    splits = bench.sentence_splits(9000)
    assert len(splits["calibration"]) == 9000 and len(splits["dev"]) > 1000 and len(splits["test"]) > 1000
    for first, second in (("calibration", "dev"), ("calibration", "test"), ("dev", "test")):
        assert not set(splits[first]) & set(splits[second]), (first, second)
    assert bench.sentence_splits(9000) == splits
    # Shuffled: the first snippets of the training films' snippets would come from a handful of films.
    training = list(bench.rotten_tomatoes_offline()["train"]["text"])
    assert set(splits["calibration"]) <= set(training) and splits["calibration"] != training[:9000]


def test_settings_grid_is_every_combination():
    bench = load_benchmark()
    grid = bench.fit_settings_grid(argparse.Namespace(damping=[1e-3, 1e-2], alternations=[5], first_factor_steps=[5, 10]))
    assert len(grid) == 4 and {"damping": 1e-2, "alternations": 5, "first_factor_steps": 10} in grid


def test_refine_grid_runs_no_refinement_once():
    bench = load_benchmark()
    grid = bench.refine_grid(argparse.Namespace(refine_steps=[0, 64, 128], refine_learning_rate=[1e-4, 3e-4]))
    assert grid == [(0, 0.0), (64, 1e-4), (64, 3e-4), (128, 1e-4), (128, 3e-4)]
