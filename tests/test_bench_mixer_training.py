"""`benchmarks/bench_mixer_training.py`: the two variants it times are the two code paths (the hand-written training
functions and the composed ops), and every step is kept."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import m2_hf.m2_mixer as mixer_module

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_mixer_training", ROOT / "benchmarks" / "bench_mixer_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()


@pytest.mark.parametrize("bidirectional", [False, True])
def test_variants_are_the_function_and_the_composed_paths(monkeypatch, bidirectional):
    calls = []
    apply = mixer_module._LongConvolution.apply
    monkeypatch.setattr(mixer_module._LongConvolution, "apply", lambda *args: calls.append(1) or apply(*args))
    mixer = bench.build_mixer(length=24, hidden=16, bidirectional=bidirectional)
    u = torch.randn(1, 24, 16, requires_grad=True)
    with bench.variant("composed"):
        bench.step_seconds(mixer, u)
    assert not calls
    with bench.variant("functions"):
        bench.step_seconds(mixer, u)
    assert calls


def test_every_step_is_kept():
    row = bench.measure(length=24, hidden=16, bidirectional=False, rounds=3, steps=2)
    assert {name: len(samples) for name, samples in row["samples_s"].items()} == {"functions": 6, "composed": 6}
    assert row["ratio"] == pytest.approx(row["median_s"]["composed"] / row["median_s"]["functions"])
