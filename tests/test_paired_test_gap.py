"""`benchmarks/paired_test_gap.py`: the accuracy gap between a dense model and its student on one test split, with a
paired bootstrap of the examples."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark_scripts import load_benchmark_script

gap = load_benchmark_script("paired_test_gap")


def test_the_gap_and_its_paired_bootstrap():
    labels = np.array([0, 1] * 500)
    dense = labels.copy()
    sparse = labels.copy()
    dense[:30] = 1 - labels[:30]  # 30 examples only the student gets right
    sparse[100:150] = 1 - labels[100:150]  # 50 only the dense model gets right
    result = gap.paired_gap(labels, dense, sparse, samples=4000)
    assert result["gap_points"] == pytest.approx((950 - 970) / 10)
    assert (result["only_dense_right"], result["only_sparse_right"]) == (50, 30)
    low, high = result["bootstrap_95_points"]
    assert low < result["gap_points"] < high
    # Paired: the sd of a mean of per-example differences (-1, 0, 1), not of two independent accuracies.
    difference = (sparse == labels).astype(float) - (dense == labels)
    assert result["bootstrap_sd_points"] == pytest.approx(100 * difference.std() / np.sqrt(1000), rel=0.1)
    same = gap.paired_gap(labels, dense, dense, samples=100)
    assert same["gap_points"] == 0 and same["bootstrap_95_points"] == [0.0, 0.0]


def test_bad_input_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="equally long"):
        gap.paired_gap(np.zeros(3), np.zeros(3), np.zeros(4))
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        gap.main([str(tmp_path)])
    assert "has no monarch model folder" in capsys.readouterr().err


def test_a_run_that_reused_its_dense_model_is_scored_against_it(tmp_path):
    def model_folder(path):
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")

    model_folder(tmp_path / "mlp" / "dense")
    model_folder(tmp_path / "all" / "monarch")
    (tmp_path / "all" / "results.json").write_text(
        '[{"model": "dense", "reused_from": "%s"}, {"model": "monarch"}]' % (tmp_path / "mlp"))
    assert gap.model_folders(tmp_path / "all") == (tmp_path / "mlp" / "dense", tmp_path / "all" / "monarch")
    (tmp_path / "all" / "results.json").write_text('[{"model": "dense"}, {"model": "monarch"}]')
    with pytest.raises(ValueError, match="has no dense model folder"):
        gap.model_folders(tmp_path / "all")
