"""`benchmarks/bench_generation.py`: its fair GPT-2 baselines (the fused loss M2-GPT trains with, a preallocated
`StaticCache` beside `DynamicCache`), the verdicts that read them, and a raw JSON file that keeps every sample.
Tiny models (hidden 64, 2 layers); the end-to-end run trains in this process instead of four fresh ones."""

from __future__ import annotations

import contextlib
import io
import json
import statistics

import pytest
import torch

from benchmark_scripts import load_benchmark_script


bench = load_benchmark_script("bench_generation")


@pytest.fixture(scope="module")
def tiny_models():
    return {name: model.eval() for name, model in bench.build_models(64, quick=True).items()}


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_models):
    return tiny_models["gpt2"]


def test_gpt2_fused_loss_equals_transformers_loss_and_gradient(tiny_gpt2):
    check = bench.check_fused_loss(tiny_gpt2)
    assert 9.0 < check["plain_loss"] < 12.0  # about ln(50257) for a random model: a real loss, not zero
    assert check["loss_difference"] < 1e-5
    assert check["max_relative_gradient_difference"] < 1e-4


def test_static_cache_decodes_the_logits_and_tokens_of_dynamic_cache(tiny_gpt2):
    check = bench.check_static_cache(tiny_gpt2, batch=2, prompt_length=12, steps=6)
    assert check["same_tokens"]
    assert check["max_logit_difference"] < 1e-4
    assert torch.tensor(check["tokens"]).shape == (2, 6)


def test_greedy_decode_with_a_cache_equals_recomputing_the_whole_prefix(tiny_gpt2):
    """The reference both caches are held to: without a cache, every step sees the whole sequence."""
    prompt = torch.randint(0, tiny_gpt2.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    cache = bench.empty_gpt2_cache(bench.GPT2_STATIC, tiny_gpt2.config, 15)
    tokens, _ = bench.greedy_decode(tiny_gpt2, prompt, 5, cache)
    sequence = prompt
    with torch.no_grad():
        for _ in range(5):
            next_token = tiny_gpt2(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], 1)
    assert torch.equal(tokens, sequence[:, 10:])


def test_a_baseline_that_fails_its_check_stops_the_run(tiny_gpt2, monkeypatch):
    real = bench.check_static_cache
    monkeypatch.setattr(bench, "check_static_cache", lambda model: {**real(model), "same_tokens": False})
    with pytest.raises(SystemExit, match="StaticCache"):
        bench.check_baselines(tiny_gpt2)
    monkeypatch.setattr(bench, "check_static_cache", real)
    monkeypatch.setattr(bench, "gpt2_fused_loss", lambda model, ids: model(ids, labels=ids).loss * 1.01)
    with pytest.raises(SystemExit, match="fused loss"):
        bench.check_baselines(tiny_gpt2)


@pytest.mark.parametrize("name", ["gpt2", "gpt2-static-cache", "m2-gpt"])
def test_filled_caches_hold_the_context_and_decode_steps_are_each_timed(name, tiny_models):
    model = tiny_models["m2-gpt" if name == "m2-gpt" else "gpt2"]
    cache = bench.filled_cache(name, model, batch=2, context=20, steps=5)
    assert cache.get_seq_length() == 20
    if name == bench.GPT2_STATIC:  # preallocated for the steps to come
        assert type(cache).__name__ == "StaticCache" and cache.layers[0].keys.shape[2] == 25
    seconds = bench.decode_step_seconds(name, model, batch=2, context=20, steps=3)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)


def test_verdicts_read_the_fastest_gpt2_column():
    decode = {"m2-gpt": 12.0, "gpt2": 4.0, bench.GPT2_STATIC: 8.0}
    assert bench.fair_ratio(decode, bench.GPT2_DECODERS) == pytest.approx(1.5)
    decode = {"m2-gpt": 12.0, "gpt2": 10.0, bench.GPT2_STATIC: 8.0}
    assert bench.fair_ratio(decode, bench.GPT2_DECODERS) == pytest.approx(1.2)
    training = {"m2-gpt": 12.0, bench.GPT2_FUSED: 6.0, "gpt2": 3.0, bench.UNFUSED: 1.0}
    assert bench.fair_ratio(training, bench.GPT2_TRAINERS) == pytest.approx(2.0)
    assert bench.verdict("x", 1.5, 1.5)["pass"] and not bench.verdict("x", 1.49, 1.5)["pass"]


