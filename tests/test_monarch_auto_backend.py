"""Which multiply `MonarchLinear(backend="auto")` runs: the path `AUTO_BACKENDS` names for the input's device type
(the PyTorch path on CUDA, which `benchmarks/bench_gpu.py` measured faster than the Triton kernel on an H200), said
once in the log.

The tests run on the CPU, where Triton runs through its interpreter (`TRITON_INTERPRET=1`, set in conftest.py): mapping
the CPU to what CUDA maps to makes the CPU decide as a GPU would."""

import logging

import pytest
import torch

import m2_hf.monarch as monarch
from m2_hf import MonarchLinear

AUTO_LOG = "MonarchLinear(backend='auto') runs the"


@pytest.fixture
def fresh_log(monkeypatch, caplog):
    """A process that has not logged its choices yet, with the layer's INFO records captured."""
    monkeypatch.setattr(monarch, "_auto_choices_logged", set())
    caplog.set_level(logging.INFO, logger=monarch.logger.name)
    return caplog


def auto_messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith(AUTO_LOG)]


def count_triton_calls(monkeypatch) -> list[int]:
    calls = []
    real = monarch.monarch_multiply_triton

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(monarch, "monarch_multiply_triton", counting)
    return calls


def test_cuda_default_is_the_pytorch_path_and_triton_is_opt_in(monkeypatch, fresh_log):
    pytest.importorskip("triton")
    assert monarch.triton_supported(torch.zeros(1))  # the interpreter: Triton could run here
    monkeypatch.setitem(monarch.AUTO_BACKENDS, "cpu", monarch.AUTO_BACKENDS.get("cuda", "torch"))
    calls = count_triton_calls(monkeypatch)
    torch.manual_seed(0)
    layer = MonarchLinear(20, 36, 4)
    x = torch.randn(5, 20, requires_grad=True)
    expected = layer(x)
    expected.sum().backward()
    assert calls == []
    assert auto_messages(fresh_log) == ["MonarchLinear(backend='auto') runs the PyTorch multiply (two bmm) on cpu tensors."]

    layer.backend = "triton"
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    assert calls == [1]


def test_auto_runs_the_path_the_table_names(monkeypatch, fresh_log):
    pytest.importorskip("triton")
    monkeypatch.setitem(monarch.AUTO_BACKENDS, "cpu", "triton")
    calls = count_triton_calls(monkeypatch)
    torch.manual_seed(0)
    layer = MonarchLinear(20, 36, 4)
    x = torch.randn(5, 20)
    layer(x)
    assert calls == [1]
    assert auto_messages(fresh_log) == ["MonarchLinear(backend='auto') runs the Triton kernel on cpu tensors."]
    layer.backend = "torch"
    layer(x)
    assert calls == [1]


def test_the_choice_is_logged_once_per_process_and_device_type(fresh_log):
    layers = [MonarchLinear(16, 16, 4), MonarchLinear(16, 32, 2)]
    for _ in range(3):
        for layer in layers:
            layer(torch.randn(2, 16))
    assert len(auto_messages(fresh_log)) == 1
    MonarchLinear(16, 16, 4, backend="torch")(torch.randn(2, 16))  # a forced path is no choice: nothing to say
    monarch._log_auto_choice_once("cuda", "torch")
    monarch._log_auto_choice_once("cuda", "torch")
    messages = auto_messages(fresh_log)
    assert len(messages) == 2
    assert messages[1].startswith("MonarchLinear(backend='auto') runs the PyTorch multiply (two bmm) on cuda tensors")
    assert "backend='triton'" in messages[1] and "bench_gpu.py" in messages[1]


def test_a_measured_triton_default_without_triton_says_why_it_runs_pytorch(monkeypatch, fresh_log):
    monkeypatch.setitem(monarch.AUTO_BACKENDS, "cuda", "triton")
    monarch._log_auto_choice_once("cuda", "torch")
    assert auto_messages(fresh_log) == [
        "MonarchLinear(backend='auto') runs the PyTorch multiply (two bmm) on cuda tensors (Triton is not installed)."
    ]
