"""Every M2 model and the converted `monarch_*` models in float16 and bfloat16 on the CPU, as users get there: built
with `dtype=`, loaded with `from_pretrained(..., dtype=...)`, run under `torch.autocast`, trained by `Trainer`. The
FFTs compute in float32 throughout.

Tolerance: a forward of these two-layer models goes through a few dozen roundings of relative size eps / 2 (eps: the
dtype's machine epsilon, 2^-10 for float16, 2^-7 for bfloat16), which the layers pass on. Measured against float32,
the largest error is 4.9 eps of the output's largest magnitude (M2-GPT sequence classification in float16, recorded
path: six logits, which cancellation makes small); every other model and path stays within 3.2 eps. The bound, 8 eps,
leaves a margin of 1.6 on the worst case. That FFTs do not run in half precision is checked directly (`fft_dtypes`).
"""

import math

import pytest
import torch
from transformers import Trainer

import m2_hf
from m2_hf import (
    M2BertForMaskedLM,
    M2BertForQuestionAnswering,
    M2BertForSequenceClassification,
    M2BertForTextEncoding,
    M2BertForTokenClassification,
    M2BertModel,
    M2GPTForCausalLM,
    M2GPTForSequenceClassification,
    M2GPTModel,
    M2ViTForImageClassification,
    M2ViTModel,
)
from m2_hf.m2_mixer import _ExponentialModulation, _PositionalFeatures
from m2_hf.modeling_monarch_converted import CONVERTED_CLASSES
from test_m2_bert import tiny_config as m2_bert_config
from test_m2_gpt import incremental_logits
from test_m2_gpt import tiny_config as m2_gpt_config
from test_m2_vit import images
from test_m2_vit import tiny_config as m2_vit_config
from test_training_features import CASES, logged_losses, parameters, single_thread, training_arguments  # noqa: F401

HALF_DTYPES = [torch.float16, torch.bfloat16]

MONARCH_BERT = dict(
    vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=32, monarch_layers={"encoder.layer.0.intermediate.dense": 4,
                                                "encoder.layer.1.attention.self.query": 2},
)
MONARCH_GPT2 = dict(
    vocab_size=120, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0,
    monarch_layers={"h.0.mlp.c_fc": 4, "h.0.mlp.c_proj": 4, "h.1.attn.c_attn": 2},
)
# (class, config builder, kind of input)
MODELS = [
    *[(cls, m2_bert_config, "text") for cls in (
        M2BertModel, M2BertForMaskedLM, M2BertForSequenceClassification, M2BertForTokenClassification,
        M2BertForQuestionAnswering, M2BertForTextEncoding,
    )],
    *[(cls, m2_gpt_config, "text") for cls in (M2GPTModel, M2GPTForCausalLM, M2GPTForSequenceClassification)],
    *[(cls, m2_vit_config, "image") for cls in (M2ViTModel, M2ViTForImageClassification)],
    (CONVERTED_CLASSES["BertForMaskedLM"], lambda: m2_hf.MonarchBertConfig(**MONARCH_BERT), "text"),
    (CONVERTED_CLASSES["BertForMaskedLM"],
     lambda: m2_hf.MonarchBertConfig(**MONARCH_BERT, monarch_structure="blockdiag"), "text"),
    (CONVERTED_CLASSES["GPT2LMHeadModel"], lambda: m2_hf.MonarchGPT2Config(**MONARCH_GPT2), "text"),
]
MODEL_IDS = [
    f"{cls.__name__}-{getattr(build(), 'monarch_structure', 'm2')}" for cls, build, _ in MODELS
]


