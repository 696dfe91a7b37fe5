"""Training features of every trainable model class: bf16 and activation checkpointing switched on by
`TrainingArguments` alone, gradient accumulation with the loss scale of the larger batch, and PEFT LoRA adapters."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import peft
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.pytorch_utils import Conv1D

from conversion.monarch import converted_config, linear_layers, resolve_targets
from m2_hf import (
    CONVERTED_CLASSES,
    BlockdiagLinear,
    M2BertForMaskedLM,
    M2BertForQuestionAnswering,
    M2BertForSequenceClassification,
    M2BertForTokenClassification,
    M2GPTForCausalLM,
    M2GPTForSequenceClassification,
    M2ViTForImageClassification,
    MonarchLinear,
    structured_layers,
)
from test_m2_bert import tiny_config as m2_bert_config
from test_m2_gpt import VOCAB as M2_GPT_VOCAB
from test_m2_gpt import incremental_logits, random_ids
from test_m2_gpt import tiny_config as m2_gpt_config
from test_m2_vit import images
from test_m2_vit import tiny_config as m2_vit_config

VOCAB = 64
LENGTH = 12
CLASSES = 3
# Targets kept per example (the rest are -100). Micro-batches of two examples get 7, 23, 22 and 5 targets: averaging
# per-micro-batch means would weight tokens differently from the mean over the accumulated batch.
KEPT_TARGETS = (3, 4, 12, 11, 12, 10, 2, 3)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Models this small gain nothing from intra-op threads; on a busy machine, waiting for them made the file ten
    times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------------------------


def seeded(cls, config) -> nn.Module:
    torch.manual_seed(0)
    return cls(config)


def m2_bert(cls) -> Callable[[], nn.Module]:
    return lambda: seeded(cls, m2_bert_config(vocab_size=VOCAB, num_labels=CLASSES))


def m2_gpt(cls) -> Callable[[], nn.Module]:
    return lambda: seeded(cls, m2_gpt_config(num_labels=CLASSES))


def m2_vit(**overrides) -> Callable[[], nn.Module]:
    return lambda: seeded(M2ViTForImageClassification, m2_vit_config(num_labels=CLASSES, **overrides))


def monarch_converted(original_class, config) -> Callable[[], nn.Module]:
    """A fresh `Monarch<original>` whose MLP layers are Monarch, as `m2-convert monarch --targets mlp` makes it."""

    def build() -> nn.Module:
        dense = original_class(config)
        layers = resolve_targets(dense.base_model, ["mlp"], {"*": 4})
        return seeded(CONVERTED_CLASSES[original_class.__name__], converted_config(dense, layers, "monarch"))

    return build


BERT_CONFIG = BertConfig(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=CLASSES,
)
GPT2_CONFIG = GPT2Config(
    vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
    attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
)


# --------------------------------------------------------------------------------------------------------------------
# Tiny datasets: `count` examples, always the same ones
# --------------------------------------------------------------------------------------------------------------------


def as_examples(columns: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    count = len(next(iter(columns.values())))
    return [{name: values[index] for name, values in columns.items()} for index in range(count)]


def with_ignored_tails(targets: torch.Tensor) -> torch.Tensor:
    targets = targets.clone()
    for row, kept in zip(targets, itertools.cycle(KEPT_TARGETS)):
        row[kept:] = -100
    return targets


def text(vocab: int, targets: Callable[[torch.Tensor], dict]) -> Callable[[int], list]:
    def examples(count: int) -> list:
        ids = random_ids(count, LENGTH) % vocab
        return as_examples({"input_ids": ids, "attention_mask": torch.ones_like(ids), **targets(ids)})

    return examples


def tokens_as_targets(ids):
    """Masked and causal LM targets (causal LMs shift them themselves)."""
    return {"labels": with_ignored_tails(ids)}


def token_classes(ids):
    return {"labels": with_ignored_tails(ids % CLASSES)}


def sequence_class(ids):
    return {"labels": ids[:, 1] % CLASSES}


def answer_span(ids):
    return {"start_positions": ids[:, 1] % LENGTH, "end_positions": ids[:, 2] % LENGTH}


def pictures(multi_label: bool = False) -> Callable[[int], list]:
    def examples(count: int) -> list:
        labels = torch.arange(count) % CLASSES
        if multi_label:
            labels = nn.functional.one_hot(labels, CLASSES).float()
        return as_examples({"pixel_values": images(batch=count), "labels": labels})

    return examples


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    examples: Callable[[int], list]

    def __repr__(self) -> str:
        return self.name


CASES = {
    case.name: case
    for case in (
        Case("m2_bert_masked_lm", m2_bert(M2BertForMaskedLM), text(VOCAB, tokens_as_targets)),
        Case("m2_bert_sequence_classification", m2_bert(M2BertForSequenceClassification), text(VOCAB, sequence_class)),
        Case("m2_bert_token_classification", m2_bert(M2BertForTokenClassification), text(VOCAB, token_classes)),
        Case("m2_bert_question_answering", m2_bert(M2BertForQuestionAnswering), text(VOCAB, answer_span)),
        Case("m2_gpt_causal_lm", m2_gpt(M2GPTForCausalLM), text(M2_GPT_VOCAB, tokens_as_targets)),
        Case("m2_gpt_sequence_classification", m2_gpt(M2GPTForSequenceClassification),
             text(M2_GPT_VOCAB, sequence_class)),
        Case("m2_vit_image_classification", m2_vit(), pictures()),
        Case("monarch_bert_sequence_classification", monarch_converted(BertForSequenceClassification, BERT_CONFIG),
             text(VOCAB, sequence_class)),
        Case("monarch_gpt2_lm_head", monarch_converted(GPT2LMHeadModel, GPT2_CONFIG), text(VOCAB, tokens_as_targets)),
    )
}
# The per-model test files already compare checkpointed with plain gradients for these classes.
CHECKPOINTING_COVERED_ELSEWHERE = {
    "m2_bert_sequence_classification", "m2_gpt_causal_lm", "m2_vit_image_classification",
}
# Plus a multi-label classifier: its loss is a mean that cannot use `num_items_in_batch`, unlike single-label
# cross-entropy, so Trainer must scale it.
GRADIENT_ACCUMULATION_CASES = [
    *CASES.values(),
    Case("m2_vit_multi_label", m2_vit(problem_type="multi_label_classification"), pictures(multi_label=True)),
]


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def training_arguments(tmp_path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        lr_scheduler_type="constant", train_sampling_strategy="sequential", disable_tqdm=True,
    )
    return TrainingArguments(**{**values, **overrides})


def logged_losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def model_inputs(examples: list) -> dict:
    """The collated batch without its targets: what prediction takes."""
    batch = default_data_collator(examples)
    return {name: value for name, value in batch.items() if name not in ("labels", "start_positions", "end_positions")}


def prediction(model: nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs)[0]


class LayerRuns:
    """Counts the submodule calls of the model's first checkpointable layer. They happen inside the layer's forward,
    which a checkpointed layer runs a second time during backward; the layer's own hooks stay outside the checkpoint,
    so they cannot show it."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        layer = next(module for module in model.modules() if isinstance(module, GradientCheckpointingLayer))
        for module in layer.modules():
            if module is not layer:
                module.register_forward_hook(self)

    def __call__(self, *_) -> None:
        self.calls += 1

    def per_forward(self, model: nn.Module, batch: dict) -> int:
        self.calls = 0
        model.train()
        model(**batch)
        calls, self.calls = self.calls, 0
        return calls


