"""The README's user's guide runs as written: its code blocks, in order, in one empty folder, offline."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from remote_code import run_without_m2_hf

ROOT = Path(__file__).resolve().parents[1]
GUIDE_HEADING = "## User's guide: four paths"


def guide_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(GUIDE_HEADING, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.DOTALL)


def run_block(language: str, code: str, folder: Path) -> str:
    # The commands a user types: this interpreter's `python` and the `m2-convert` installed beside it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-euo", "pipefail", "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder)
    assert result.returncode == 0, f"{language} block failed:\n{code}\n{result.stderr[-3000:]}"
    return result.stdout


def test_the_four_paths_run_as_written(tmp_path):
    blocks = guide_blocks()
    assert [language for language, _ in blocks] == ["python", "bash", "python", "python"]
    outputs = [run_block(language, code, tmp_path) for language, code in blocks]
    assert "torch.Size([1, 13, 128])" in outputs[0]
    assert "MonarchBertModel" in outputs[1] and outputs[1].count("monarch   nblocks=4") == 12  # inspect: 6 layers x 2
    assert "eval_loss" in outputs[2]
    folder = tmp_path / "minilm-monarch-reviews"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "monarch_bert" and "AutoModelForSequenceClassification" in config["auto_map"]
    for name in ("model.safetensors", "tokenizer.json", "modeling_monarch_converted.py", "README.md"):
        assert name in outputs[3], name
    run_without_m2_hf(f"""
        from huggingface_hub import ModelCard
        from transformers import pipeline
        card = ModelCard.load({str(folder / 'README.md')!r})
        assert card.data.eval_results[0].metric_type == "accuracy"
        classify = pipeline("text-classification", model={str(folder)!r}, trust_remote_code=True)
        assert classify("a joyful, moving film")[0]["label"] in ("LABEL_0", "LABEL_1")
    """, tmp_path)


def test_the_sentence_transformers_example_runs_as_written(tmp_path):
    from test_sentence_transformers import write_released_retrieval_folder

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Sentence embeddings and retrieval (sentence-transformers)", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]  # up to the next heading
    blocks = re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.DOTALL)
    assert [language for language, _ in blocks] == ["bash", "python"]
    write_released_retrieval_folder(tmp_path / "m2-bert-80M-2k-retrieval")  # a tiny model in the released layout
    outputs = [run_block(language, code, tmp_path) for language, code in blocks]
    assert '"architecture": "M2BertForTextEncoding"' in outputs[0]
    assert "What is a Monarch matrix? -> [(" in outputs[1] and "toy_cosine_ndcg@10" in outputs[1]


def test_the_export_example_runs_as_written(tmp_path):
    """The Export section, on the folder that the sentence-transformers section's conversion writes."""
    from test_sentence_transformers import write_released_retrieval_folder

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    retrieval = text.split("### Sentence embeddings and retrieval (sentence-transformers)", 1)[1]
    convert = re.findall(r"```bash\n(.*?)```", retrieval, flags=re.DOTALL)[0]
    assert "m2-convert m2-bert m2-bert-80M-2k-retrieval m2-bert-retrieval" in convert
    section = re.split(r"\n##+ ", text.split("### Export: ONNX, `torch.export`, `torch.compile`", 1)[1], maxsplit=1)[0]
    blocks = re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.DOTALL)
    assert [language for language, _ in blocks] == ["bash", "python"]
    write_released_retrieval_folder(tmp_path / "m2-bert-80M-2k-retrieval")
    run_block("bash", convert, tmp_path)
    outputs = [run_block(language, code, tmp_path) for language, code in blocks]
    assert '"architecture": "M2BertForTextEncoding"' in outputs[0] and '"onnxruntime_check"' in outputs[0]
    for line in ("onnxruntime: True", "torch.export: True", "torch.compile: True"):
        assert line in outputs[1], outputs[1]
