"""`m2-convert monarch` on layers outside the base model (an LM head, a classifier) that a regular expression names:
converted, loaded through the original head's Auto class (here and as remote code), exact at nblocks=1, densified
back exactly, calibrated; a head tied to the input embeddings, and a budget over heads, refused clearly."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import m2_hf  # noqa: F401  (registers the converted families)
from conversion.cli import main
from conversion.monarch import MonarchSettings, convert_to_monarch
from m2_hf import MonarchLinear
from remote_code import run_without_m2_hf
from test_conversion_any_architecture import _DECODER, WORDS, model_inputs, write_tokenizer


def save_source(folder, config_class: str, head: str, **settings):
    torch.manual_seed(0)
    model = getattr(transformers, head)(getattr(transformers, config_class)(**settings)).eval()
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama with its own (untied) LM head, converted with the head at nblocks 2 and 1."""
    folder = tmp_path_factory.mktemp("llama-head")
    original = save_source(folder / "source", "LlamaConfig", "LlamaForCausalLM", **_DECODER, tie_word_embeddings=False)
    assert main(["monarch", str(folder / "source"), str(folder / "monarch"), "--targets", "mlp", "lm_head",
                 "--nblocks", "2"]) == 0
    convert_to_monarch(folder / "source", folder / "exact", MonarchSettings(targets=["all", "lm_head"],
                                                                           nblocks={"*": 1}), progress=False)
    return folder, original


def test_a_named_lm_head_is_converted_and_loads_through_the_original_auto_class(llama):
    folder, original = llama
    config = json.loads((folder / "monarch" / "config.json").read_text())
    assert config["monarch_head_layers"] == {"lm_head": 2}
    assert "lm_head" not in config["monarch_layers"] and len(config["monarch_layers"]) == 6
    report = json.loads((folder / "monarch" / "conversion_report.json").read_text())
    assert report["layers"][-1]["name"] == "lm_head" and report["layers"][-1]["nblocks"] == 2
    weights = load_file(folder / "monarch" / "model.safetensors")
    assert {"lm_head.blkdiag1", "lm_head.blkdiag2"} <= set(weights) and "lm_head.weight" not in weights
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "monarch").eval()
    assert type(model.lm_head).__name__ == "ConvertedMonarchLinear" and isinstance(model.lm_head, MonarchLinear)
    inputs = model_inputs("decoder")
    with torch.no_grad():
        structured = model(**inputs).logits
        expected = model.model(**inputs).last_hidden_state @ model.lm_head.dense_weight().t()
    torch.testing.assert_close(structured, expected, rtol=1e-4, atol=1e-5)
    assert model.generate(inputs["input_ids"][:1], max_new_tokens=3, do_sample=False).shape[-1] == 10
    base = transformers.AutoModel.from_pretrained(folder / "monarch")  # the base model alone has no head to structure
    assert not hasattr(base, "lm_head")


def test_nblocks_1_with_the_head_equals_the_original(llama):
    folder, original = llama
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "exact").eval()
    assert isinstance(model.lm_head, MonarchLinear)
    inputs = model_inputs("decoder")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, original(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_dense_round_trip_densifies_the_head_exactly(llama, tmp_path):
    folder, _ = llama
    converted = transformers.AutoModelForCausalLM.from_pretrained(folder / "monarch").eval()
    assert main(["dense", str(folder / "monarch"), str(tmp_path / "dense")]) == 0
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["model_type"] == "llama" and "monarch_head_layers" not in config
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert type(dense).__name__ == "LlamaForCausalLM" and type(dense.lm_head) is torch.nn.Linear
    assert torch.equal(dense.lm_head.weight, converted.lm_head.dense_weight())
    inputs = model_inputs("decoder")
    with torch.no_grad():
        torch.testing.assert_close(dense(**inputs).logits, converted(**inputs).logits, rtol=1e-5, atol=1e-6)


def test_the_head_loads_as_remote_code_without_m2_hf(llama, tmp_path):
    folder, _ = llama
    inputs = model_inputs("decoder")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "monarch").eval()
    with torch.no_grad():
        torch.save({"inputs": inputs, "logits": model(**inputs).logits}, tmp_path / "expected.pt")
    run_without_m2_hf(
        f"""
        import torch, transformers
        data = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained({str(folder / "monarch")!r},
                                                                  trust_remote_code=True).eval()
        assert type(model.lm_head).__name__ == "MonarchLinear" or "Monarch" in type(model.lm_head).__name__
        with torch.no_grad():
            torch.testing.assert_close(model(**data["inputs"]).logits, data["logits"])
        """,
        tmp_path,
    )