def test_tables_and_target_verdicts_compare_with_the_faster_gpt2(monkeypatch, capsys):
    """Fixed timings in which the non-default GPT-2 variant is the faster one (StaticCache in decoding, Transformers'
    loss in training): the ratios and the PASS/MISS verdicts must use it."""
    step = {"m2-gpt": 0.1, "gpt2": 0.4, bench.GPT2_STATIC: 0.2}
    monkeypatch.setattr(bench, "decode_step_seconds", lambda name, model, batch, context, steps: [step[name]] * steps)
    train = {"m2-gpt": 1.0, bench.GPT2_FUSED: 3.0, "gpt2": 1.6, bench.UNFUSED: 2.0}
    monkeypatch.setattr(bench, "training_in_fresh_process", lambda name, *args: {"warmup": [9.0], "steps": [train[name]] * 2})
    args = bench.parse_arguments(["--contexts", "8192", "--batches", "1", "--train-lengths", "4096"])
    rows, verdicts = bench.decode_rows({"m2-gpt": None, "gpt2": None}, args)
    assert rows[0]["ratio_to_faster_gpt2"] == pytest.approx(2.0)
    assert len(verdicts) == 1 and verdicts[0]["ratio"] == pytest.approx(2.0) and verdicts[0]["pass"]
    rows, verdicts = bench.training_rows(args)
    assert rows[0]["ratio_to_faster_gpt2"] == pytest.approx(1.6)
    assert rows[0]["ratio_fused_loss"] == pytest.approx(3.0)
    assert verdicts[0]["ratio"] == pytest.approx(1.6) and verdicts[0]["pass"]
    assert "MISS" not in capsys.readouterr().out


def test_sizes_given_with_quick_are_kept():
    args = bench.parse_arguments(["--quick", "--contexts", "16"])
    assert args.contexts == [16]
    assert args.train_lengths == bench.PRESETS["quick"]["train_lengths"]
    assert bench.parse_arguments([]).contexts == bench.PRESETS["full"]["contexts"]


def child_training_in_this_process(name: str, length: int, batch: int, repeats: int, quick: bool, warmup: int):
    """What `training_in_fresh_process` returns, without the cost of starting four Pythons: the child's printed
    samples, parsed the same way."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        bench.child_train(name, length, batch, repeats, quick, warmup)
    return json.loads(output.getvalue().strip().splitlines()[-1])


def test_quick_run_writes_every_sample_and_its_baseline_checks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "training_in_fresh_process", child_training_in_this_process)
    output = tmp_path / "generation.json"
    bench.main(["--quick", "--contexts", "16", "--batches", "2", "--decode-steps", "3", "--train-lengths", "32",
                "--train-tokens", "64", "--repeats", "2", "--train-warmup", "3", "--json", str(output)])
    assert "ratio to the faster GPT-2" in capsys.readouterr().out
    result = json.loads(output.read_text())
    checks = result["metadata"]["baseline_checks"]
    assert checks["static_cache"]["same_tokens"] and checks["fused_loss"]["loss_difference"] < 1e-5
    decode, training = result["results"]
    assert decode["kind"] == "decode" and training["kind"] == "training"
    assert set(decode["seconds_per_step_samples"]) == {"m2-gpt", "gpt2", bench.GPT2_STATIC}
    for name, rounds in decode["seconds_per_step_samples"].items():
        assert len(rounds) == 2 and all(len(steps) == 3 for steps in rounds)
        median_step = statistics.median(statistics.fmean(steps) for steps in rounds)
        assert decode["tokens_per_s"][name] == pytest.approx(2 / median_step)
    fastest = max(decode["tokens_per_s"][name] for name in bench.GPT2_DECODERS)
    assert decode["ratio_to_faster_gpt2"] == pytest.approx(decode["tokens_per_s"]["m2-gpt"] / fastest)
    assert set(training["seconds_per_step_samples"]) == {"m2-gpt", bench.GPT2_FUSED, bench.UNFUSED, "gpt2"}
    for name, samples in training["seconds_per_step_samples"].items():
        assert len(samples) == 2
        assert training["tokens_per_s"][name] == pytest.approx(2 * 32 / statistics.median(samples))
        assert len(training["warmup_seconds"][name]) == 3
    fastest = max(training["tokens_per_s"][name] for name in bench.GPT2_TRAINERS)
    assert training["ratio_to_faster_gpt2"] == pytest.approx(training["tokens_per_s"]["m2-gpt"] / fastest)


def test_decode_only_run_measures_no_training(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "training_in_fresh_process", lambda *args: pytest.fail("training was measured"))
    output = tmp_path / "generation.json"
    bench.main(["--quick", "--contexts", "16", "--batches", "1", "--decode-steps", "2", "--repeats", "1",
                "--parts", "decode", "--json", str(output)])
    result = json.loads(output.read_text())
    assert [row["kind"] for row in result["results"]] == ["decode"]
    assert result["metadata"]["arguments"]["parts"] == ["decode"]


def test_child_process_entry_point_prints_the_warmup_and_one_sample_per_repeat(capsys):
    bench.main(["--child-train", bench.GPT2_FUSED, "16", "1", "3", "1", "--quick"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(printed["steps"]) == 3 and len(printed["warmup"]) == 1
    assert all(s > 0 for s in printed["steps"] + printed["warmup"])


def test_timing_summary_keeps_every_sample():
    from benchmarks.bench_common import timing_summary

    assert timing_summary([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0,
                                                     "samples": [3.0, 1.0, 2.0, 10.0]}
    with pytest.raises(ValueError, match="at least one"):
        timing_summary([])
