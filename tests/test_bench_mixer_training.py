"""`benchmarks/bench_mixer_training.py`: the two variants it times are the two code paths (the hand-written training
functions and the composed ops), and every step is kept."""

from __future__ import annotations


import pytest
import torch

import m2_hf.m2_mixer as mixer_module

from benchmark_scripts import load_benchmark_script


bench = load_benchmark_script("bench_mixer_training")


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
