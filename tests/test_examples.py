"""The examples run end to end (tiny settings) and write Hub-ready folders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                            env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.parametrize("corpus", ["files", "offline-default"])
def test_pretrain_m2_gpt_trains_both_models_and_writes_loadable_folders(corpus, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import m2_hf  # noqa: F401  (registers m2_gpt)

    args = ["--output_dir", str(tmp_path / "run"), "--hidden_size", "32", "--num_hidden_layers", "1",
            "--intermediate_size", "64", "--block_size", "32", "--max_steps", "3", "--per_device_train_batch_size",
            "4", "--max_eval_samples", "8", "--trained_vocab_size", "300", "--logging_steps", "1"]
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
    assert all(r["validation_perplexity"] > 1 and r["train_tokens"] == 3 * 4 * 32 for r in results)
    folder = tmp_path / "run" / "m2-gpt"
    card = (folder / "README.md").read_text()
    assert "model-index" in card and "perplexity" in card and "trust_remote_code=True" in card
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "m2_gpt" and model.config.vocab_size == len(tokenizer)
    generated = model.generate(**tokenizer("Monarch", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert generated.shape[-1] == len(tokenizer("Monarch").input_ids) + 3
    assert torch.isfinite(model(generated).logits).all()
