"""`benchmarks/bench_converted.py`: its training step is the one `Trainer` runs, and its verdicts check issue 19's
targets in both modes."""

from __future__ import annotations

import json

import torch
from transformers import BertForSequenceClassification

from benchmark_scripts import load_benchmark_script

bench = load_benchmark_script("bench_converted")


def test_the_training_step_updates_the_weights_with_trainers_fused_adamw():
    torch.manual_seed(0)
    model = bench.build("minilm", "mlp", BertForSequenceClassification, 4)
    batch = bench.batch_of(model.config, 2, 8, labels=True)
    step = bench.training_call(model, batch)
    assert step.optimizer.defaults["fused"] is True
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step()
    changed = [name for name, p in model.named_parameters() if not torch.equal(before[name], p)]
    assert any("blkdiag" in name for name in changed), changed
    assert "classifier.weight" in changed


def rows(mode: str, speedup: float) -> list[dict]:
    base = {"shape": "minilm", "mode": mode, "nblocks": 4, "batch": 32, "length": 56}
    return [{**base, "variant": "dense", "speedup_vs_dense": 1.0},
            {**base, "variant": "mlp", "speedup_vs_dense": speedup}]


def test_the_mlp_training_step_is_checked_against_the_1_3x_goal():
    verdicts = bench.evaluate_targets(rows("training", 1.29))
    assert [(v["target"], v["verdict"]) for v in verdicts] == [("speed-up >= 1.3x (issue 19)", "MISS")]
    assert "training 32x56" in verdicts[0]["layer"]
    assert [v["verdict"] for v in bench.evaluate_targets(rows("training", 1.31))] == ["PASS"]


def test_inference_keeps_its_goal_and_the_never_slower_check():
    verdicts = bench.evaluate_targets(rows("inference", 1.1))
    assert [(v["target"], v["verdict"]) for v in verdicts] == [
        ("speed-up >= 1.2x (issue 19)", "MISS"), ("never slower than dense (>= 1.0x)", "PASS")]


def test_quick_run_keeps_every_sample_of_every_variant(tmp_path, capsys):
    out = tmp_path / "converted.json"
    assert bench.main(["--quick", "--modes", "training", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [row["variant"] for row in record["results"]] == list(bench.VARIANTS)
    assert all(len(row["samples"]) == 2 for row in record["results"])
    assert any(v["layer"].startswith("minilm mlp") for v in record["targets"])
    assert "Summary:" in capsys.readouterr().out