class LinearOutputDtypes:
    """The dtypes that the model's `nn.Linear` layers produce."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: set[torch.dtype] = set()
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.register_forward_hook(self)

    def __call__(self, _module, _inputs, output) -> None:
        self.seen.add(output.dtype)


class CheckpointingReports(TrainerCallback):
    def __init__(self) -> None:
        self.reports: list[bool] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.reports.append(model.is_activation_checkpointing)


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------------------------
# 1. bf16 and activation checkpointing from TrainingArguments
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES.values(), ids=repr)
def test_bf16_and_checkpointing_switch_on_through_training_arguments(case, tmp_path):
    model = case.build()
    steps = 6
    layer_runs = LayerRuns(model)
    calls_per_forward = layer_runs.per_forward(model, default_data_collator(case.examples(4)))
    dtypes = LinearOutputDtypes(model)
    reports = CheckpointingReports()
    # `gradient_checkpointing` is the name users know; Transformers 5.24 maps it to `activation_checkpointing`.
    args = training_arguments(
        tmp_path, bf16=True, gradient_checkpointing=True, per_device_train_batch_size=4, max_steps=steps,
        learning_rate=3e-3,
    )
    trainer = Trainer(model=model, args=args, train_dataset=case.examples(4), callbacks=[reports])
    trainer.train()
    losses = logged_losses(trainer)
    assert reports.reports == [True] * steps
    assert steps * calls_per_forward < layer_runs.calls <= 2 * steps * calls_per_forward  # recomputed in backward
    assert dtypes.seen == {torch.bfloat16}
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "case", [case for name, case in CASES.items() if name not in CHECKPOINTING_COVERED_ELSEWHERE], ids=repr
)
def test_checkpointed_gradients_equal_plain_gradients(case):
    model = case.build().train()
    batch = default_data_collator(case.examples(4))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(**batch).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    layer_runs = LayerRuns(model)
    plain = gradients()
    plain_calls, layer_runs.calls = layer_runs.calls, 0
    model.activation_checkpointing_enable()
    checkpointed = gradients()
    # Backward recomputes the layer up to its last saved activation (PyTorch stops the recomputation there).
    assert plain_calls < layer_runs.calls <= 2 * plain_calls
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# 2. Gradient accumulation
# --------------------------------------------------------------------------------------------------------------------


def train_with_sgd(case: Case, tmp_path, batch_size: int, accumulation: int) -> tuple[list[float], dict]:
    """Two SGD steps over the same 8 examples in order; no clipping, which would hide a wrong gradient scale."""
    model = case.build()
    args = training_arguments(
        tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=2,
        optim="sgd", learning_rate=0.1, max_grad_norm=0.0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=case.examples(8))
    trainer.train()
    return logged_losses(trainer), parameters(model)


@pytest.mark.parametrize("case", GRADIENT_ACCUMULATION_CASES, ids=repr)
def test_gradient_accumulation_matches_the_larger_batch(case, tmp_path):
    initial = parameters(case.build())
    accumulated_losses, accumulated = train_with_sgd(case, tmp_path / "accumulated", batch_size=2, accumulation=2)
    large_losses, large = train_with_sgd(case, tmp_path / "large", batch_size=4, accumulation=1)
    assert len(large_losses) == 2
    assert accumulated_losses == pytest.approx(large_losses, rel=1e-4)
    assert any((large[name] - initial[name]).abs().max() > 1e-3 for name in initial)
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# 3. PEFT LoRA
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraCase:
    case: Case
    config: Callable[[], peft.LoraConfig]
    adapted_layers: int  # how many dense layers the config's `target_modules` must reach

    def __repr__(self) -> str:
        return self.case.name


# The recommended targets (README): the dense projections around the M2 mixer, and in converted models the layers that
# the conversion left dense (here attention, the MLP being Monarch).
M2_MIXER_TARGETS = ["in_linear", "out_linear"]
LORA_CASES = [
    LoraCase(CASES["m2_bert_sequence_classification"], lambda: peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=M2_MIXER_TARGETS), adapted_layers=4),
    LoraCase(CASES["m2_gpt_causal_lm"], lambda: peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, target_modules=M2_MIXER_TARGETS), adapted_layers=4),
    LoraCase(CASES["m2_vit_image_classification"], lambda: peft.LoraConfig(
        r=4, target_modules=M2_MIXER_TARGETS, modules_to_save=["classifier"]), adapted_layers=4),
    LoraCase(CASES["monarch_bert_sequence_classification"], lambda: peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "key", "value", "attention.output.dense"]),
        adapted_layers=8),
    LoraCase(CASES["monarch_gpt2_lm_head"], lambda: peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, target_modules=["c_attn", "attn.c_proj"], fan_in_fan_out=True),
        adapted_layers=4),
]


def adapted_base_layers(model: nn.Module) -> list[nn.Module]:
    return [module.base_layer for module in model.modules() if isinstance(module, peft.tuners.lora.LoraLayer)]


def train_briefly(model: nn.Module, examples: list, tmp_path) -> None:
    """Three AdamW steps: LoRA's B factors start at zero, so the A factors first get gradients at the second."""
    args = training_arguments(tmp_path, per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=examples).train()


