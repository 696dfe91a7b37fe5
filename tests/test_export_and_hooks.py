"""Where users take the M2 models: `torch.export` and ONNX (run in onnxruntime) with dynamic shapes, `torch.compile`
without graph breaks, forward hooks on every layer; and the CPU inference fast path against the reference forward."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch import nn

import m2_hf.m2_mixer as mixer_module
from conversion.cli import main
from conversion.onnx_export import (
    ONNX_FILE,
    RELATIVE_TOLERANCE,
    check_in_onnxruntime,
    example_inputs,
    export_model_to_onnx,
)
from m2_hf import (
    M2BertForMaskedLM,
    M2BertForQuestionAnswering,
    M2BertForSequenceClassification,
    M2BertForTextEncoding,
    M2BertForTokenClassification,
    M2BertModel,
    M2GPTForCausalLM,
    M2GPTForSequenceClassification,
    M2ViTForImageClassification,
)
from m2_hf.m2_mixer import (
    M2GatedMLP,
    M2SequenceMixer,
    mixer_cpu_inference,
    mlp_cpu_inference,
    takes_inference_fast_path,
)
from test_m2_bert import tiny_model as tiny_bert
from test_m2_gpt import tiny_model as tiny_gpt
from test_m2_vit import tiny_model as tiny_vit

BERT_HEADS = [M2BertModel, M2BertForMaskedLM, M2BertForSequenceClassification, M2BertForTokenClassification,
              M2BertForQuestionAnswering, M2BertForTextEncoding]


def build(name: str, layers: int = 1) -> nn.Module:
    """A tiny model with every optional mixer part on (training additions, residual long convolution)."""
    if name.startswith("M2Bert"):
        cls = next(cls for cls in BERT_HEADS if cls.__name__ == name)
        return tiny_bert(cls, num_hidden_layers=layers, hyena_training_additions=True)
    if name.startswith("M2GPT"):
        cls = {"M2GPTForCausalLM": M2GPTForCausalLM, "M2GPTForSequenceClassification": M2GPTForSequenceClassification}
        return tiny_gpt(cls[name], num_hidden_layers=layers, hyena_training_additions=True)
    return tiny_vit(M2ViTForImageClassification, num_hidden_layers=layers)


MODELS = [cls.__name__ for cls in BERT_HEADS] + [
    "M2GPTForCausalLM", "M2GPTForSequenceClassification", "M2ViTForImageClassification"]
# Shapes other than the exported (2, 16); every row after the first is left-padded.
CHECK_SHAPES = [(3, 21), (1, 40)]


def outputs_of(model, inputs) -> dict[str, torch.Tensor]:
    extra = {"use_cache": False} if model.config.model_type == "m2_gpt" else {}
    out = model(**inputs, **extra, return_dict=True)
    return {name: value for name, value in out.items() if isinstance(value, torch.Tensor)}


# --------------------------------------------------------------------------------------------------------------------
# torch.export and ONNX
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_torch_export_with_dynamic_batch_and_length_equals_eager_on_other_padded_shapes(name):
    model = build(name)
    is_vit = model.config.model_type == "m2_vit"
    inputs = example_inputs(model, 2, 16)
    batch = torch.export.Dim("batch", min=1, max=64)
    length = torch.export.Dim("length", min=2, max=48)
    dims = {0: batch} if is_vit else {0: batch, 1: length}
    extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    exported = torch.export.export(
        model, (), {**inputs, **extra}, dynamic_shapes={**{key: dims for key in inputs}, **{k: None for k in extra}}
    ).module()
    for batch_size, length_size in CHECK_SHAPES:
        other = example_inputs(model, batch_size, length_size, seed=7)
        if not is_vit:
            assert other["attention_mask"][1:].eq(0).any() or batch_size == 1
        with torch.no_grad():
            expected = outputs_of(model, other)
            got = exported(**other, **extra)
        assert set(expected) <= set(got.keys())
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", [n for n in MODELS if n != "M2BertForTextEncoding"])  # that one: through the CLI
def test_onnx_export_runs_in_onnxruntime_like_pytorch_on_other_padded_shapes(name, tmp_path):
    model = build(name)
    names = export_model_to_onnx(model, tmp_path / ONNX_FILE)
    checks = check_in_onnxruntime(model, tmp_path / ONNX_FILE, CHECK_SHAPES)
    assert {(check["batch"], check["length"]) for check in checks} == set(CHECK_SHAPES)
    assert {check["output"] for check in checks} == set(names["outputs"]) and names["outputs"]
    worst = max(check["max_relative_difference"] for check in checks)
    assert worst <= RELATIVE_TOLERANCE, checks


def test_padding_is_checked_by_the_onnx_shapes():
    """The check inputs hold left padding, and padding changes nothing at real tokens (so the check covers it)."""
    model = build("M2BertModel")
    inputs = example_inputs(model, 3, 21)
    mask = inputs["attention_mask"]
    assert mask[0].all() and not mask[1].all() and not mask[2].all()
    with torch.no_grad():
        padded = model(**inputs).last_hidden_state
        real = mask[2].bool()
        alone = model(inputs["input_ids"][2:, real]).last_hidden_state
    torch.testing.assert_close(padded[2, real], alone[0], rtol=1e-5, atol=1e-5)


def test_m2_convert_onnx_exports_a_saved_text_encoder(tmp_path, capsys):
    import onnxruntime

    model = build("M2BertForTextEncoding")
    model.save_pretrained(tmp_path / "encoder")
    assert main(["onnx", str(tmp_path / "encoder"), str(tmp_path / "onnx")]) == 0
    report = json.loads((tmp_path / "onnx" / "conversion_report.json").read_text())
    assert report["architecture"] == "M2BertForTextEncoding" and report["inputs"] == ["input_ids", "attention_mask"]
    assert "sentence_embedding" in report["outputs"] and ONNX_FILE in report["files"]
    assert max(check["max_relative_difference"] for check in report["onnxruntime_check"]) <= RELATIVE_TOLERANCE
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / ONNX_FILE))
    inputs = example_inputs(model, 4, 33, seed=3)
    got = session.run(["sentence_embedding"], {key: value.numpy() for key, value in inputs.items()})[0]
    with torch.no_grad():
        expected = model(**inputs).sentence_embedding
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["M2BertForMaskedLM", "M2GPTForCausalLM", "M2ViTForImageClassification"])
def test_compile_fullgraph_has_no_graph_break_in_inference_and_training(name):
    """`fullgraph=True` raises on any graph break; aot_eager also traces the backward of the training step."""
    torch._dynamo.reset()
    model = build(name, layers=2)
    inputs = example_inputs(model, 2, 16)
    extra = {"use_cache": False} if model.config.model_type == "m2_gpt" else {}
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected = outputs_of(model, inputs)
        got = compiled(**inputs, **extra)
    key = next(iter(expected))
    torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)

    model.train()
    if model.config.model_type == "m2_vit":
        labels = torch.tensor([0, 2])
    else:
        labels = inputs["input_ids"] if model.config.model_type == "m2_gpt" else inputs["input_ids"].clone()
    loss = compiled(**inputs, **extra, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


# --------------------------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------------------------


def record(seen: dict, key: str, value) -> None:
    """Keep a hook's first value (and return None: a hook's return value would replace the module's input or output)."""
    seen.setdefault(key, value)


