"""The inference paths of structured layers: the densified weight equals the structured multiply, is computed once,
is recomputed whenever a factor changes, and is never used where autograd records or a graph is being captured."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import m2_hf.monarch
from m2_hf import (
    BlockdiagLinear,
    M2BertConfig,
    M2BertModel,
    M2GPTConfig,
    M2ViTConfig,
    MonarchLinear,
    clear_measured_inference_paths,
    clear_measured_training_paths,
    measured_inference_paths,
    set_structured_inference_path,
)
from m2_hf.monarch import AUTO_MIN_DENSE_FLOPS, AUTO_SMALL_CALL_MAX_WEIGHT_BYTES
from test_m2_bert import tiny_model as tiny_bert

CLASSES = [MonarchLinear, BlockdiagLinear]
SHAPES = [(16, 16, 4), (12, 40, 4), (40, 12, 4), (10, 14, 3)]  # square, up, down, sizes nblocks does not divide


def factor_names(layer) -> tuple[str, ...]:
    return ("blkdiag1", "blkdiag2") if isinstance(layer, MonarchLinear) else ("weight",)


def structured_output(layer, x: torch.Tensor) -> torch.Tensor:
    """What the structured multiply gives for ``x``, computed on a copy that has no densified weight."""
    reference = copy.deepcopy(layer)
    reference.inference_path = "structured"
    with torch.no_grad():
        return reference(x)


def dense_layer(cls, in_features=16, out_features=16, nblocks=4, bias=True, seed=0):
    torch.manual_seed(seed)
    return cls(in_features, out_features, nblocks, bias=bias, inference_path="dense")


def forbid_structured_multiply(layer, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the structured multiply ran")

    monkeypatch.setattr(layer, "_multiply", fail)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("in_features, out_features, nblocks", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_dense_path_equals_structured_path(cls, in_features, out_features, nblocks, bias):
    layer = dense_layer(cls, in_features, out_features, nblocks, bias)
    x = torch.randn(2, 5, in_features)
    with torch.no_grad():
        dense = layer(x)
    assert layer._dense_weight_cache is not None  # the dense path ran
    torch.testing.assert_close(dense, structured_output(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_densified_weight_is_computed_once(cls, monkeypatch):
    layer = dense_layer(cls)
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = layer(x)
        forbid_structured_multiply(layer, monkeypatch)
        torch.testing.assert_close(layer(x), first, rtol=0, atol=0)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("change", ["in_place", "reassign", "load_state_dict", "load_state_dict_assign"])
def test_densified_weight_follows_every_factor_change(cls, change):
    layer = dense_layer(cls)
    donor = dense_layer(cls, seed=1)
    x = torch.randn(3, 16)
    for name in factor_names(layer):
        with torch.no_grad():
            layer(x)  # fills the cache
            if change == "in_place":
                getattr(layer, name).mul_(-2.0)
            elif change == "reassign":
                setattr(layer, name, nn.Parameter(getattr(donor, name).detach().clone()))
            else:
                state = {key: value.clone() for key, value in layer.state_dict().items()}
                state[name] = getattr(donor, name).detach().clone()
                layer.load_state_dict(state, assign=change.endswith("assign"))
            torch.testing.assert_close(layer(x), structured_output(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_densified_weight_follows_dtype_changes(cls):
    layer = dense_layer(cls)
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        layer(x.float())
        layer.to(torch.float64)
        out = layer(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, structured_output(layer, x), rtol=1e-10, atol=1e-12)
    # `.to()` keeps each parameter's object and version counter; a round trip through half precision changes the
    # values, and the new float64 storage may reuse the memory of the one the cached weight was computed from.
    with torch.no_grad():
        layer.half()
        layer.double()
        torch.testing.assert_close(layer(x), structured_output(layer, x), rtol=1e-10, atol=1e-12)
        # The same, made certain: a conversion that hands back the very memory, with new values.
        layer._apply(lambda t: t.data.mul_(-3.0))
        torch.testing.assert_close(layer(x), structured_output(layer, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_densified_weight_tells_a_new_parameter_at_the_same_address_and_version(cls):
    layer = dense_layer(cls)
    x = torch.randn(3, 16)
    name = factor_names(layer)[-1]
    with torch.no_grad():
        layer(x)
        old = getattr(layer, name)
        fresh = old.data  # the same memory under its own version counter
        fresh.copy_(torch.randn_like(fresh))
        while fresh._version < old._version:
            fresh.add_(0.0)
        new = nn.Parameter(fresh)
        assert (new.data_ptr(), new._version) == (old.data_ptr(), old._version)
        setattr(layer, name, new)
        torch.testing.assert_close(layer(x), structured_output(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_factors_created_in_inference_mode_are_applied_without_a_cached_weight(cls):
    """Such tensors have no version counter: a later in-place change could not be seen, so nothing is cached."""
    with torch.inference_mode():
        layer = dense_layer(cls)
        x = torch.randn(3, 16)
        before = layer(x)
        assert layer._dense_weight_cache is None
        getattr(layer, factor_names(layer)[0]).mul_(2.0)
        after = layer(x)
    torch.testing.assert_close(after, structured_output(layer, x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("cls", CLASSES)
def test_autograd_gets_the_structured_multiply_and_factor_gradients(cls):
    layer = dense_layer(cls)
    reference = copy.deepcopy(layer)
    reference.inference_path = "structured"
    x = torch.randn(3, 16)
    layer(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert layer._dense_weight_cache is None
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, reference.get_parameter(name).grad)
    # Frozen factors but an input that needs its gradient: still recorded, still structured.
    layer.requires_grad_(False)
    x.requires_grad_()
    layer(x).sum().backward()
    assert layer._dense_weight_cache is None and x.grad is not None


@pytest.mark.parametrize("cls", CLASSES)
def test_graph_capture_computes_from_the_factors(cls):
    layer = dense_layer(cls, bias=False)
    x = torch.randn(3, 16)
    with torch.no_grad():
        exported = torch.export.export(layer, (x,))
    assert layer._dense_weight_cache is None
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("bmm" in target or "mm" in target for target in targets)
    assert not exported.constants  # no densified weight baked into the graph
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        out = compiled(x)
    assert layer._dense_weight_cache is None
    torch.testing.assert_close(out, structured_output(layer, x), rtol=1e-5, atol=1e-6)


def test_auto_densifies_where_the_structured_multiply_saves_too_few_flops_or_the_call_is_small():
    big_call = AUTO_MIN_DENSE_FLOPS // (2 * 64 * 64)  # rows at which a 64->64 call reaches the minimum work
    x = torch.randn(big_call, 64)
    saving_two = MonarchLinear(64, 64, 4)  # half the FLOPs of dense: structured
    saving_one = MonarchLinear(64, 64, 2)  # as many FLOPs as dense: densified
    blockdiag_two = BlockdiagLinear(64, 64, 2)
    with torch.no_grad():
        for layer in (saving_two, saving_one, blockdiag_two):
            layer(x)
    assert saving_two._dense_weight_cache is None and blockdiag_two._dense_weight_cache is None
    assert saving_one._dense_weight_cache is not None
    assert saving_one.flop_saving() == 1.0 and saving_two.flop_saving() == 2.0
    assert not saving_two.prefers_dense_weight(big_call) and saving_two.prefers_dense_weight(big_call - 1)
    assert not saving_two.prefers_dense_weight() and saving_one.prefers_dense_weight()
    with torch.no_grad():
        saving_two(x[:7])  # a small call: densified
    assert saving_two._dense_weight_cache is not None
    # One row through a wide layer (a decoding step) reads the weight more than it computes: the factors stay.
    wide = MonarchLinear(1024, 4096, 4)
    assert wide.dense_weight_bytes() > AUTO_SMALL_CALL_MAX_WEIGHT_BYTES and not wide.prefers_dense_weight(1)


@pytest.fixture
def measured(monkeypatch):
    """Clean tables of measured choices (inference and training), and a record of the timings taken."""
    clear_measured_inference_paths()
    clear_measured_training_paths()
    timings = []
    fastest = m2_hf.monarch._fastest
    monkeypatch.setattr(m2_hf.monarch, "_fastest", lambda paths, *args: timings.append(set(paths)) or fastest(
        paths, *args))
    yield timings
    clear_measured_inference_paths()
    clear_measured_training_paths()


def slowed(function, seconds=0.1):  # far above a small call's time on a loaded machine (5-8 ms)
    def slow(*args, **kwargs):
        import time

        time.sleep(seconds)
        return function(*args, **kwargs)

    return slow


@pytest.mark.parametrize("cls", CLASSES)
def test_measured_path_applies_the_faster_exact_path_once_timed_per_shape_and_call_size(cls, measured, monkeypatch):
    torch.manual_seed(0)
    layer, twin = cls(16, 16, 4, inference_path="measured"), cls(16, 16, 4, inference_path="measured")
    x = torch.randn(24, 16)
    assert layer.prefers_dense_weight(24) is None  # nothing measured yet
    monkeypatch.setattr(layer, "_structured_forward", slowed(layer._structured_forward))
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, structured_output(layer, x), rtol=1e-5, atol=1e-6)
    assert measured == [{"structured", "dense"}] and layer._dense_weight_cache is not None
    assert measured_inference_paths() == {(cls.__name__, 16, 16, 4, "cpu", torch.float32, None, 32): "dense"}
    assert layer.prefers_dense_weight(17) and layer.prefers_dense_weight(32) and layer.prefers_dense_weight(33) is None
    with torch.no_grad():
        twin(x[:20])  # same shape, same size group: the choice is reused, not timed again
    assert len(measured) == 1 and twin._dense_weight_cache is not None
    # Another call size is timed on its own; here the densified weight is the slow one.
    monkeypatch.setattr(m2_hf.monarch.F, "linear", slowed(m2_hf.monarch.F.linear))
    fresh = cls(16, 16, 4, inference_path="measured")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x[:3]), structured_output(fresh, x[:3]), rtol=1e-5, atol=1e-6)
    key = (cls.__name__, 16, 16, 4, "cpu", torch.float32, None, 4)
    assert len(measured) == 2 and measured_inference_paths()[key] == "structured"
    assert fresh._dense_weight_cache is None  # computed to be timed, then freed: it lost
    assert not fresh.prefers_dense_weight(3)


@pytest.mark.parametrize("cls", CLASSES)
def test_measured_path_never_times_in_training_tracing_or_over_the_memory_limit(cls, measured):
    layer = cls(16, 16, 4, inference_path="measured")
    x = torch.randn(8, 16)
    layer(x).sum().backward()  # autograd records: the structured multiply, untimed
    with torch.no_grad():
        torch.export.export(layer, (x,))  # a graph being captured computes from the factors
    limited = cls(16, 16, 4, inference_path="measured", dense_weight_max_bytes=16 * 16 * 4 - 1)
    with torch.no_grad():
        limited(x)
    assert measured == [] and measured_inference_paths() == {} and limited._dense_weight_cache is None
    with pytest.raises(ValueError, match="'measured' times both"):
        cls(16, 16, 4, inference_path="timed")


def test_memory_limit_applies_to_auto_and_not_to_dense():
    x = torch.randn(4, 64)
    layer = MonarchLinear(64, 64, 2, dense_weight_max_bytes=64 * 64 * 4 - 1)
    with torch.no_grad():
        layer(x)
        assert layer._dense_weight_cache is None
        layer.dense_weight_max_bytes = 64 * 64 * 4
        layer(x)
        assert layer._dense_weight_cache is not None
        layer.dense_weight_max_bytes = 0
        layer.inference_path = "dense"
        layer(x)
        assert layer._dense_weight_cache is not None


def test_set_structured_inference_path_sets_every_layer_and_frees_unused_weights():
    model = nn.Sequential(MonarchLinear(16, 16, 2), nn.ReLU(), BlockdiagLinear(16, 16, 2), nn.Linear(16, 16))
    with torch.no_grad():
        assert set_structured_inference_path(model, "dense", dense_weight_max_bytes=None) == 2
        model(torch.randn(2, 16))
        assert all(model[i]._dense_weight_cache is not None for i in (0, 2))
        assert set_structured_inference_path(model, "structured") == 2
    assert all(model[i]._dense_weight_cache is None for i in (0, 2))
    assert model[0].dense_weight_max_bytes is None  # left as it was
    assert "inference_path='structured'" in repr(model[0])


def test_layers_with_a_densified_weight_copy_and_pickle():
    layer = dense_layer(MonarchLinear)
    x = torch.randn(2, 16)
    with torch.no_grad():
        expected = layer(x)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        for clone in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
            clone.blkdiag1.mul_(2.0)  # the clone's own factors, not the original's cached weight
            torch.testing.assert_close(clone(x), structured_output(clone, x), rtol=1e-5, atol=1e-6)
    assert "_dense_weight_cache" not in "".join(layer.state_dict())
    torch.testing.assert_close(layer(x).detach(), expected)


def test_m2_mlp_fast_path_applies_the_densified_weight():
    model = tiny_bert(M2BertModel, monarch_mlp_nblocks=2).eval()
    mlp = model.encoder.layer[0].mlp
    inputs = {"input_ids": torch.randint(0, model.config.vocab_size, (2, 12))}
    with torch.no_grad():
        structured = model(**inputs).last_hidden_state
        set_structured_inference_path(model, "dense")
        dense = model(**inputs).last_hidden_state
    assert mlp.gated_layers._dense_weight_cache is not None and mlp.wo._dense_weight_cache is not None
    torch.testing.assert_close(dense, structured, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_inference_settings_are_refused_with_the_choices(cls):
    with pytest.raises(ValueError, match=r"`inference_path` must be one of \('auto', 'structured', 'dense', 'measured'\)"):
        cls(16, 16, 4, inference_path="fast")
    layer = cls(16, 16, 4)
    with pytest.raises(ValueError, match="`inference_path` must be one of"):
        layer.inference_path = "Dense"
    for bad in (-1, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match="`dense_weight_max_bytes` must be a number of bytes >= 0"):
            cls(16, 16, 4, dense_weight_max_bytes=bad)
    with pytest.raises(ValueError, match="`inference_path` must be one of"):
        set_structured_inference_path(nn.Sequential(layer), "triton")
    with pytest.raises(ValueError, match="`dense_weight_max_bytes` must be"):
        set_structured_inference_path(nn.Sequential(layer), "auto", dense_weight_max_bytes=-5)
    assert layer.inference_path == "auto"


@pytest.mark.parametrize("path", ["inference_path", "training_path"])
def test_m2_config_field_sets_the_mlp_layers_path(path):
    field = f"structured_{path}"
    model = tiny_bert(M2BertModel, **{field: "dense"})
    mlp = model.encoder.layer[0].mlp
    assert getattr(model.config, field) == "dense"
    assert getattr(mlp.gated_layers, path) == "dense" and getattr(mlp.wo, path) == "dense"
    assert getattr(tiny_bert(M2BertModel).encoder.layer[0].mlp.wo, path) == "auto"
    assert getattr(M2BertConfig.from_dict(model.config.to_dict()), field) == "dense"
    for config_class in (M2BertConfig, M2GPTConfig, M2ViTConfig):
        with pytest.raises(ValueError, match=f"`{field}` must be one of"):
            config_class(**{field: "fastest"})


@pytest.mark.parametrize("cls", CLASSES)
def test_auto_measures_on_the_device_types_where_no_flop_rule_holds(cls, measured, monkeypatch):
    """On CUDA `auto` times both paths like `measured` (the H200 run of bench_gpu.py); elsewhere it keeps the FLOP
    rule. CPU stands in for CUDA here, by naming it in AUTO_MEASURED_DEVICE_TYPES. Autocast is part of what is timed."""
    x = torch.randn(24, 16)
    with torch.no_grad():
        cls(16, 16, 4)(x)
    assert measured == []  # CPU: the FLOP rule
    monkeypatch.setattr(m2_hf.monarch, "AUTO_MEASURED_DEVICE_TYPES", ("cpu",))
    layer = cls(16, 16, 4)
    assert layer.prefers_dense_weight(24) is None  # nothing measured yet
    with torch.no_grad():
        torch.testing.assert_close(layer(x), structured_output(layer, x), rtol=1e-5, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
    assert measured == [{"structured", "dense"}] * 2
    assert {key[6] for key in measured_inference_paths()} == {None, torch.bfloat16}
    assert layer.prefers_dense_weight(24) is not None


@pytest.mark.parametrize("cls", CLASSES)
def test_nothing_is_timed_while_a_cuda_graph_is_captured(cls, measured, monkeypatch):
    layer, x = cls(16, 16, 4, inference_path="measured"), torch.randn(8, 16)
    monkeypatch.setattr(m2_hf.monarch, "graph_capture_underway", lambda device: True)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), structured_output(layer, x), rtol=1e-5, atol=1e-6)
    assert measured == [] and measured_inference_paths() == {} and layer._dense_weight_cache is None
    monkeypatch.setattr(m2_hf.monarch, "graph_capture_underway", lambda device: False)
    with torch.no_grad():
        layer(x)
    assert measured == [{"structured", "dense"}]
