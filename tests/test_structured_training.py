"""The training paths of structured layers: training through the weight densified in the autograd graph gives the
structured multiply's outputs and gradients, and "measured" / "auto" time the two paths without touching the real
step's gradients, hooks or random numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import m2_hf.monarch
from m2_hf import BlockdiagLinear, MonarchLinear, measured_training_paths, set_structured_training_path
from test_structured_inference import SHAPES, slowed
from test_structured_inference import measured as timings  # noqa: F401  (a fixture: clean tables, timings taken)

CLASSES = [MonarchLinear, BlockdiagLinear]


def structured_twin(layer):
    """A copy of ``layer`` that trains through the structured multiply."""
    twin = copy.deepcopy(layer)
    twin.training_path = "structured"
    return twin


def count_densifications(layer, monkeypatch) -> list:
    calls = []
    densified = layer._densified
    monkeypatch.setattr(layer, "_densified", lambda factors: calls.append(1) or densified(factors))
    return calls


def weighted_sum(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()


def gradients(layer, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every gradient (input, parameters) of ``weighted_sum(layer(x))`` on fresh copies."""
    layer = copy.deepcopy(layer)
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    weighted_sum(out).backward()
    grads = {name: param.grad for name, param in layer.named_parameters()}
    return out.detach(), {"input": x.grad, **grads}


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("in_features, out_features, nblocks", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_dense_training_path_gives_the_structured_outputs_and_gradients(
    cls, in_features, out_features, nblocks, bias, monkeypatch
):
    torch.manual_seed(0)
    layer = cls(in_features, out_features, nblocks, bias=bias, dtype=torch.float64, training_path="dense")
    structured = structured_twin(layer)
    x = torch.randn(3, 5, in_features, dtype=torch.float64)
    calls = count_densifications(layer, monkeypatch)
    out, grads = gradients(layer, x)
    assert calls == [1]  # the copy in `gradients` shares the patched method
    expected_out, expected = gradients(structured, x)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    assert grads.keys() == expected.keys()
    for name in expected:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-12, atol=1e-12, msg=name)
    assert layer._dense_weight_cache is None  # nothing kept between steps: the factors change at each one


@pytest.mark.parametrize("cls", CLASSES)
def test_dense_training_path_runs_no_structured_multiply_on_the_activations(cls, monkeypatch):
    layer = cls(16, 32, 4, training_path="dense")
    rows = []
    multiply = layer._multiply
    monkeypatch.setattr(layer, "_multiply", lambda x, *args: rows.append(x.shape[0]) or multiply(x, *args))
    layer(torch.randn(40, 16)).sum().backward()
    assert rows == [16]  # only the identity, to densify the factors
    layer.training_path = "structured"
    layer(torch.randn(40, 16)).sum().backward()
    assert rows == [16, 40]


def test_dense_training_path_under_autocast_and_second_order_gradients():
    torch.manual_seed(0)
    layer = MonarchLinear(16, 16, 4, training_path="dense")
    structured = structured_twin(layer)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, reference = layer(x), structured(x)
    assert out.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2)
    # Double backward (e.g. a gradient penalty) goes through the densification too.
    x64 = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    for candidate in (layer, structured):
        candidate.double()
    first = [torch.autograd.grad(c(x64).square().sum(), x64, create_graph=True)[0] for c in (layer, structured)]
    second = [torch.autograd.grad(g.square().sum(), c.blkdiag1)[0] for g, c in zip(first, (layer, structured))]
    torch.testing.assert_close(second[0], second[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_measured_training_path_keeps_the_faster_and_touches_nothing_of_the_step(cls, timings, monkeypatch):
    torch.manual_seed(0)
    layer = cls(16, 16, 4, training_path="measured")
    hook_calls = []
    for param in layer.parameters():
        param.register_hook(lambda grad: hook_calls.append(1))
    x = torch.randn(24, 16, requires_grad=True)
    monkeypatch.setattr(layer, "_structured_forward", slowed(layer._structured_forward))
    rng = torch.get_rng_state()
    out = layer(x)
    assert torch.equal(torch.get_rng_state(), rng)  # no random numbers drawn by the timing
    assert timings == [{"structured", "dense"}]
    assert measured_training_paths() == {(cls.__name__, 16, 16, 4, "cpu", torch.float32, None, 32): "dense"}
    assert all(param.grad is None for param in layer.parameters()) and x.grad is None and hook_calls == []
    weighted_sum(out).backward()
    assert len(hook_calls) == len(list(layer.parameters()))  # once each, from the real backward only
    expected = structured_twin(layer)
    _, reference = gradients(expected, x)
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], rtol=1e-5, atol=1e-6)
    # The same shape and call size reuses the choice; another size is timed on its own, here the dense one loses.
    twin = cls(16, 16, 4, training_path="measured")
    twin(x[:20]).sum().backward()
    assert len(timings) == 1
    monkeypatch.setattr(m2_hf.monarch.F, "linear", slowed(m2_hf.monarch.F.linear))
    calls = count_densifications(twin, monkeypatch)
    twin(x[:3]).sum().backward()
    assert len(timings) == 2 and measured_training_paths()[(cls.__name__, 16, 16, 4, "cpu", torch.float32, None, 4)] \
        == "structured"
    assert len(calls) == 4  # only while timing (one warm-up and MEASURED_REPEATS runs), not for the step