@pytest.mark.parametrize("lora", LORA_CASES, ids=repr)
def test_lora_adapts_the_dense_layers_trains_merges_and_reloads(lora, tmp_path):
    model = lora.case.build()
    examples = lora.case.examples(4)
    inputs = model_inputs(examples)
    base_outputs = prediction(model, inputs)

    adapted = peft.get_peft_model(model, lora.config())
    layers = adapted_base_layers(adapted)
    assert len(layers) == lora.adapted_layers
    assert all(type(layer) in (nn.Linear, Conv1D) for layer in layers)
    torch.testing.assert_close(prediction(adapted, inputs), base_outputs, rtol=0, atol=1e-6)

    before = parameters(adapted)
    train_briefly(adapted, examples, tmp_path / "train")
    after = parameters(adapted)
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)
    assert [name for name in trainable if torch.equal(after[name], before[name])] == []  # all got gradients
    assert [name for name in before if name not in trainable and not torch.equal(after[name], before[name])] == []

    trained_outputs = prediction(adapted, inputs)
    assert (trained_outputs - base_outputs).abs().max() > 1e-3
    adapted.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(lora.case.build(), tmp_path / "adapter")
    torch.testing.assert_close(prediction(reloaded, inputs), trained_outputs, rtol=0, atol=1e-6)

    merged = adapted.merge_and_unload()
    assert not adapted_base_layers(merged)
    torch.testing.assert_close(prediction(merged, inputs), trained_outputs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case_name, target, structured_class",
    [
        ("m2_bert_sequence_classification", "gated_layers", BlockdiagLinear),  # M2-BERT's MLP
        ("m2_gpt_causal_lm", "wo", MonarchLinear),  # M2-GPT's MLP
        ("monarch_bert_sequence_classification", "intermediate.dense", MonarchLinear),
        ("monarch_bert_sequence_classification", "dense", MonarchLinear),  # also reaches the Monarch MLP layers
    ],
)
def test_lora_refuses_monarch_and_blockdiag_layers(case_name, target, structured_class):
    model = CASES[case_name].build()
    with pytest.raises(ValueError, match=rf"Target module {structured_class.__name__}\(.*\) is not supported"):
        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=[target]))


