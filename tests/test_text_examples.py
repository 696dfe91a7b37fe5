"""The text-classification examples: `finetune_text_classification.py` for dense, Monarch-converted and M2-BERT
classifiers, `dense_to_sparse.py` end to end, their offline data and metrics, and publishing without a network."""

import csv
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from remote_code import run_without_m2_hf
from test_conversion_monarch import write_source, write_tokenizer
from test_examples import ROOT, model_index, run_example
from test_m2_bert import tiny_config

import m2_hf
from conversion.monarch import MonarchSettings, convert_to_monarch

sys.path.insert(0, str(ROOT / "examples"))
import example_utils  # noqa: E402

POSITIVE = ["a joyful, moving film", "great acting and a clever script", "wonderful and warm", "a delight"]
NEGATIVE = ["a dull, tedious mess", "bad acting and a lazy script", "boring and cold", "a waste of time"]


def write_reviews(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = [(f"{rng.choice(POSITIVE if label else NEGATIVE)} number {i}", label)
            for i, label in enumerate(rng.choice((0, 1)) for _ in range(count))]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    return path


def review_files(tmp_path: Path) -> list[str]:
    train = write_reviews(tmp_path / "train.csv", 48, seed=0)
    dev = write_reviews(tmp_path / "dev.csv", 24, seed=1)
    return ["--train_file", str(train), "--validation_file", str(dev)]


def write_checkpoint(kind: str, tmp_path: Path) -> Path:
    """A tiny dense BERT, its Monarch conversion, or a tiny M2-BERT, each with the BERT tokenizer."""
    dense, _ = write_source(tmp_path, "bert", "BertModel", name="dense-bert")
    if kind == "dense":
        return dense
    if kind == "monarch":
        folder = tmp_path / "monarch-bert"
        convert_to_monarch(dense, folder, MonarchSettings(targets=["all"]), progress=False)
        return folder
    folder = tmp_path / "m2-bert"
    torch.manual_seed(0)
    # Mean pooling (as the official GLUE configs from qnli on): at the initialisation the implicit filters are tiny
    # (N(0, 0.02) weights), so the CLS position sees little of the other tokens and an untrained M2-BERT pooled at CLS
    # does not learn in a few dozen steps; pretrained ones do not have that problem.
    m2_hf.M2BertModel(tiny_config(pool_all=True)).save_pretrained(folder)
    write_tokenizer("bert", folder)
    return folder


TINY_TRAINING = ["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16", "--learning_rate",
                 "1e-3", "--logging_steps", "1", "--num_train_epochs", "1"]
# Enough to learn the reviews (whose words give the label away): 30 steps without the default's 10 warmup steps.
LEARNING = [*TINY_TRAINING, "--learning_rate", "1e-2", "--num_train_epochs", "10", "--warmup_steps", "0"]


def majority_rate(csv_file: Path) -> float:
    with csv_file.open(encoding="utf-8") as handle:
        labels = [row["label"] for row in csv.DictReader(handle)]
    return max(labels.count(label) for label in set(labels)) / len(labels)


def assert_learnt(accuracy: float, dev_csv: Path) -> None:
    """Clearly better than always predicting the validation set's majority class (0.58 here)."""
    assert accuracy >= majority_rate(dev_csv) + 0.2, (accuracy, majority_rate(dev_csv))


def accuracy_of_saved_model(folder: Path, dev_csv: Path) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with dev_csv.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    batch = tokenizer([r["sentence"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    labels = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    return (predicted == labels).float().mean().item()


@pytest.mark.parametrize("kind", ["dense", "monarch", "m2-bert"])
def test_finetune_text_classification_writes_a_hub_ready_folder_that_scores_as_reported(kind, tmp_path):
    checkpoint = write_checkpoint(kind, tmp_path)
    output = tmp_path / "run"
    run_example("finetune_text_classification.py", "--model_name_or_path", str(checkpoint), "--output_dir",
                str(output), *review_files(tmp_path), *LEARNING, cwd=tmp_path)
    result = json.loads((output / "results.json").read_text())
    assert result["metrics"] == ["accuracy", "f1"] and result["train_examples"] == 48
    assert_learnt(result["accuracy"], tmp_path / "dev.csv")
    # The folder holds the evaluated model: its predictions give the reported accuracy.
    assert accuracy_of_saved_model(output, tmp_path / "dev.csv") == pytest.approx(result["accuracy"], abs=1e-6)
    assert model_index(output) == {"accuracy": round(result["accuracy"], 4), "f1": round(result["f1"], 4)}
    card = ModelCard.load(output / "README.md")
    assert card.data.pipeline_tag == "text-classification"
    config = json.loads((output / "config.json").read_text())
    assert (output / "model.safetensors").is_file() and (output / "tokenizer.json").is_file()
    if kind == "dense":
        assert "auto_map" not in config and "custom_code" not in card.data.tags
        return
    assert "AutoModelForSequenceClassification" in config["auto_map"] and "trust_remote_code=True" in card.text
    run_without_m2_hf(f"""
        from transformers import pipeline
        classify = pipeline("text-classification", model={str(output)!r}, trust_remote_code=True)
        assert classify("a joyful, moving film")[0]["label"] in ("0", "1"), classify("a joyful, moving film")
    """, tmp_path)


def test_regression_labels_give_pearson_and_spearman(tmp_path):
    checkpoint = write_checkpoint("dense", tmp_path)
    for name, count in (("train", 32), ("dev", 16)):
        rows = [{"sentence1": f"score {i}", "sentence2": f"pair {i % 5}", "label": float(i % 5)} for i in range(count)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "run"
    run_example("finetune_text_classification.py", "--model_name_or_path", str(checkpoint), "--output_dir",
                str(output), "--train_file", str(tmp_path / "train.jsonl"), "--validation_file",
                str(tmp_path / "dev.jsonl"), *LEARNING, cwd=tmp_path)
    result = json.loads((output / "results.json").read_text())
    assert result["metrics"] == ["pearson", "spearmanr"]
    assert all(0.5 < result[m] <= 1 for m in result["metrics"]), result  # learnt: the second text gives the score
    config = json.loads((output / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1


def test_default_data_is_the_offline_rotten_tomatoes_corpus(tmp_path):
    splits = example_utils.rotten_tomatoes_offline()
    sizes = {name: len(split) for name, split in splits.items()}
    assert sum(sizes.values()) == 12808  # the fresh and rotten snippets of the corpus, plot summaries left out
    assert 0.75 < sizes["train"] / 12808 < 0.85 and min(sizes["validation"], sizes["test"]) > 800
    assert splits["train"].features["label"].names == ["neg", "pos"]
    positive = np.mean(splits["train"]["label"])
    assert 0.5 < positive < 0.65  # 7403 fresh of 12808
    checkpoint = write_checkpoint("dense", tmp_path)
    output = tmp_path / "run"
    run_example("finetune_text_classification.py", "--model_name_or_path", str(checkpoint), "--output_dir",
                str(output), "--max_train_samples", "32", "--max_eval_samples", "32", *TINY_TRAINING, cwd=tmp_path)
    assert "Rotten Tomatoes" in ModelCard.load(output / "README.md").text
    assert json.loads((output / "results.json").read_text())["validation_examples"] == 32


def test_offline_test_folds_rotate_the_film_buckets(tmp_path):
    default = example_utils.rotten_tomatoes_offline()
    folds = [example_utils.rotten_tomatoes_offline(fold) for fold in range(example_utils.OFFLINE_FOLDS)]
    assert all(folds[0][name]["text"] == default[name]["text"] for name in default)  # fold 0: the recorded splits
    assert sum(len(fold["test"]) for fold in folds) == 12808  # every snippet is in exactly one fold's test split
    assert folds[1]["test"]["text"] == folds[0]["validation"]["text"]  # the next bucket is validation
    assert folds[3]["test"]["text"] != folds[0]["test"]["text"]
    assert all(sum(len(split) for split in fold.values()) == 12808 for fold in folds)
    for bad in (-1, 10, 1.0, True):
        with pytest.raises(ValueError, match="test fold must be an integer from 0 to 9"):
            example_utils.rotten_tomatoes_offline(bad)
    checkpoint = write_checkpoint("dense", tmp_path)
    output = tmp_path / "run"
    run_example("finetune_text_classification.py", "--model_name_or_path", str(checkpoint), "--output_dir",
                str(output), "--offline_test_fold", "3", "--max_train_samples", "32", "--max_eval_samples", "32",
                "--do_predict", *TINY_TRAINING, cwd=tmp_path)
    assert "test fold 3" in ModelCard.load(output / "README.md").text


def test_offline_metrics_equal_scikit_learn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    binary_predictions, binary_references = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    values = example_utils.offline_metric_values(("accuracy", "f1", "matthews_correlation"), binary_predictions,
                                                 binary_references)
    assert values["accuracy"] == pytest.approx(accuracy_score(binary_references, binary_predictions))
    assert values["f1"] == pytest.approx(f1_score(binary_references, binary_predictions))
    assert values["matthews_correlation"] == pytest.approx(matthews_corrcoef(binary_references, binary_predictions))
    three_class = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert example_utils.offline_metric_values(("matthews_correlation",), *three_class)["matthews_correlation"] == \
        pytest.approx(matthews_corrcoef(three_class[1], three_class[0]))
    scores, targets = rng.normal(size=100).round(1), rng.integers(0, 5, 100).astype(float)  # ties in both
    values = example_utils.offline_metric_values(("pearson", "spearmanr"), scores, targets)
    assert values["pearson"] == pytest.approx(pearsonr(scores, targets)[0])
    assert values["spearmanr"] == pytest.approx(spearmanr(scores, targets)[0])


def test_glue_tasks_use_glue_metrics_and_unknown_tasks_are_refused():
    assert example_utils.metric_names("cola", False, 2) == ("matthews_correlation",)
    assert example_utils.metric_names("stsb", True, 1) == ("pearson", "spearmanr")
    assert example_utils.metric_names(None, False, 3) == ("accuracy",)
    with pytest.raises(ValueError, match="Unknown GLUE task 'sst'"):
        example_utils.metric_names("sst", False, 2)


def test_dense_to_sparse_compares_dense_monarch_and_densified_models(tmp_path):
    checkpoint = write_checkpoint("dense", tmp_path)
    output = tmp_path / "d2s"
    stdout = run_example("dense_to_sparse.py", "--model_name_or_path", str(checkpoint), "--output_dir", str(output),
                         "--targets", "all", *review_files(tmp_path), *LEARNING, cwd=tmp_path).stdout
    results = {r["model"]: r for r in json.loads((output / "results.json").read_text())}
    assert list(results) == ["dense", "monarch", "monarch-dense"] and "| monarch-dense |" in stdout
    assert results["monarch"]["conversion"]["layers"] == 12 and results["monarch"]["conversion"]["seconds"] > 0
    dense, monarch, densified = results["dense"], results["monarch"], results["monarch-dense"]
    assert monarch["structured_layers"] == 12 and dense["structured_layers"] == densified["structured_layers"] == 0
    assert monarch["non_embedding_parameters"] < dense["non_embedding_parameters"] == densified["non_embedding_parameters"]
    assert dense["train_examples"] == monarch["train_examples"] == 48  # the same budget
    # The dense baseline learns. The Monarch model (every linear layer converted) learns more slowly under the same
    # budget: its two small factors take smaller Adam steps in their product, and its densified copy (the same function)
    # learns like the dense model. Its learning is asserted in the fine-tuning test above, where it crosses the bar.
    assert_learnt(dense["accuracy"], tmp_path / "dev.csv")
    # Reverse sparsification is exact: the same predictions, hence the same scores.
    assert densified["accuracy"] == monarch["accuracy"] and densified["f1"] == monarch["f1"]
    assert densified["loss"] == pytest.approx(monarch["loss"], abs=1e-5)
    for name, result in results.items():
        assert model_index(output / name) == {"accuracy": round(result["accuracy"], 4), "f1": round(result["f1"], 4)}
    assert json.loads((output / "monarch-dense" / "config.json").read_text())["model_type"] == "bert"
    run_without_m2_hf(f"""
        from transformers import BertForSequenceClassification
        BertForSequenceClassification.from_pretrained({str(output / 'monarch-dense')!r})
    """, tmp_path)


def test_push_to_hub_offline_keeps_the_complete_folder_and_says_how_to_retry(tmp_path):
    checkpoint = write_checkpoint("dense", tmp_path)
    output = tmp_path / "run"
    error = run_example("finetune_text_classification.py", "--model_name_or_path", str(checkpoint), "--output_dir",
                        str(output), *review_files(tmp_path), *TINY_TRAINING, "--push_to_hub", "--hub_model_id",
                        "someone/tiny-classifier", cwd=tmp_path, succeed=False).stderr
    assert "is complete, but uploading it to someone/tiny-classifier failed" in error
    assert "`hf upload someone/tiny-classifier" in error
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert (output / name).is_file(), name


def test_bad_data_gets_an_error_that_names_the_fix(tmp_path):
    checkpoint = write_checkpoint("dense", tmp_path)
    for name in ("train", "dev"):
        (tmp_path / f"{name}.csv").write_text("text,sentiment\na joyful film,1\na dull mess,0\n")
    common = ["--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "run")]
    error = run_example("finetune_text_classification.py", *common, "--train_file", str(tmp_path / "train.csv"),
                        "--validation_file", str(tmp_path / "dev.csv"), cwd=tmp_path, succeed=False).stderr
    assert "No label column 'label'" in error and "--label_column_name" in error
    (tmp_path / "train.txt").write_text("a joyful film\n")
    error = run_example("finetune_text_classification.py", *common, "--train_file", str(tmp_path / "train.txt"),
                        "--validation_file", str(tmp_path / "dev.csv"), cwd=tmp_path, succeed=False).stderr
    assert "--train_file must be .csv, .json or .jsonl" in error
    error = run_example("finetune_text_classification.py", *common, *review_files(tmp_path), "--do_predict",
                        cwd=tmp_path, succeed=False).stderr
    assert "--do_predict needs a test split; the data has train, validation. Pass --test_file" in error
    (tmp_path / "test.csv").write_text("sentence,label\na joyful film,-1\n")  # GLUE's unlabelled test splits
    error = run_example("finetune_text_classification.py", *common, *review_files(tmp_path), "--do_predict",
                        "--test_file", str(tmp_path / "test.csv"), cwd=tmp_path, succeed=False).stderr
    assert "--do_predict needs test labels" in error
    assert not (tmp_path / "run").exists()
