"""`benchmarks/bench_gpu.py`: the script runs end to end (tiny sizes, on the CPU), and a Triton kernel that fails or
disagrees with the PyTorch path is recorded as such and left out of the timings instead of ending the run."""

from __future__ import annotations

import json

import pytest
import torch

import m2_hf
import m2_hf.monarch
from benchmark_scripts import load_benchmark_script

bench = load_benchmark_script("bench_gpu")
CPU = torch.device("cpu")


def test_quick_run_writes_every_section_with_its_samples(tmp_path, capsys):
    path = tmp_path / "bench_gpu.json"
    bench.main(["--quick", "--device", "cpu", "--repeats", "2", "--json", str(path)])
    report = json.loads(path.read_text())

    assert [row["dtype"] for row in report["monarch_checks"]] == ["fp32", "bf16", "fp32"]
    assert all(row["torch_vs_fp64"] < 1e-2 for row in report["monarch_checks"])
    layer_rows = {(row["dtype"], row["mode"]): row for row in report["monarch_layer"]}
    assert set(layer_rows) == {(d, m) for d in ("bf16", "fp32") for m in ("fwd", "fwdbwd")}
    for (_, mode), row in layer_rows.items():
        assert len(row["linear_samples_ms"]) >= 2 and row["monarch4_torch"] > 0
        assert "monarch4_densified" in row  # inference through the cached weight, training through the densified one
    converted = report["converted"]
    assert [(row["mode"], row["dtype"]) for row in converted] == [
        ("inference", "bf16"), ("inference", "fp32"), ("training", "fp32+bf16-autocast"), ("training", "fp32")]
    for row in converted:
        for variant in ("dense", "mlp", "all"):
            samples = row[f"{variant}_samples_ms"]
            assert min(samples) <= row[f"{variant}_ms"] <= max(samples)
        assert row["mlp_speedup"] == pytest.approx(row["dense_ms"] / row["mlp_ms"])
    assert {row["length"] for row in report["long_context"]} == {128, 256}
    profiles = report["profile"]
    assert [(row["length"], row["dtype"]) for row in profiles] == [(128, "bf16"), (128, "fp32")]
    for row in profiles:
        self_times = [op["self_us"] for op in row["ops"]]
        assert self_times == sorted(self_times, reverse=True) and 0 < sum(self_times) <= row["self_us_total"]
        assert not any(op["kernel"] for op in row["ops"])  # a CPU run: every op counts once
        assert any("fft" in op["name"] for op in row["ops"])  # the long convolutions are there
    assert "converted BERT shapes vs dense" in capsys.readouterr().out


@pytest.mark.parametrize("failure", ["raises", "disagrees"])
def test_a_failing_or_wrong_triton_kernel_is_recorded_and_not_trusted(failure, monkeypatch):
    def broken_kernel(x, w1, w2):
        if failure == "raises":
            raise RuntimeError("PTX compilation failed")
        return m2_hf.monarch.monarch_multiply(x, w1, w2) * 1.1

    monkeypatch.setattr(m2_hf.monarch, "monarch_multiply_triton", broken_kernel)
    rows = bench.check_monarch_layer(CPU, 8, ["torch", "triton"])

    assert not bench.triton_agrees_everywhere(rows)
    for row in rows:
        assert row["triton_agrees"] is False and row["torch_vs_fp64"] < 1e-2
        if failure == "raises":
            assert row["triton_error"] == "RuntimeError: PTX compilation failed"
        else:
            assert row["triton_vs_torch_out"] == pytest.approx(0.1, rel=0.2)


def test_a_correct_kernel_agrees(monkeypatch):
    monkeypatch.setattr(m2_hf.monarch, "monarch_multiply_triton", m2_hf.monarch.monarch_multiply)
    rows = bench.check_monarch_layer(CPU, 8, ["torch", "triton"])
    assert bench.triton_agrees_everywhere(rows)


def test_compiled_training_pass_records_a_compiler_failure_and_goes_on(tmp_path, monkeypatch):
    compile = torch.compile

    def failing_for_converted_models(function, backend):
        if not any(isinstance(m, m2_hf.MonarchLinear) for m in function.__self__.modules()):
            return compile(function, backend=backend)

        def fails_when_called(*args, **kwargs):  # as a compiler does: on the first call
            raise RuntimeError("InductorError: no kernel for this op\nmore detail")

        return fails_when_called

    monkeypatch.setattr(torch, "compile", failing_for_converted_models)
    path = tmp_path / "bench_gpu.json"
    bench.main(["--quick", "--device", "cpu", "--repeats", "2", "--sections", "converted", "--converted-modes",
                "training-fp32", "--converted-compile", "eager", "--json", str(path)])
    (row,) = json.loads(path.read_text())["converted"]
    assert row["compile"] == "eager" and row["mode"] == "training" and row["dense_ms"] > 0
    assert row["mlp_error"] == row["all_error"] == "RuntimeError: InductorError: no kernel for this op"
    assert "mlp_speedup" not in row


def test_compiled_long_context_pass(tmp_path):
    path = tmp_path / "bench_gpu.json"
    bench.main(["--quick", "--device", "cpu", "--repeats", "2", "--sections", "long_context", "--model-dtypes", "fp32",
                "--long-context-compile", "eager", "--json", str(path)])
    rows = json.loads(path.read_text())["long_context"]
    assert [row["length"] for row in rows] == [128, 256]
    assert all(row["compile"] == "eager" and row["m2_ms"] > 0 and row["bert_ms"] > 0 for row in rows)


def test_long_context_times_the_conv1d_short_filter_beside_the_shifted_one(tmp_path):
    path = tmp_path / "bench_gpu.json"
    bench.main(["--quick", "--device", "cpu", "--repeats", "2", "--sections", "long_context", "--model-dtypes", "fp32",
                "--m2-conv1d-short-filter", "--json", str(path)])
    rows = json.loads(path.read_text())["long_context"]
    assert rows and all(row["m2_conv1d_ms"] > 0 for row in rows)
    assert all(row["shifted_over_conv1d"] == row["m2_conv1d_ms"] / row["m2_ms"] for row in rows)


def test_conv1d_short_filters_run_the_module_with_the_same_outputs():
    torch.manual_seed(0)
    model = bench.m2_bert(64, 32, 2, 64)
    ids = torch.randint(5, 1000, (2, 64))
    with torch.inference_mode():
        shifted = model(input_ids=ids).last_hidden_state
    calls = []
    bench.run_short_filters_as_conv1d(model)
    for mixer in [m for m in model.modules() if hasattr(m, "short_filter")]:
        # Counted by wrapping forward, not by a hook of our own, which would itself send the filter through Conv1d.
        module_forward = mixer.short_filter.forward
        mixer.short_filter.forward = lambda z, forward=module_forward: calls.append(z.shape) or forward(z)
    with torch.inference_mode():
        through_conv1d = model(input_ids=ids).last_hidden_state
    assert len(calls) == 2
    torch.testing.assert_close(through_conv1d, shifted, rtol=1e-5, atol=1e-5)
