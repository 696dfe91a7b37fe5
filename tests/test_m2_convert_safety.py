"""`m2-convert` as a careless user meets it: every bad input ends in one line `m2-convert: error: ...` (exit 2), and no
file anywhere is changed, added or removed; dangerous destinations are refused before any work; what succeeds keeps
its meaning (no head dropped or invented, names instead of local paths) and cleans up after killed runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM, BertForMaskedLM

import conversion.monarch
from conversion.checkpoints import REPORT_FILE, OutputFolder
from conversion.cli import build_parser, main
from conversion.m2_bert import convert_m2_bert
from conversion.monarch import MonarchSettings, convert_to_monarch
from m2_hf import M2BertModel
from test_conversion_monarch import SENTENCES, write_source, write_tokenizer
from test_m2_bert import tiny_model, write_released_folder

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Library:
    """Checkpoints built once; each case copies what it needs into its own sandbox."""

    bert: Path  # a dense BertModel with tokenizer files
    released: Path  # a released-layout M2-BERT (masked LM)
    converted: Path  # `m2-convert monarch` output of `bert`
    converted_m2: Path  # `m2-convert m2-bert` output of `released`


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Library:
    root = tmp_path_factory.mktemp("library")
    bert, _ = write_source(root, "bert", "BertModel", name="bert")
    released = root / "released"
    write_released_folder(tiny_model(), released)
    convert_to_monarch(bert, root / "converted", progress=False)
    convert_m2_bert(released, root / "converted_m2")
    return Library(bert, released, root / "converted", root / "converted_m2")


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Every path below ``root`` with its content hash (files) and mode."""
    snapshot = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        snapshot[str(path.relative_to(root))] = (digest, mode)
    return snapshot


@dataclass
class Case:
    sandbox: Path
    library: Library
    monkeypatch: pytest.MonkeyPatch

    def copy(self, what: str, name: str = "src") -> Path:
        return Path(shutil.copytree(getattr(self.library, what), self.sandbox / name))

    def forbid_loading(self) -> None:
        """Fail loudly if the model is loaded: the problem must be found before any work."""

        def loaded(*args, **kwargs):
            raise AssertionError("the model was loaded before the problem was found")

        self.monkeypatch.setattr(conversion.monarch, "load_source", loaded)


