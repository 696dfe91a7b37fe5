"""`m2-convert monarch` on any Transformers architecture: a tiny random checkpoint of each (decoders, encoders,
encoder-decoders, a vision transformer) saved with `save_pretrained`, converted once per module, and checked as a
Transformers model: presets, loading through the original head's Auto class, nblocks=1 equality, generation with the
model's own cache against the unconverted class, exact dense round trip, tying; for a few, remote code without m2-hf,
pipelines, a Trainer step and saving."""

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import m2_hf
from conversion.cli import main
from conversion.monarch import MonarchSettings, convert_to_monarch, preset_layers
from m2_hf import BlockdiagLinear, MonarchLinear
from remote_code import run_without_m2_hf

WORDS = "the quick brown fox jumps over a lazy dog monarch matrices mix tokens and images well".split()


@dataclass
class Architecture:
    config: str
    head: str
    auto: str
    settings: dict
    kind: str  # decoder | seq2seq | encoder | vision
    attention: int  # linear layers the `attention` preset selects (2 blocks; encoder and decoder for seq2seq)
    mlp: int
    extras: dict = field(default_factory=dict)


_DECODER = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)  # grouped-query: k/v are 32 -> 16
ARCHITECTURES = {
    "llama": Architecture("LlamaConfig", "LlamaForCausalLM", "AutoModelForCausalLM", _DECODER, "decoder", 8, 6),
    "mistral": Architecture("MistralConfig", "MistralForCausalLM", "AutoModelForCausalLM", _DECODER, "decoder", 8, 6),
    "qwen2": Architecture("Qwen2Config", "Qwen2ForCausalLM", "AutoModelForCausalLM", _DECODER, "decoder", 8, 6),
    "qwen3": Architecture("Qwen3Config", "Qwen3ForCausalLM", "AutoModelForCausalLM", {**_DECODER, "head_dim": 8},
                          "decoder", 8, 6),
    "gemma": Architecture("GemmaConfig", "GemmaForCausalLM", "AutoModelForCausalLM", {**_DECODER, "head_dim": 8},
                          "decoder", 8, 6),
    "phi3": Architecture("Phi3Config", "Phi3ForCausalLM", "AutoModelForCausalLM", {**_DECODER, "pad_token_id": 0},
                         "decoder", 4, 4),  # fused qkv_proj and gate_up_proj
    "opt": Architecture("OPTConfig", "OPTForCausalLM", "AutoModelForCausalLM",
                        dict(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             word_embed_proj_dim=32, max_position_embeddings=64), "decoder", 8, 4),
    "gpt_neox": Architecture("GPTNeoXConfig", "GPTNeoXForCausalLM", "AutoModelForCausalLM",
                             dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64), "decoder", 4, 4),
    "falcon": Architecture("FalconConfig", "FalconForCausalLM", "AutoModelForCausalLM",
                           dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
                           "decoder", 4, 4),  # multi-query: fused query_key_value is 32 -> 48
    "gpt2": Architecture("GPT2Config", "GPT2LMHeadModel", "AutoModelForCausalLM",
                         dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64), "decoder", 4, 4),
    "t5": Architecture("T5Config", "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM",
                       dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            decoder_start_token_id=0), "seq2seq", 24, 8),  # with the decoder's cross-attention
    "bart": Architecture("BartConfig", "BartForConditionalGeneration", "AutoModelForSeq2SeqLM",
                         dict(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, max_position_embeddings=64), "seq2seq", 24, 8),
    "bert": Architecture("BertConfig", "BertForMaskedLM", "AutoModelForMaskedLM",
                         dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64), "encoder", 8, 4),
    "roberta": Architecture("RobertaConfig", "RobertaForSequenceClassification", "AutoModelForSequenceClassification",
                            dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64, pad_token_id=1, num_labels=3),
                            "encoder", 8, 4),
    "distilbert": Architecture("DistilBertConfig", "DistilBertForMaskedLM", "AutoModelForMaskedLM",
                               dict(vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                    max_position_embeddings=64), "encoder", 8, 4),
    "vit": Architecture("ViTConfig", "ViTForImageClassification", "AutoModelForImageClassification",
                        dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, num_labels=3), "vision", 8, 4),
}
SUBSET = ["llama", "t5", "vit"]  # remote code, Trainer and saving
NBLOCKS = 2


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                     eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)