def test_the_calibrated_method_fits_the_head_on_its_inputs(llama, tmp_path):
    folder, _ = llama
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(12)) + "\n")
    settings = MonarchSettings(targets=["lm_head"], nblocks={"*": 2}, method="calibrated", calibration_file=text)
    report = convert_to_monarch(folder / "source", tmp_path / "calibrated", settings, progress=False)
    (layer,) = report["layers"]
    closed = convert_to_monarch(folder / "source", tmp_path / "closed", MonarchSettings(
        targets=["lm_head"], nblocks={"*": 2}), progress=False)["layers"][0]
    assert layer["name"] == "lm_head" and layer["relative_error"] != closed["relative_error"]
    totals = report["totals"]  # the head's FLOPs are counted: converting it alone lowers them
    assert totals["linear_flops_per_token_after"] < totals["linear_flops_per_token_before"]
    calibrated = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "calibrated").eval()
    projected = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "closed").eval()
    assert not torch.equal(calibrated.lm_head.blkdiag1, projected.lm_head.blkdiag1)


def test_a_classifier_head_converts_and_round_trips(tmp_path):
    source = tmp_path / "source"
    original = save_source(source, "RobertaConfig", "RobertaForSequenceClassification", vocab_size=96, hidden_size=32,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=64, pad_token_id=1, num_labels=3)
    assert main(["monarch", str(source), str(tmp_path / "monarch"), "--targets", r"classifier\.dense",
                 "--nblocks", "1"]) == 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "monarch").eval()
    assert model.config.monarch_head_layers == {"classifier.dense": 1} and model.config.monarch_layers == {}
    assert isinstance(model.classifier.dense, MonarchLinear)
    inputs = model_inputs("encoder")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, original(**inputs).logits, rtol=1e-4, atol=1e-5)


def test_a_tied_head_and_a_budget_over_heads_are_refused(tmp_path, capsys):
    source = tmp_path / "gpt2"
    save_source(source, "GPT2Config", "GPT2LMHeadModel", vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                n_positions=64)  # tie_word_embeddings=True
    assert main(["monarch", str(source), str(tmp_path / "tied"), "--targets", "lm_head"]) != 0
    error = capsys.readouterr().err
    assert "lm_head shares its weight with transformer.wte.weight" in error and "tie_word_embeddings=True" in error
    assert not (tmp_path / "tied").exists()
    assert main(["monarch", str(source), str(tmp_path / "none"), "--targets", "lm_hed"]) != 0
    assert "outside the base model: lm_head" in capsys.readouterr().err
    untied = tmp_path / "llama"
    save_source(untied, "LlamaConfig", "LlamaForCausalLM", **_DECODER, tie_word_embeddings=False)
    assert main(["monarch", str(untied), str(tmp_path / "budget"), "--targets", "all", "lm_head",
                 "--budget", "0.5"]) != 0
    assert "--budget plans the base model's layers; the targets also name lm_head" in capsys.readouterr().err


def test_dry_run_and_inspect_list_the_head_layers(llama, tmp_path, capsys):
    folder, _ = llama
    capsys.readouterr()
    assert main(["monarch", str(folder / "source"), str(tmp_path / "out"), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["head_layers"] == ["lm_head"]
    assert "head layers      lm_head (outside the base model" in captured.err
    assert main(["inspect", str(folder / "source")]) == 0
    assert "head layers      lm_head (outside the base model" in capsys.readouterr().out