def _rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class _RunsCode:
    """A pickle that runs a shell command when unpickled; the converter must refuse it without running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --------------------------------------------------------------------------------------------------------------------
# The cases: each returns the arguments and a fragment the error line must contain.
# --------------------------------------------------------------------------------------------------------------------


def overwrite_destination_containing_source(case):
    case.sandbox.joinpath("proj").mkdir()
    source = shutil.copytree(case.library.bert, case.sandbox / "proj" / "src")
    (case.sandbox / "proj" / "notes.txt").write_text("important")
    return ["monarch", str(source), str(case.sandbox / "proj"), "--overwrite"], "contains the source"


def overwrite_current_folder(case):
    case.copy("released")
    (case.sandbox / "work").mkdir()
    (case.sandbox / "work" / "notes.txt").write_text("important")
    case.monkeypatch.chdir(case.sandbox / "work")
    return ["m2-bert", "../src", ".", "--overwrite"], "is (or contains) the current folder"


def overwrite_parent_of_current_folder(case):
    case.copy("bert")
    (case.sandbox / "work").mkdir()
    case.monkeypatch.chdir(case.sandbox / "work")
    return ["monarch", "../src", "..", "--overwrite"], "is (or contains) the current folder"


def overwrite_home_folder(case):
    source = case.copy("bert")
    home = case.sandbox / "home"
    home.mkdir()
    (home / "diary.txt").write_text("mine")
    case.monkeypatch.setenv("HOME", str(home))
    return ["monarch", str(source), str(home), "--overwrite"], "the home folder"


def overwrite_root_folder(case):
    return ["dense", str(case.copy("converted")), "/", "--overwrite"], "is a root folder"


def overwrite_a_folder_the_tool_did_not_write(case):
    destination = case.sandbox / "out"
    destination.mkdir()
    (destination / "notes.txt").write_text("mine")
    return ["monarch", str(case.copy("bert")), str(destination), "--overwrite"], "was not written by m2-convert"


def overwrite_an_output_with_a_user_file_added(case):
    output = case.copy("converted", "out")
    (output / "notes.txt").write_text("mine")
    return ["monarch", str(case.copy("bert")), str(output), "--overwrite"], "did not write: notes.txt"


def existing_output_without_overwrite(case):
    output = case.copy("converted", "out")
    return ["dense", str(case.copy("converted")), str(output)], "pass --overwrite"


def destination_inside_source(case):
    source = case.copy("bert")
    return ["monarch", str(source), str(source / "monarch")], "lies inside the source"


def destination_is_source(case):
    source = case.copy("converted")
    return ["dense", str(source), str(source), "--overwrite"], "is the source folder"


def destination_is_a_file(case):
    (case.sandbox / "out").write_text("mine")
    return ["m2-bert", str(case.copy("released")), str(case.sandbox / "out")], "is a file"


def unwritable_destination(case):
    (case.sandbox / "notes.txt").write_text("mine")
    case.forbid_loading()
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "notes.txt" / "out")], "Cannot write the destination"


def m2_bert_with_nan_weights(case):
    source = case.copy("released")
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    state["bert.encoder.layer.0.mlp.wo.weight"][0, 0] = float("nan")
    torch.save(state, source / "pytorch_model.bin")
    return ["m2-bert", str(source), str(case.sandbox / "out")], "non-finite"


def m2_bert_encoder_without_pooler(case):
    model = tiny_model(M2BertModel)
    source = case.sandbox / "src"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(model.config.to_dict()))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")}
    torch.save(state, source / "pytorch_model.bin")
    return ["m2-bert", str(source), str(case.sandbox / "out")], "missing pooler.dense"


def m2_bert_config_that_does_not_fit(case):
    source = case.copy("released")
    _rewrite_json(source / "config.json", lambda config: config.update(intermediate_size=48))
    return ["m2-bert", str(source), str(case.sandbox / "out")], "tensors have other shapes"


def m2_bert_corrupt_pickle(case):
    source = case.copy("released")
    (source / "pytorch_model.bin").write_bytes(os.urandom(4096))
    return ["m2-bert", str(source), str(case.sandbox / "out")], "truncated or corrupt"


def monarch_missing_weight(case):
    source = case.copy("bert")
    weights = load_file(source / "model.safetensors")
    del weights["pooler.dense.weight"]
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    return ["monarch", str(source), str(case.sandbox / "out")], "missing pooler.dense.weight"


def monarch_ambiguous_head_without_architectures(case):
    torch.manual_seed(0)
    source = case.sandbox / "src"
    write_source(case.sandbox, "bert", "BertForSequenceClassification", name="src")
    _rewrite_json(source / "config.json", lambda config: config.pop("architectures"))
    return ["monarch", str(source), str(case.sandbox / "out")], "several heads fit"


def config_not_json(case):
    source = case.copy("bert")
    (source / "config.json").write_text("{not json")
    return ["monarch", str(source), str(case.sandbox / "out")], "config.json is not valid JSON"


def config_a_list(case):
    source = case.copy("released")
    (source / "config.json").write_text("[1, 2]")
    return ["m2-bert", str(source), str(case.sandbox / "out")], "holds a JSON list"


def config_a_string(case):
    source = case.copy("converted")
    (source / "config.json").write_text('"bert"')
    return ["dense", str(source), str(case.sandbox / "out")], "holds a JSON str"


def truncated_safetensors(case):
    source = case.copy("bert")
    _truncate(source / "model.safetensors")
    return ["monarch", str(source), str(case.sandbox / "out")], "model.safetensors is not a readable safetensors"


def truncated_safetensors_dense(case):
    source = case.copy("converted")
    _truncate(source / "model.safetensors")
    return ["dense", str(source), str(case.sandbox / "out")], "model.safetensors is not a readable safetensors"


def truncated_safetensors_inspect(case):
    source = case.copy("converted")
    _truncate(source / "model.safetensors")
    return ["inspect", str(source)], "model.safetensors is not a readable safetensors"


def code_running_pickle(case):
    source = case.copy("bert")
    state = load_file(source / "model.safetensors")
    (source / "model.safetensors").unlink()
    torch.save({**state, "payload": _RunsCode(case.sandbox / "pwned")}, source / "pytorch_model.bin")
    return ["monarch", str(source), str(case.sandbox / "out")], "pickled Python objects besides tensors"


def corrupt_pickle(case):
    source = case.copy("bert")
    (source / "model.safetensors").unlink()
    (source / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + os.urandom(2048))
    return ["monarch", str(source), str(case.sandbox / "out")], "pytorch_model.bin is not a readable PyTorch"


def binary_calibration_file(case):
    (case.sandbox / "text.txt").write_bytes(bytes(range(256)) * 8)
    case.forbid_loading()
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--method", "calibrated",
            "--calibration-file", str(case.sandbox / "text.txt")], "is not UTF-8 text"


def missing_calibration_file(case):
    case.forbid_loading()
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--calibration-file",
            str(case.sandbox / "text.txt")], "text.txt does not exist"


def negative_calibration_samples(case):
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--calibration-samples", "-1"], \
        "--calibration-samples: must be at least 1"


def zero_calibration_samples(case):
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--calibration-samples", "0"], \
        "--calibration-samples: must be at least 1"


def calibrated_without_tokenizer(case):
    source = case.copy("bert")
    for path in source.iterdir():
        if path.name.startswith(("tokenizer", "vocab", "special_tokens")):
            path.unlink()
    (case.sandbox / "text.txt").write_text("\n".join(SENTENCES))
    case.forbid_loading()
    return ["monarch", str(source), str(case.sandbox / "out"), "--method", "calibrated", "--calibration-file",
            str(case.sandbox / "text.txt")], "has no tokenizer files"


def dense_with_a_layer_removed_from_monarch_layers(case):
    source = case.copy("converted")
    _rewrite_json(source / "config.json", lambda config: config["monarch_layers"].pop(next(iter(config["monarch_layers"]))))
    return ["dense", str(source), str(case.sandbox / "out")], "Restore the config.json (monarch_layers)"


def dense_with_nblocks_edited(case):
    source = case.copy("converted")
    _rewrite_json(source / "config.json", lambda config: config["monarch_layers"].update(
        {name: 2 for name in config["monarch_layers"]}))
    return ["dense", str(source), str(case.sandbox / "out")], "restore the config.json (monarch_layers)"


def nblocks_before_positionals(case):
    return ["monarch", "--nblocks", "4", str(case.copy("bert")), str(case.sandbox / "out")], \
        "put them after SOURCE DESTINATION"


def targets_before_positionals(case):
    return ["monarch", "--targets", "mlp", str(case.copy("bert")), str(case.sandbox / "out")], \
        "put them after SOURCE DESTINATION"


def mistyped_local_path(case):
    case.copy("bert")
    case.monkeypatch.chdir(case.sandbox.parent)
    return ["monarch", f"{case.sandbox.name}/srcc", str(case.sandbox / "out")], \
        f"({case.sandbox.name} exists, but holds no srcc)"


def source_is_a_file(case):
    (case.sandbox / "model.safetensors").write_bytes(b"")
    return ["monarch", str(case.sandbox / "model.safetensors"), str(case.sandbox / "out")], "is a file, not a checkpoint"


def inspect_missing_folder(case):
    return ["inspect", str(case.sandbox / "nothing")], "nothing does not exist"


def zero_nblocks(case):
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--nblocks", "mlp=0"], \
        "--nblocks must be at least 1, got 'mlp=0'"


def malformed_push_repo_id(case):
    case.forbid_loading()
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--push-to-hub", "a/b/c"], \
        "--push-to-hub 'a/b/c' is not a Hub repo id"


def unknown_option(case):
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--blocks", "4"], \
        "unrecognized arguments: --blocks 4"


def onnx_missing_source(case):
    return ["onnx", str(case.sandbox / "nothing"), str(case.sandbox / "out")], "nothing does not exist"


def onnx_of_a_folder_that_is_not_m2(case):
    return ["onnx", str(case.copy("bert")), str(case.sandbox / "out")], "is not an M2 checkpoint folder"


def onnx_existing_destination_without_overwrite(case):
    source = case.copy("converted_m2")
    (case.sandbox / "out").mkdir()
    (case.sandbox / "out" / "mine.txt").write_text("keep me")
    return ["onnx", str(source), str(case.sandbox / "out")], "--overwrite"


def onnx_unknown_architecture(case):
    source = case.copy("converted_m2")
    _rewrite_json(source / "config.json", lambda config: config.update(architectures=["M2BertForPoetry"]))
    return ["onnx", str(source), str(case.sandbox / "out")], "names the architecture 'M2BertForPoetry'"


def budget_with_nblocks(case):
    case.forbid_loading()
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--budget", "0.5", "--nblocks", "4"], \
        "--budget chooses nblocks for every layer, so it cannot be combined with --nblocks"


def budget_zero(case):
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--budget", "0"], \
        "must be a fraction in (0, 1]"


def budget_above_one(case):
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--budget", "1.5"], \
        "must be a fraction in (0, 1]"


def budget_not_a_number(case):
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--budget", "half"], \
        "expected a fraction such as 0.4, got 'half'"


def budget_below_the_smallest_size(case):
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--budget", "0.01"], \
        "below the smallest reachable size"


def budget_keeping_every_layer_dense(case):
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--budget", "1"], \
        "keeps every targeted layer dense: nothing to convert"


def budget_of_without_budget(case):
    case.forbid_loading()
    return ["monarch", str(case.copy("bert")), str(case.sandbox / "out"), "--budget-of", "flops"], \
        "--budget-of says what --budget counts: pass --budget F too"


CASES = [
    onnx_missing_source, onnx_of_a_folder_that_is_not_m2, onnx_existing_destination_without_overwrite,
    onnx_unknown_architecture,
    overwrite_destination_containing_source, overwrite_current_folder, overwrite_parent_of_current_folder,
    overwrite_home_folder, overwrite_root_folder, overwrite_a_folder_the_tool_did_not_write,
    overwrite_an_output_with_a_user_file_added, existing_output_without_overwrite, destination_inside_source,
    destination_is_source, destination_is_a_file, unwritable_destination, m2_bert_with_nan_weights,
    m2_bert_encoder_without_pooler, m2_bert_config_that_does_not_fit, m2_bert_corrupt_pickle, monarch_missing_weight,
    monarch_ambiguous_head_without_architectures, config_not_json, config_a_list, config_a_string,
    truncated_safetensors, truncated_safetensors_dense, truncated_safetensors_inspect, code_running_pickle,
    corrupt_pickle, binary_calibration_file, missing_calibration_file, negative_calibration_samples,
    zero_calibration_samples, calibrated_without_tokenizer, dense_with_a_layer_removed_from_monarch_layers,
    dense_with_nblocks_edited, nblocks_before_positionals, targets_before_positionals, mistyped_local_path,
    source_is_a_file, inspect_missing_folder, zero_nblocks, malformed_push_repo_id, unknown_option,
    budget_with_nblocks, budget_zero, budget_above_one, budget_not_a_number, budget_below_the_smallest_size,
    budget_keeping_every_layer_dense, budget_of_without_budget,
]


@pytest.mark.parametrize("make_case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_gets_one_error_line_and_changes_nothing(make_case, library, tmp_path, monkeypatch, capsys):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    argv, fragment = make_case(Case(sandbox, library, monkeypatch))
    before = tree_snapshot(tmp_path)
    root_before = sorted(os.listdir("/"))
    capsys.readouterr()

    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("m2-convert: error: "), err
    assert [line for line in lines if line.startswith("m2-convert:")] == [lines[-1]]
    assert fragment in lines[-1], lines[-1]
    assert "Traceback" not in err
    assert tree_snapshot(tmp_path) == before  # the source, the destination and everything beside them
    assert sorted(os.listdir("/")) == root_before


# --------------------------------------------------------------------------------------------------------------------
# What succeeds: safe overwrites, leftovers of killed runs, dry runs, permissions
# --------------------------------------------------------------------------------------------------------------------


def test_overwrite_replaces_only_an_earlier_output_and_keeps_what_is_beside_it(library, tmp_path):
    source = shutil.copytree(library.bert, tmp_path / "src")
    (tmp_path / "notes.txt").write_text("important")
    destination = tmp_path / "out"
    assert main(["monarch", str(source), str(destination), "--nblocks", "2"]) == 0
    first = (destination / "model.safetensors").read_bytes()
    assert main(["monarch", str(source), str(destination), "--overwrite"]) == 0
    assert (destination / "model.safetensors").read_bytes() != first
    assert json.loads((destination / "config.json").read_text())["monarch_layers"]["encoder.layer.0.output.dense"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "out", "src"]
    assert (tmp_path / "notes.txt").read_text() == "important"
    report = json.loads((destination / REPORT_FILE).read_text())
    assert report["tool"] == "m2-convert" and set(report["files"]) == {
        p.name for p in destination.iterdir() if p.name != REPORT_FILE}


def test_an_empty_existing_folder_is_filled(library, tmp_path):
    (tmp_path / "out").mkdir()
    assert main(["dense", str(library.converted), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_outputs_get_the_permissions_of_save_pretrained(library, tmp_path):
    BertForMaskedLM.from_pretrained(library.bert).save_pretrained(tmp_path / "saved")
    assert main(["monarch", str(library.bert), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "saved").stat().st_mode


def _killed_run_leftover(destination: Path) -> None:
    """A conversion process killed with SIGKILL after it had started writing."""
    script = (
        "import os, signal, sys\n"
        "from conversion.checkpoints import OutputFolder\n"
        f"output = OutputFolder({str(destination)!r}, [])\n"
        "output.prepare()\n"
        "(output.staging / 'model.safetensors').write_bytes(b'half written')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT)
    assert result.returncode == -signal.SIGKILL


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run(library, tmp_path, capsys):
    destination = tmp_path / "out"
    _killed_run_leftover(destination)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.m2-convert-staging.")]
    assert len(leftovers) == 1
    _killed_run_leftover(tmp_path / "other")  # another destination's leftover is not this run's business
    assert main(["monarch", str(library.bert), str(destination)]) == 0
    assert json.loads(capsys.readouterr().out)["removed_leftovers"] == leftovers
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".other.")) == ["out"]
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".other.m2-convert-staging.")]) == 1


def test_a_running_conversions_staging_folder_is_left_alone(tmp_path):
    live = OutputFolder(tmp_path / "out", [])
    live.prepare()
    try:
        other = OutputFolder(tmp_path / "out", [])
        other.prepare()
        other.close()
        assert live.staging.is_dir() and not other.removed_leftovers
    finally:
        live.close()


def test_dry_run_reports_a_destination_problem_and_writes_nothing(library, tmp_path, capsys):
    output = shutil.copytree(library.converted, tmp_path / "out")
    before = tree_snapshot(tmp_path)
    assert main(["monarch", str(library.bert), str(output), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "pass --overwrite" in json.loads(captured.out)["destination_problem"]
    assert "m2-convert: warning: a real run would stop" in captured.err
    assert main(["monarch", str(library.bert), str(tmp_path / "new"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["destination_problem"] is None
    assert tree_snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------------
# No silent loss of meaning
# --------------------------------------------------------------------------------------------------------------------


def test_a_masked_lm_without_architectures_keeps_its_head(tmp_path):
    source, original = write_source(tmp_path, "bert", "BertForMaskedLM")
    _rewrite_json(source / "config.json", lambda config: config.pop("architectures"))
    report = convert_to_monarch(source, tmp_path / "out", MonarchSettings(nblocks={"*": 1}), progress=False)
    assert report["architecture"] == "BertForMaskedLM"
    converted = AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_classifier_without_architectures_gets_the_one_head_that_fits(tmp_path):
    source, _ = write_source(tmp_path, "gpt2", "GPT2ForSequenceClassification")
    _rewrite_json(source / "config.json", lambda config: config.pop("architectures"))
    report = convert_to_monarch(source, tmp_path / "out", progress=False)
    assert report["architecture"] == "GPT2ForSequenceClassification"


def test_a_hub_cache_snapshot_is_named_by_its_repo_id_and_no_local_path_is_written(library, tmp_path, capsys):
    snapshot = tmp_path / "hub" / "models--someone--tiny-bert" / "snapshots" / ("0123abcd" * 5)
    shutil.copytree(library.bert, snapshot)
    assert main(["monarch", str(snapshot), str(tmp_path / "out"), "--nblocks", "1"]) == 0
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["source"] == "someone/tiny-bert"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: someone/tiny-bert" in card and "0123abcd" not in card
    for path in (tmp_path / "out").iterdir():
        assert str(tmp_path) not in path.read_text(errors="ignore"), path.name
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("m2-convert: warning:")]
    assert len(warnings) == len(report["layers"]) == len(report["warnings"])
    assert "nblocks=1 does not shrink it" in warnings[0]


def test_a_hub_id_from_the_offline_cache_names_the_card_and_report(library, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    commit = "0123abcd" * 5
    shutil.copytree(library.bert, cache / "models--someone--tiny-bert" / "snapshots" / commit)
    (cache / "models--someone--tiny-bert" / "refs").mkdir()
    (cache / "models--someone--tiny-bert" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert main(["monarch", "someone/tiny-bert", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["source"] == "someone/tiny-bert"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: someone/tiny-bert" in card and commit not in card


def test_push_hint_names_the_installed_cli(library, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["monarch", str(library.bert), str(tmp_path / "out"), "--push-to-hub", "someone/monarch-test"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert "is complete" in error and f"`hf upload someone/monarch-test {tmp_path / 'out'}`" in error
    assert (tmp_path / "out" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------------------------
# Help and --debug
# --------------------------------------------------------------------------------------------------------------------


def test_every_argument_has_help_and_every_subcommand_an_example():
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert set(subcommands) == {"m2-bert", "monarch", "dense", "onnx", "inspect"}
    for name, subparser in subcommands.items():
        assert f"m2-convert {name} " in subparser.epilog
        for action in subparser._actions:
            assert action.help and len(action.help) > 10, (name, action.dest)


def test_help_and_debug_from_a_shell(library, tmp_path):
    command = [sys.executable, "-m", "conversion"]
    shown = subprocess.run([*command, "monarch", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert shown.returncode == 0 and "examples:" in shown.stdout and "--calibration-samples N" in shown.stdout
    failing = [*command, "monarch", str(tmp_path / "nothing"), str(tmp_path / "out")]
    quiet = subprocess.run(failing, capture_output=True, text=True, cwd=ROOT)
    assert quiet.returncode == 2 and quiet.stderr.strip().splitlines() == [
        f"m2-convert: error: The source folder {tmp_path / 'nothing'} does not exist ({tmp_path} exists, but holds no "
        "nothing); check the path."
    ]
    loud = subprocess.run([*failing, "--debug"], capture_output=True, text=True, cwd=ROOT)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "ConversionError" in loud.stderr