def model_inputs(kind: str, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    if kind == "vision":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}
    ids = torch.randint(4, 90, (batch, 7), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(4, 90, (batch, 5), generator=generator)
    return inputs


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@dataclass
class Converted:
    name: str
    architecture: Architecture
    source: Path
    monarch: Path  # --targets all --nblocks 2, by the CLI
    exact: Path  # --targets all --nblocks 1
    dense: Path  # `m2-convert dense` of `monarch`
    original: torch.nn.Module
    report: dict


_BUILT: dict[str, Converted] = {}


def build(name: str, tmp_path_factory) -> Converted:
    """The tiny source of an architecture, converted by the CLI (nblocks 2) and the API (nblocks 1), and back to
    dense by the CLI; once per test session."""
    if name in _BUILT:
        return _BUILT[name]
    architecture = ARCHITECTURES[name]
    folder = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    config = getattr(transformers, architecture.config)(**architecture.settings)
    original = getattr(transformers, architecture.head)(config).eval()
    source = folder / "source"
    original.save_pretrained(source)
    if architecture.kind == "vision":
        transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(source)
    else:
        write_tokenizer(source)
    assert main(["monarch", str(source), str(folder / "monarch"), "--targets", "all", "--nblocks", str(NBLOCKS)]) == 0
    report = json.loads((folder / "monarch" / "conversion_report.json").read_text())
    convert_to_monarch(source, folder / "exact", MonarchSettings(targets=["all"], nblocks={"*": 1}), progress=False)
    assert main(["dense", str(folder / "monarch"), str(folder / "dense")]) == 0
    _BUILT[name] = Converted(name, architecture, source, folder / "monarch", folder / "exact", folder / "dense",
                             original, report)
    return _BUILT[name]


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def converted(request, tmp_path_factory) -> Converted:
    return build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> list[Converted]:
    return [build(name, tmp_path_factory) for name in SUBSET]


def load(converted: Converted, folder: Path, auto: str = None):
    return getattr(transformers, auto or converted.architecture.auto).from_pretrained(folder).eval()


# --------------------------------------------------------------------------------------------------------------------
# Every architecture
# --------------------------------------------------------------------------------------------------------------------


def test_presets_select_the_blocks_layers_and_leave_the_rest_dense(converted):
    presets = preset_layers(converted.original.base_model)
    assert len(presets["attention"]) == converted.architecture.attention
    assert len(presets["mlp"]) == converted.architecture.mlp
    assert presets["all"] == [n for n in presets["all"] if n in presets["attention"] or n in presets["mlp"]]
    assert set(presets["all"]) == set(presets["attention"]) | set(presets["mlp"])
    assert not set(presets["attention"]) & set(presets["mlp"])
    # Heads, poolers, embeddings' projections and the T5 lm_head (inside its base model) stay out of every preset.
    assert not [n for n in presets["all"] if not any(part.isdigit() for part in n.split("."))]
    assert [layer["name"] for layer in converted.report["layers"]] == presets["all"]


def test_converted_folder_loads_through_the_original_heads_auto_class(converted):
    config = json.loads((converted.monarch / "config.json").read_text())
    source_type = json.loads((converted.source / "config.json").read_text())["model_type"]
    assert config["model_type"] == f"monarch_{source_type}"
    assert config["architectures"] == [f"Monarch{converted.architecture.head}"]
    head = f"Monarch{converted.architecture.head}"
    assert config["auto_map"][converted.architecture.auto] == f"modeling_monarch_converted.{head}"
    assert {"AutoConfig", "AutoModel", converted.architecture.auto} < set(config["auto_map"])  # every head, not one
    model = load(converted, converted.monarch)
    assert type(model).__name__ == f"Monarch{converted.architecture.head}"
    assert isinstance(model, getattr(transformers, converted.architecture.head))
    structured = [m for m in model.modules() if isinstance(m, (MonarchLinear, BlockdiagLinear))]
    expected = converted.architecture.attention + converted.architecture.mlp
    assert len(structured) == len(config["monarch_layers"]) == expected
    inputs = model_inputs(converted.architecture.kind)
    assert logits(model, inputs).shape == logits(converted.original, inputs).shape
    bare = transformers.AutoModel.from_pretrained(converted.monarch)  # the base model from a head's folder
    assert type(bare).__name__.startswith("Monarch")
    assert sum(isinstance(m, (MonarchLinear, BlockdiagLinear)) for m in bare.modules()) == expected


def tensors_of(value) -> list[torch.Tensor]:
    """The tensors of an output field: a tensor, or a tuple of them (hidden states); caches are left out."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in tensors_of(item)]
    return []


def test_nblocks_1_equals_the_original_with_every_hidden_state(converted):
    """Logits and every recorded output (`output_hidden_states`: Transformers records them by hooks it looks up by
    the model's class) equal the original's."""
    inputs = {**model_inputs(converted.architecture.kind), "output_hidden_states": True}
    with torch.no_grad():
        ours, theirs = load(converted, converted.exact)(**inputs), converted.original(**inputs)
    assert list(ours.keys()) == list(theirs.keys())
    assert any("hidden_states" in key for key in theirs.keys())
    for key in theirs.keys():
        expected = tensors_of(theirs[key])
        assert len(tensors_of(ours[key])) == len(expected), key
        for mine, reference in zip(tensors_of(ours[key]), expected):
            torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)


def test_dense_round_trip_is_the_original_type_and_exact(converted):
    model = load(converted, converted.monarch)
    dense_config = json.loads((converted.dense / "config.json").read_text())
    source_config = json.loads((converted.source / "config.json").read_text())
    assert dense_config == source_config
    assert not list(converted.dense.glob("*.py"))
    dense = load(converted, converted.dense)
    assert type(dense) is getattr(transformers, converted.architecture.head)
    dense_state = dense.base_model.state_dict()
    for name in model.config.monarch_layers:
        structured = model.base_model.get_submodule(name)
        weight = dense_state[f"{name}.weight"]
        weight = weight.t() if converted.name == "gpt2" else weight  # Conv1D stores it transposed
        assert torch.equal(weight, structured.dense_weight()), name
    structured_names = tuple(f"{name}." for name in model.config.monarch_layers)
    for key, value in model.base_model.state_dict().items():
        if not key.startswith(structured_names):
            assert torch.equal(dense_state[key], value), key
    inputs = model_inputs(converted.architecture.kind)
    torch.testing.assert_close(logits(dense, inputs), logits(model, inputs), rtol=1e-5, atol=1e-5)


def test_tying_is_that_of_the_original(converted):
    model = load(converted, converted.monarch)
    output = converted.original.get_output_embeddings()
    if output is None:  # vision and classification heads have nothing to tie
        assert model.get_output_embeddings() is None
        return
    tied = output.weight is converted.original.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert tied == bool(getattr(converted.original.config, "tie_word_embeddings", False))


@pytest.mark.parametrize("name", [name for name, a in ARCHITECTURES.items() if a.kind in ("decoder", "seq2seq")])
def test_generate_with_the_models_cache_equals_the_unconverted_forward(name, tmp_path_factory):
    converted = build(name, tmp_path_factory)
    model, dense = load(converted, converted.monarch), load(converted, converted.dense)
    prompt = model_inputs("decoder", batch=1)["input_ids"]
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                   output_logits=True)
    cached = model.generate(prompt, use_cache=True, **options)
    assert cached.get("cache", cached.get("past_key_values")) is not None  # the model's own cache was used
    # The unconverted class on the same (densified) weights, a whole forward per token.
    expected = dense.generate(prompt, use_cache=False, **options)
    assert torch.equal(cached.sequences, expected.sequences)
    assert len(cached.logits) == len(expected.logits) == 6
    for step_logits, expected_logits in zip(cached.logits, expected.logits):
        torch.testing.assert_close(step_logits, expected_logits, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# A few architectures: remote code, pipelines, Trainer, saving
# --------------------------------------------------------------------------------------------------------------------


def test_trust_remote_code_without_m2_hf(subset, tmp_path):
    cases = []
    for index, converted in enumerate(subset):  # one fresh interpreter for all: each start costs seconds
        model = load(converted, converted.monarch)
        inputs = model_inputs(converted.architecture.kind)
        torch.save({"inputs": inputs, "logits": logits(model, inputs)}, tmp_path / f"expected{index}.pt")
        cases.append((str(converted.monarch), converted.architecture.auto, f"Monarch{converted.architecture.head}",
                      converted.architecture.kind != "vision", str(tmp_path / f"expected{index}.pt")))
    run_without_m2_hf(
        f"""
        import torch, transformers
        for index, (folder, auto_name, class_name, generates, expected) in enumerate({cases!r}):
            data = torch.load(expected, weights_only=True)
            auto = getattr(transformers, auto_name)
            model = auto.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            assert type(model).__name__ == class_name, type(model).__name__
            with torch.no_grad():
                torch.testing.assert_close(model(**data["inputs"]).logits, data["logits"])
            if generates:
                ids = data["inputs"]["input_ids"][:1]
                assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[-1] >= 3
            model.save_pretrained(f"saved{{index}}")
            again = auto.from_pretrained(f"saved{{index}}", trust_remote_code=True).eval()
            with torch.no_grad():
                torch.testing.assert_close(again(**data["inputs"]).logits, data["logits"])
            transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)
        """,
        tmp_path,
    )


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_pipeline_gives_what_the_dense_round_trip_gives(name, subset):
    converted = subset[SUBSET.index(name)]
    if converted.name == "llama":
        task, argument, options = "text-generation", "the quick brown fox", {"max_new_tokens": 5, "do_sample": False}
    elif converted.name == "vit":
        from PIL import Image

        generator = torch.Generator().manual_seed(0)
        pixels = (torch.rand(16, 16, 3, generator=generator) * 255).to(torch.uint8).numpy()
        task, argument, options = "image-classification", Image.fromarray(pixels), {}
    structured = transformers.pipeline(task, model=str(converted.monarch))
    assert type(structured.model).__name__ == f"Monarch{converted.architecture.head}"
    expected = transformers.pipeline(task, model=str(converted.dense))(argument, **options)
    assert structured(argument, **options) == expected


@pytest.mark.parametrize("name", SUBSET)
def test_a_trainer_step_and_save_pretrained(name, subset, tmp_path):
    converted = subset[SUBSET.index(name)]
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = load(converted, converted.monarch).train()
    inputs = model_inputs(converted.architecture.kind, batch=4)
    columns = {key: value.tolist() for key, value in inputs.items() if key != "attention_mask"}
    if converted.architecture.kind == "vision":
        columns["labels"] = [0, 1, 2, 0]
    elif converted.architecture.kind == "seq2seq":
        columns = {"input_ids": columns["input_ids"], "labels": columns.pop("decoder_input_ids")}
    else:
        columns["labels"] = columns["input_ids"]
    layer = next(m for m in model.modules() if isinstance(m, MonarchLinear))
    before = layer.blkdiag1.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "train"), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
                             logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(columns))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(layer.blkdiag1.detach(), before)  # the structured factors train
    trainer.save_model(tmp_path / "fine-tuned")
    reloaded = load(converted, tmp_path / "fine-tuned")
    assert type(reloaded) is type(model)
    model.eval()
    evaluation = model_inputs(converted.architecture.kind)
    torch.testing.assert_close(logits(reloaded, evaluation), logits(model, evaluation))


# --------------------------------------------------------------------------------------------------------------------
# Folders of the format before any architecture was supported, and what cannot be converted
# --------------------------------------------------------------------------------------------------------------------

# Written by m2-convert monarch before this change (config.json and weights of a `monarch_bert` and a `monarch_gpt2`
# folder, with the outputs that code gave): such folders keep loading, with the same outputs.
LEGACY_FOLDERS = Path(__file__).parent / "fixtures" / "monarch_folders_v1"


@pytest.mark.parametrize("name,auto,head", [("bert", "AutoModelForMaskedLM", "MonarchBertForMaskedLM"),
                                            ("gpt2", "AutoModelForCausalLM", "MonarchGPT2LMHeadModel")])
def test_folders_written_before_keep_loading_with_the_same_outputs(name, auto, head, tmp_path):
    folder = LEGACY_FOLDERS / name
    expected = load_file(folder / "expected_outputs.safetensors")
    model = getattr(transformers, auto).from_pretrained(folder).eval()
    assert type(model).__name__ == head
    assert sum(isinstance(m, MonarchLinear) for m in model.modules()) == len(model.config.monarch_layers) > 0
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"])
    assert main(["dense", str(folder), str(tmp_path / "dense")]) == 0
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["model_type"] == name


def test_models_that_cannot_be_converted_are_refused_clearly(tmp_path, capsys):
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
    resnet.save_pretrained(tmp_path / "resnet")
    assert main(["monarch", str(tmp_path / "resnet"), str(tmp_path / "out")]) == 2
    assert "no linear layers" in capsys.readouterr().err

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "not_an_architecture"}))
    assert main(["monarch", str(unknown), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "does not know the model type 'not_an_architecture'" in error and error.startswith("m2-convert: error:")
    assert not (tmp_path / "out").exists()


def test_dry_run_and_inspect_list_what_each_preset_selects(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(**_DECODER, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                         num_experts=4, num_experts_per_tok=2)
    transformers.Qwen2MoeForCausalLM(config).save_pretrained(tmp_path / "moe")
    capsys.readouterr()
    assert main(["monarch", str(tmp_path / "moe"), str(tmp_path / "out"), "--dry-run"]) == 0
    captured = capsys.readouterr()
    presets = json.loads(captured.out)["presets"]
    assert f"preset mlp       {len(presets['mlp'])} layers" in captured.err
    assert "layers.0.mlp.shared_expert.gate_proj" in presets["mlp"]
    assert "layers.0.self_attn.k_proj" in presets["attention"]
    assert not [name for name in presets["all"] if "gate" in name.split(".")[-1].replace("gate_proj", "")]  # routers
    assert not (tmp_path / "out").exists()
    assert main(["inspect", str(tmp_path / "moe")]) == 0
    text = capsys.readouterr().out
    for preset, layers in presets.items():
        assert f"preset {preset:9} {len(layers)} layers" in text
    assert "layers.1.self_attn.v_proj" in text and "layers.0.mlp.shared_expert_gate" not in text


def test_the_readme_decoder_example_runs_as_written(tmp_path):
    from test_readme import ROOT, run_block

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Worked example: a decoder LM", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.DOTALL)
    assert [language for language, _ in blocks] == ["python", "bash", "python"]
    outputs = [run_block(language, code, tmp_path) for language, code in blocks]
    assert "preset mlp       6 layers" in outputs[1] and "preset attention 8 layers" in outputs[1]
    report = json.loads((tmp_path / "report.json").read_text())
    assert {layer["nblocks"] for layer in report["layers"] if ".mlp." in layer["name"]} == {4}
    assert "MonarchLlamaForCausalLM MonarchLinear(in_features=256, out_features=64, nblocks=2" in outputs[2]
    assert "head layers      lm_head" in outputs[1] and report["layers"][-1]["name"] == "lm_head"
    assert "MonarchLinear(in_features=256, out_features=512, nblocks=4, bias=False)" in outputs[2]
    assert "LlamaForCausalLM True" in outputs[2]


def test_a_config_without_architectures_gets_the_head_its_weights_fit(tmp_path_factory, tmp_path, capsys):
    source = tmp_path / "no-architectures"
    shutil.copytree(build("qwen3", tmp_path_factory).source, source)
    config = json.loads((source / "config.json").read_text())
    del config["architectures"]
    (source / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["monarch", str(source), str(tmp_path / "out"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "Qwen3ForCausalLM"


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoders_calibrate_refine_and_report_on_text(name, tmp_path_factory, tmp_path):
    """The decoder's calibration inputs are the text shifted behind its start token: the calibrated fit, refinement
    and the report's comparison run on every layer (encoder, decoder, cross-attention), and beat the closed form."""
    converted = build(name, tmp_path_factory)
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(12)) + "\n")
    runs = {"closed-form": ("closed-form", 0), "calibrated": ("calibrated", 0), "refined": ("closed-form", 8)}
    reports = {
        run: convert_to_monarch(converted.source, tmp_path / run, MonarchSettings(
            targets=["all"], nblocks={"*": 2}, method=method, calibration_file=text, refine_steps=steps),
            progress=False)
        for run, (method, steps) in runs.items()
    }
    closed, calibrated, refined = (reports[run]["calibration"] for run in runs)
    assert calibrated["samples"] == closed["samples"] == 12
    assert calibrated["token_cosine"] > closed["token_cosine"] and refined["token_cosine"] > closed["token_cosine"]
    assert len(reports["calibrated"]["layers"]) == converted.architecture.attention + converted.architecture.mlp
    refinement = reports["refined"]["refinement"]
    assert refinement["hidden_state_error_after"] < refinement["hidden_state_error_before"]


def test_a_tied_lm_head_inside_the_base_model_is_refused(tmp_path_factory, tmp_path, capsys):
    """T5ForConditionalGeneration is its own base model: its `lm_head`, tied to the shared embeddings, is a base layer
    that a regular expression can name, and converting it would untie it."""
    converted = build("t5", tmp_path_factory)
    assert main(["monarch", str(converted.source), str(tmp_path / "out"), "--targets", "lm_head"]) != 0
    assert "lm_head shares its weight with shared.weight (tie_word_embeddings=True)" in capsys.readouterr().err