def modules_with_parameters(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that holds parameters, itself or below it, except containers (which are never called)."""
    containers = (nn.ModuleList, nn.ModuleDict)
    return {name: module for name, module in model.named_modules()
            if name and any(True for _ in module.parameters()) and not isinstance(module, containers)}


@pytest.mark.parametrize("name", ["M2BertForMaskedLM", "M2GPTForCausalLM", "M2ViTForImageClassification"])
@pytest.mark.parametrize("mode", ["training", "inference"])
def test_hooks_on_every_module_with_parameters_fire_with_what_it_receives(name, mode):
    model = build(name, layers=2)
    inputs = example_inputs(model, 2, 12)
    extra = {"use_cache": False} if model.config.model_type == "m2_gpt" else {}
    with torch.no_grad():
        unhooked = outputs_of(model, inputs)
    seen_inputs, seen_outputs = {}, {}
    handles = []
    for module_name, module in modules_with_parameters(model).items():
        handles.append(module.register_forward_pre_hook(
            lambda m, args, key=module_name: record(seen_inputs, key, args)))
        handles.append(module.register_forward_hook(
            lambda m, args, out, key=module_name: record(seen_outputs, key, out)))
    for needed in ("mixer", "attention", "in_linear", "out_linear", "short_filter", "filter_fn", "gated_layers", "wo"):
        assert any(key.endswith(needed) for key in modules_with_parameters(model)) or needed in ("mixer", "attention")
    model.train(mode == "training")
    if mode == "training":
        hooked = outputs_of(model, inputs)
    else:
        with torch.no_grad():
            hooked = outputs_of(model, inputs)
    for handle in handles:
        handle.remove()
    missing = sorted(set(modules_with_parameters(model)) - set(seen_outputs))
    assert not missing, f"hooks never called on {missing}"
    assert set(seen_inputs) == set(seen_outputs)
    if mode == "inference":  # hooks change no output (the reference path replaces the fast one)
        for key, value in unhooked.items():
            torch.testing.assert_close(hooked[key], value, rtol=1e-5, atol=1e-5)
    # What a leaf layer received is what it computed its output from.
    for key, module in modules_with_parameters(model).items():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.LayerNorm)):
            with torch.no_grad():
                torch.testing.assert_close(module.forward(*seen_inputs[key]), seen_outputs[key].detach())


@pytest.mark.parametrize("name", ["M2BertForMaskedLM", "M2GPTForCausalLM"])
def test_every_hooked_layer_output_is_the_one_the_model_uses(name):
    """Zeroing any layer's output through a forward hook changes the model's output, in inference."""
    model = build(name, layers=1)
    inputs = example_inputs(model, 2, 12)
    with torch.no_grad():
        base = next(iter(outputs_of(model, inputs).values()))
        for key, module in modules_with_parameters(model).items():
            if key.count(".") < 1 or isinstance(module, mixer_module.HyenaFilter) or key.endswith("pos_emb"):
                continue  # the base model (a ModelOutput), the filters and their positions (tuples)
            handle = module.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
            changed = next(iter(outputs_of(model, inputs).values()))
            handle.remove()
            assert (changed - base).abs().max() > 1e-6, key


@pytest.mark.parametrize("grad", [True, False])
def test_out_linear_pre_hook_sees_the_signal_the_mixer_projects_and_the_mixer_hook_its_output(grad):
    model = build("M2BertForMaskedLM")
    mixer = model.bert.encoder.layer[0].attention
    seen = {}
    mixer.out_linear.register_forward_pre_hook(lambda m, args: record(seen, "projected", args[0]))
    mixer.register_forward_hook(lambda m, args, out: record(seen, "mixer", (args, out)))
    inputs = example_inputs(model, 2, 12)
    with torch.set_grad_enabled(grad):
        model(**inputs)
    (u, mask), out = seen["mixer"]
    torch.testing.assert_close(mixer.out_linear(seen["projected"]), out)
    # The projected signal: the gated long convolution plus the residual one, recomputed from the parts here.
    with torch.no_grad():
        normed = mixer.layernorm(u)
        z = (mixer.in_linear(normed).transpose(1, 2)) * mask[:, None]
        x1, x2, v = mixer.short_filter(z)[..., : u.shape[1]].split(u.shape[2], dim=1)
        k, k_rev = mixer.filter_fn(u.shape[1])
        gated = mixer_module.fft_long_conv(((v * x1) * mask[:, None]).transpose(0, 1), k, k_rev, mixer.filter_fn.bias)
        k2, k2_rev = mixer.filter_fn2(u.shape[1])
        residual = mixer_module.fft_long_conv((normed.transpose(1, 2) * mask[:, None]).transpose(0, 1), k2, k2_rev,
                                              mixer.filter_fn2.bias)
        expected = (gated.transpose(0, 1) * x2 + residual.transpose(0, 1)).transpose(1, 2)
    torch.testing.assert_close(seen["projected"].detach(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# The CPU inference path against the reference forward
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"hyena_training_additions": True}, {"residual_long_conv": False},
                                       {"use_glu_mlp": False, "use_monarch_mlp": False}])
@pytest.mark.parametrize("chunk_bytes", [1, 24 << 20])
def test_cpu_inference_path_equals_the_reference_forward(overrides, chunk_bytes, monkeypatch):
    monkeypatch.setattr(mixer_module, "_CPU_CHUNK_BYTES", chunk_bytes)
    model = tiny_bert(M2BertModel, **overrides)
    layer = model.encoder.layer[0]
    u = torch.randn(3, 60, model.config.hidden_size)
    mask = torch.ones(3, 60, dtype=torch.long)
    mask[1, :9] = 0
    mask[2, 50:] = 0
    with torch.no_grad():
        for m in (mask, None):
            torch.testing.assert_close(mixer_cpu_inference(layer.attention, u, m),
                                       layer.attention.reference_forward(u, m), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp_cpu_inference(layer.mlp, u), layer.mlp.reference_forward(u), rtol=1e-5,
                                   atol=1e-5)


def test_fast_path_is_taken_only_where_no_one_can_tell(monkeypatch):
    model = build("M2BertForMaskedLM")
    mixer, mlp = model.bert.encoder.layer[0].attention, model.bert.encoder.layer[0].mlp
    u = torch.randn(1, 8, model.config.hidden_size)
    with torch.no_grad():
        assert takes_inference_fast_path(mixer, u) and takes_inference_fast_path(mlp, u)
        handle = mixer.filter_fn.implicit_filter[0].register_forward_hook(lambda *a: None)
        assert not takes_inference_fast_path(mixer, u) and takes_inference_fast_path(mlp, u)
        handle.remove()
        monkeypatch.setattr(mixer_module, "is_traced", lambda: True)
        assert not takes_inference_fast_path(mixer, u)
        monkeypatch.undo()
        assert not takes_inference_fast_path(mixer, u.to("meta"))
    assert not takes_inference_fast_path(mixer, u)  # autograd records

    calls = []
    original = mixer_module.mixer_cpu_inference
    monkeypatch.setattr(mixer_module, "mixer_cpu_inference", lambda *a: calls.append(1) or original(*a))
    inputs = example_inputs(model, 2, 8)
    with torch.no_grad():
        model(**inputs)
        assert len(calls) == 1  # one layer, fast path
        handle = mixer.in_linear.register_forward_pre_hook(lambda *a: None)
        model(**inputs)
        assert len(calls) == 1
        handle.remove()


def test_model_classes_take_no_workspace():
    for forward in (M2SequenceMixer.forward, M2GatedMLP.forward, mixer_module.M2PreNormBlock.forward):
        assert "workspace" not in inspect.signature(forward).parameters
    from m2_hf.modeling_m2_bert import M2BertEncoder, M2BertLayer

    for forward in (M2BertLayer.forward, M2BertEncoder.forward):
        assert "workspace" not in inspect.signature(forward).parameters


def test_m2_convert_onnx_writes_nothing_when_onnxruntime_disagrees(tmp_path, monkeypatch, capsys):
    import conversion.onnx_export as onnx_export

    build("M2BertForMaskedLM").save_pretrained(tmp_path / "model")
    monkeypatch.setattr(onnx_export, "export_model_to_onnx", lambda model, path: path.write_bytes(b"onnx") and {})
    monkeypatch.setattr(onnx_export, "check_in_onnxruntime", lambda *args: [
        {"batch": 3, "length": 21, "output": "logits", "max_relative_difference": 3e-3}])
    assert main(["onnx", str(tmp_path / "model"), str(tmp_path / "onnx")]) == 2
    assert "differs from PyTorch in onnxruntime by 3.00e-03" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]