def mixer_paths(model: nn.Module, inputs: dict, monkeypatch) -> dict[str, torch.Tensor]:
    """Outputs of the mixer's full-sequence paths: with autograd, in place (no grad), and both over small chunks."""
    import m2_hf.m2_mixer as mixer_module

    outputs = {"autograd": model(**inputs)[0].detach(), "in place": prediction(model, inputs)}
    with monkeypatch.context() as patch:
        patch.setattr(mixer_module, "_CPU_CHUNK_BYTES", 1)  # the smallest chunks: 8 channels each
        outputs["chunked autograd"] = model(**inputs)[0].detach()
        outputs["chunked in place"] = prediction(model, inputs)
    return outputs


@pytest.mark.parametrize("case_name", ["m2_bert_masked_lm", "m2_gpt_causal_lm"])
def test_lora_on_the_mixer_input_projection_reaches_every_mixer_path(case_name, monkeypatch):
    """The mixer reads its input projection's weight directly, for speed, unless the layer is wrapped; then the
    wrapper's output must feed every path, M2-GPT's incremental decoding included."""
    case = CASES[case_name]
    inputs = model_inputs(case.examples(2))
    inputs["attention_mask"][0, :3] = 0
    is_gpt = case_name == "m2_gpt_causal_lm"
    if is_gpt:
        inputs["use_cache"] = False  # else an evaluation forward takes the incremental path
    model = case.build()
    base = prediction(model, inputs)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["in_linear"], init_lora_weights=False))
    paths = mixer_paths(adapted, inputs, monkeypatch)
    if is_gpt:
        real = inputs["attention_mask"].bool()
        incremental, _ = incremental_logits(adapted, inputs["input_ids"], prompt_length=5, mask=real.long())
        paths["incremental"] = incremental[real]
    merged = prediction(adapted.merge_and_unload(), inputs)
    assert (merged - base).abs().max() > 1e-3
    for path, outputs in paths.items():
        expected = merged[real] if path == "incremental" else merged
        torch.testing.assert_close(outputs, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{path}: {m}")


@pytest.mark.parametrize("case_name", ["m2_bert_masked_lm", "m2_gpt_causal_lm", "m2_vit_image_classification"])
def test_inference_keeps_every_layers_hidden_states(case_name, monkeypatch):
    """In inference the mixers and MLPs compute in `Workspace` scratch tensors (the CPU fast path); what a layer
    returns must stay its own. Every recorded hidden state equals the one computed with autograd, over many small
    chunks."""
    import m2_hf.m2_mixer as mixer_module

    case = CASES[case_name]
    inputs = model_inputs(case.examples(2))
    if "attention_mask" in inputs:
        inputs["attention_mask"][0, :3] = 0
    if case_name == "m2_gpt_causal_lm":
        inputs["use_cache"] = False
    model = case.build()
    monkeypatch.setattr(mixer_module, "_CPU_CHUNK_BYTES", 1)
    recorded = model(**inputs, output_hidden_states=True).hidden_states
    with torch.no_grad():
        inferred = model(**inputs, output_hidden_states=True).hidden_states
    assert len(inferred) == len(recorded) >= 3
    assert len({state.data_ptr() for state in inferred}) == len(inferred)
    for layer, (got, expected) in enumerate(zip(inferred, recorded)):
        torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"layer {layer}: {m}")


@pytest.mark.parametrize("case_name", ["m2_bert_sequence_classification", "monarch_bert_sequence_classification"])
def test_lora_all_linear_leaves_structured_layers_alone(case_name):
    model = CASES[case_name].build()
    structured = list(structured_layers(model))
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    assert structured and all(type(layer) in (nn.Linear, Conv1D) for layer in adapted_base_layers(adapted))
    assert list(structured_layers(model)) == structured
