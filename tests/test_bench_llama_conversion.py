"""`benchmarks/bench_llama_conversion.py --quick` end to end: it pretrains a tiny Llama, converts it with both methods
at both presets, and writes a JSON whose figures hang together."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conversion.offline_text import stdlib_sentences

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick benchmark's JSON, text table and work folder; nblocks 1 (exact) and 2."""
    folder = tmp_path_factory.mktemp("llama-bench")
    # Disjoint real text, smaller than the example's full corpus so that the run stays short.
    (folder / "train.txt").write_text("\n".join(stdlib_sentences("calibration", 3000)) + "\n")
    (folder / "validation.txt").write_text("\n".join(stdlib_sentences("evaluation", 600)) + "\n")
    output = folder / "results" / "llama.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_llama_conversion.py"), "--quick",
               "--model-dir", str(folder / "llama"), "--work-dir", str(folder / "work"),
               "--train-file", str(folder / "train.txt"), "--validation-file", str(folder / "validation.txt"),
               "--nblocks", "1", "2", "--json", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(output.read_text()), output.with_suffix(".txt").read_text(), folder


def test_trained_model_and_every_conversion_have_finite_validation_perplexity(quick_run):
    result, table, _ = quick_run
    baselines = result["baselines"]
    assert all(math.isfinite(value) and value > 1 for value in baselines.values()), baselines
    assert baselines["original"] < baselines["untrained"]
    assert result["training"]["validation_perplexity"] == pytest.approx(baselines["original"], rel=1e-5)
    rows = result["conversions"]
    assert [(r["method"], r["target"], r["nblocks"]) for r in rows] == [
        (method, target, nblocks) for method in ("closed-form", "calibrated") for target in ("mlp", "all")
        for nblocks in (1, 2)
    ]
    for row in rows:
        assert math.isfinite(row["validation_perplexity"]) and row["validation_perplexity"] > 1, row
        assert row["model_type"] == "monarch_llama"
        assert row["rectangular_layers"] > 0  # gate/up/down, and the grouped-query key/value projections
        assert row["name"] in table


def test_presets_and_nblocks_shrink_as_expected(quick_run):
    rows = {(r["method"], r["target"], r["nblocks"]): r for r in quick_run[0]["conversions"]}
    for method in ("closed-form", "calibrated"):
        for target in ("mlp", "all"):
            assert rows[method, target, 2]["parameters"] < rows[method, target, 2]["parameters_before"]
            assert rows[method, target, 2]["parameters"] < rows[method, target, 1]["parameters"]
        assert rows[method, "all", 2]["layers"] > rows[method, "mlp", 2]["layers"]
        assert rows[method, "all", 2]["parameters"] < rows[method, "mlp", 2]["parameters"]


def test_nblocks_1_closed_form_is_the_original_model(quick_run):
    result = quick_run[0]
    for row in result["conversions"]:
        if row["method"] == "closed-form" and row["nblocks"] == 1:
            assert row["mean_relative_weight_error"] < 1e-5
            assert row["validation_perplexity"] == pytest.approx(result["baselines"]["original"], rel=1e-5)
            assert abs(row["kl_to_original"]) < 1e-6 and row["top1_agreement"] == 1


def test_more_blocks_move_the_next_token_distributions_away_from_the_original(quick_run):
    rows = {(r["method"], r["target"], r["nblocks"]): r for r in quick_run[0]["conversions"]}
    for (method, target, nblocks), row in rows.items():
        assert 0 <= row["top1_agreement"] <= 1
        if nblocks == 2:
            assert row["kl_to_original"] > max(0.0, rows[method, target, 1]["kl_to_original"])


def test_dense_round_trip_equals_its_monarch_model(quick_run):
    trip = quick_run[0]["dense_round_trip"]
    assert trip["of"] == "closed-form-all-nb2"
    assert trip["architecture"] == "LlamaForCausalLM" and trip["model_type"] == "llama"
    assert trip["validation_perplexity"] == pytest.approx(trip["monarch_validation_perplexity"], rel=1e-5)
    assert trip["max_abs_logit_difference"] < 1e-4


def test_speed_keeps_every_sample_of_every_model(quick_run):
    result = quick_run[0]
    recipe = result["training"]["recipe"]
    speed = result["speed"]
    expected = {"original"} | {r["name"] for r in result["conversions"] if r["method"] == "closed-form"}
    assert set(speed["forward"]["seconds"]) == set(speed["decode"]["tokens_per_second"]) == expected
    for figures in speed["forward"]["seconds"].values():
        assert len(figures["samples"]) == recipe["speed_rounds"] and min(figures["samples"]) > 0
        assert figures["min"] <= figures["median"] <= figures["max"]
    for figures in speed["decode"]["tokens_per_second"].values():
        assert len(figures["samples"]) == recipe["decode_rounds"] and min(figures["samples"]) > 0
    assert speed["forward"]["speedup_vs_original"]["original"] == 1
    assert speed["decode"]["new_tokens"] == recipe["new_tokens"]


def test_calibration_text_comes_from_the_training_split_only(quick_run):
    result, _, folder = quick_run
    calibration = (folder / "work" / "calibration.txt").read_text().splitlines()
    training = set((folder / "train.txt").read_text().splitlines())
    validation = set((folder / "validation.txt").read_text().splitlines())
    assert len(calibration) == result["data"]["calibration_lines"] > 0
    assert set(calibration) <= training and not set(calibration) & validation
    assert not (folder / "work" / "converted").exists()  # converted folders are removed unless --keep-folders