@pytest.mark.parametrize("cls", CLASSES)
def test_auto_trains_structured_on_cpu_and_measures_where_no_flop_rule_holds(cls, timings, monkeypatch):
    layer = cls(16, 16, 4)
    calls = count_densifications(layer, monkeypatch)
    layer(torch.randn(24, 16)).sum().backward()
    assert calls == [] and timings == []  # CPU: the structured multiply, measured faster there
    monkeypatch.setattr(m2_hf.monarch, "AUTO_MEASURED_DEVICE_TYPES", ("cpu",))  # CPU stands in for CUDA
    layer(torch.randn(24, 16)).sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(24, 16)).float().sum().backward()
    assert timings == [{"structured", "dense"}] * 2
    assert {key[6] for key in measured_training_paths()} == {None, torch.bfloat16}


@pytest.mark.parametrize("cls", CLASSES)
def test_measured_training_path_is_not_timed_in_tracing_capture_or_over_the_memory_limit(cls, timings, monkeypatch):
    x = torch.randn(8, 16)
    limited = cls(16, 16, 4, training_path="measured", dense_weight_max_bytes=16 * 16 * 4 - 1)
    limited(x).sum().backward()
    layer = cls(16, 16, 4, training_path="measured")
    monkeypatch.setattr(m2_hf.monarch, "graph_capture_underway", lambda device: True)
    layer(x).sum().backward()
    monkeypatch.setattr(m2_hf.monarch, "graph_capture_underway", lambda device: False)
    monkeypatch.setattr(m2_hf.monarch, "is_traced", lambda: True)
    layer(x).sum().backward()
    assert timings == [] and measured_training_paths() == {}
    monkeypatch.setattr(m2_hf.monarch, "is_traced", lambda: False)
    layer(x).sum().backward()
    assert timings == [{"structured", "dense"}]


def test_dense_training_path_compiles_in_one_graph():
    torch.manual_seed(0)
    layer = MonarchLinear(16, 24, 4, training_path="dense")
    structured = structured_twin(layer)
    x = torch.randn(6, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    structured(x).square().sum().backward()
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param.grad, structured.get_parameter(name).grad, rtol=1e-5, atol=1e-6)


def test_set_structured_training_path_and_bad_values():
    model = nn.Sequential(MonarchLinear(16, 16, 2), nn.ReLU(), BlockdiagLinear(16, 16, 2), nn.Linear(16, 16))
    assert set_structured_training_path(model, "dense") == 2
    assert model[0].training_path == model[2].training_path == "dense"
    assert "training_path='dense'" in repr(model[0]) and "inference_path" not in repr(model[0])
    choices = r"\('auto', 'structured', 'dense', 'measured'\)"
    with pytest.raises(ValueError, match=rf"`training_path` must be one of {choices}"):
        set_structured_training_path(model, "fast")
    with pytest.raises(ValueError, match="`training_path` must be one of"):
        MonarchLinear(16, 16, 4, training_path="Dense")
    assert model[0].training_path == "dense"


def test_layers_pickled_before_the_training_path_existed_still_train():
    layer = MonarchLinear(16, 16, 4)
    del layer.__dict__["_training_path"]  # as a layer saved whole by an earlier version
    assert layer.training_path == "auto"
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.blkdiag1.grad is not None


@pytest.mark.parametrize("reentrant", [False, True])
def test_measuring_inside_activation_checkpointing(reentrant, timings, monkeypatch):
    """The first training call may be timed inside a checkpointed region: non-reentrant checkpointing counts the
    tensors the forward saves and compares them with its recomputation, so the timing's own graphs must not pass
    through its hooks."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(m2_hf.monarch, "AUTO_MEASURED_DEVICE_TYPES", ("cpu",))
    torch.manual_seed(0)
    layer = MonarchLinear(16, 32, 4)
    reference = structured_twin(layer)
    x = torch.randn(8, 16, requires_grad=True)  # reentrant checkpointing needs an input that requires grad
    checkpoint(lambda t: layer(t).relu(), x, use_reentrant=reentrant).sum().backward()
    # Reentrant checkpointing runs the forward without autograd first: the inference path is timed there too.
    assert len(timings) == (2 if reentrant else 1) and len(measured_training_paths()) == 1
    reference(x).relu().sum().backward()
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param.grad, reference.get_parameter(name).grad, rtol=1e-5, atol=1e-6)


def test_nothing_is_timed_under_function_transforms(timings):
    layer = MonarchLinear(16, 16, 4, training_path="measured")
    params = dict(layer.named_parameters())
    x = torch.randn(4, 16)
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(params)
    assert timings == [] and set(grads) == set(params)


def test_trainer_with_gradient_checkpointing_trains_through_the_measured_path(timings, tmp_path):
    """Through the client: `Trainer` with gradient checkpointing and gradient accumulation on a BERT whose MLP is
    Monarch, every layer on `training_path="measured"`: the paths are timed once per shape inside the checkpointed
    forward, and training moves every structured factor."""
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from conversion.monarch import resolve_targets
    from m2_hf import structure_linear_layers

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=2))
    structure_linear_layers(model.base_model, resolve_targets(model.base_model, ["mlp"], {"*": 4}), "monarch")
    assert set_structured_training_path(model, "measured") == 4
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "blkdiag" in name}
    generator = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"input_ids": torch.randint(5, 64, (16, 10), generator=generator).tolist(),
                              "labels": torch.randint(0, 2, (16,), generator=generator).tolist()})
    arguments = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                  gradient_accumulation_steps=2, gradient_checkpointing=True, learning_rate=1e-2,
                                  report_to="none", save_strategy="no", use_cpu=True)
    Trainer(model=model, args=arguments, train_dataset=data).train()
    assert {key[1:3] for key in measured_training_paths()} == {(32, 64), (64, 32)}
    assert len(timings) == 2  # once per layer shape and call size, not per layer or step
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)