def model_inputs(kind: str) -> dict:
    """Two examples; text ones with the second right-padded after 13 of 20 tokens."""
    if kind == "image":
        return {"pixel_values": images()}
    ids = torch.randint(5, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def real_outputs(output: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The model's main output at real tokens only (padded positions carry no meaning)."""
    mask = inputs.get("attention_mask")
    if mask is not None and output.shape[:2] == mask.shape:
        return output[mask.bool()]
    return output


def main_output(model, inputs: dict) -> torch.Tensor:
    return real_outputs(model(**inputs)[0], inputs)


def assert_within_half_precision(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(actual).all()
    error = (actual.float() - expected).abs().max().item()
    bound = 8 * torch.finfo(dtype).eps * expected.abs().max().item()
    assert error <= bound, f"max |error| {error:.3g} > {bound:.3g}"


@pytest.fixture
def fft_dtypes(monkeypatch):
    """``{(function, input dtype, output dtype)}`` of every FFT computed during the test."""
    seen = set()
    for name in ("rfft", "irfft"):
        original = getattr(torch.fft, name)

        def recording(x, *args, _original=original, _name=name, **kwargs):
            y = _original(x, *args, **kwargs)
            seen.add((_name, x.dtype, y.dtype))
            return y

        monkeypatch.setattr(torch.fft, name, recording)
    return seen


FLOAT32_FFTS = {("rfft", torch.float32, torch.complex64), ("irfft", torch.complex64, torch.float32)}


def assert_ffts_in_float32(fft_dtypes: set, model) -> None:
    """M2 models compute FFTs, all in float32; converted models compute none."""
    if type(model).__name__.startswith("M2"):
        assert fft_dtypes == FLOAT32_FFTS
    else:
        assert not fft_dtypes


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_a_model_built_in_half_precision_holds_the_float32_construction_rounded(dtype):
    """The positional features and decay rates are constants of the architecture: a half-precision model rounds
    the float32 (official) values instead of computing its own in half precision (which float16 cannot at all)."""
    model = M2GPTModel._from_config(m2_gpt_config(), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    for module in model.modules():
        if isinstance(module, _PositionalFeatures):
            z, t = _PositionalFeatures.initial_features(module.z.shape[-1], module.z.shape[1])
            assert torch.equal(module.z, z.to(dtype)) and torch.equal(module.t, t.to(dtype))
        elif isinstance(module, _ExponentialModulation):
            assert torch.equal(module.deltas, _ExponentialModulation.initial_deltas(module.deltas.shape[-1]).to(dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("cls,config,kind", MODELS, ids=MODEL_IDS)
def test_builds_loads_and_runs_in_half_precision(cls, config, kind, dtype, fft_dtypes, tmp_path):
    inputs = model_inputs(kind)
    built = cls._from_config(config(), dtype=dtype).eval()
    assert {p.dtype for p in built.parameters()} == {dtype}
    with torch.no_grad():
        assert torch.isfinite(main_output(built, inputs)).all()

    torch.manual_seed(0)
    reference = cls(config()).eval()
    reference.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = main_output(reference, inputs)
    loaded = cls.from_pretrained(tmp_path, dtype=dtype).eval()
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    with torch.no_grad():
        inferred = main_output(loaded, inputs)  # the inference path (in-place, workspace tensors)
    recorded = main_output(loaded, inputs)  # the path that autograd records
    assert inferred.dtype == recorded.dtype == dtype
    assert_within_half_precision(inferred, expected, dtype)
    assert_within_half_precision(recorded.detach(), expected, dtype)
    assert_ffts_in_float32(fft_dtypes, loaded)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("cls,config,kind", MODELS, ids=MODEL_IDS)
def test_runs_under_autocast(cls, config, kind, dtype, fft_dtypes):
    inputs = model_inputs(kind)
    torch.manual_seed(0)
    model = cls(config()).eval()
    with torch.no_grad():
        expected = main_output(model, inputs)
    with torch.autocast("cpu", dtype=dtype):
        with torch.no_grad():
            inferred = main_output(model, inputs)
        recorded = main_output(model, inputs).detach()
    assert_within_half_precision(inferred, expected, dtype)
    assert_within_half_precision(recorded, expected, dtype)
    assert_ffts_in_float32(fft_dtypes, model)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_incremental_decoding_in_half_precision(dtype, chunk, fft_dtypes, tmp_path):
    """A prompt, then one token (a direct convolution with the stored inputs) or three (an FFT) at a time."""
    torch.manual_seed(0)
    reference = M2GPTForCausalLM(m2_gpt_config()).eval()
    reference.save_pretrained(tmp_path)
    inputs = model_inputs("text")
    inputs["attention_mask"] = inputs["attention_mask"].flip(-1)  # left padding, as for generation
    with torch.no_grad():
        expected = main_output(reference, inputs)
    model = M2GPTForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    logits, _ = incremental_logits(model, inputs["input_ids"], 8, chunk, inputs["attention_mask"])
    assert logits.dtype == dtype
    assert_within_half_precision(real_outputs(logits, inputs), expected, dtype)
    assert_ffts_in_float32(fft_dtypes, model)


class AutocastDtypes:
    """The autocast dtype (None without autocast) that the forwards of ``model``'s submodules run under (Trainer
    enters autocast inside the model's own forward, after its hooks)."""

    def __init__(self, model) -> None:
        self.seen = set()
        for child in model.children():
            child.register_forward_pre_hook(self)

    def __call__(self, *_) -> None:
        self.seen.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)


# Each mode: the weights' dtype and the autocast dtype that a user's own `torch.autocast` around `Trainer.train()` sets
# (accelerate ignores `fp16=True` on the CPU, silently training in float32). bf16 autocast through Transformers' switch
# (`bf16=True`) is covered for the same models by test_training_features.py.
TRAINING_MODES = {
    "float16_weights": (torch.float16, None),
    "bfloat16_weights": (torch.bfloat16, None),
    "float16_autocast": (torch.float32, torch.float16),
}


@pytest.mark.parametrize("mode", TRAINING_MODES)
@pytest.mark.parametrize("case", CASES.values(), ids=repr)
def test_a_trainer_step_in_half_precision(case, mode, fft_dtypes, tmp_path):
    weights, autocast = TRAINING_MODES[mode]
    model = case.build().to(weights)
    before = parameters(model)
    autocast_dtypes = AutocastDtypes(model)
    args = training_arguments(tmp_path, per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=case.examples(4))
    with torch.autocast("cpu", dtype=autocast or torch.float16, enabled=autocast is not None):
        trainer.train()

    assert autocast_dtypes.seen == {autocast}
    (loss,) = logged_losses(trainer)
    assert math.isfinite(loss)
    assert all(p.dtype == weights and torch.isfinite(p).all() for p in model.parameters())
    # On these tiny random models some gradients of the implicit filters are about 1e-8: below float16's range
    # without loss scaling (which `fp16=True` adds), and so far below Adam's epsilon that a bfloat16 value of 1 does
    # not move. Every other parameter must have changed.
    unchanged = [
        name for name, p in model.named_parameters() if "filter_fn" not in name and torch.equal(p, before[name])
    ]
    assert not unchanged
    assert_ffts_in_float32(fft_dtypes, model)
