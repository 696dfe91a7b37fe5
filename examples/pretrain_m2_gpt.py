#!/usr/bin/env python
"""Causal-LM pretraining of M2-GPT with `Trainer`, compared with a GPT-2 of the same width, depth and token budget.

By default it needs nothing from the network and runs on a CPU in a few minutes: the text is the English prose of
Python's standard-library docstrings (training and validation from disjoint source files), written to local text
files and read with `datasets`' text loader; the tokenizer is GPT-2's when `--tokenizer_name` points at its files,
otherwise a byte-level BPE trained on the training text with `tokenizers`. Both models are trained by the same code
with the same settings, and the validation perplexities are printed side by side:

    python examples/pretrain_m2_gpt.py --output_dir runs/m2-gpt-tiny
    python examples/pretrain_m2_gpt.py --output_dir runs/m2 --train_file train.txt --validation_file val.txt \\
        --hidden_size 768 --num_hidden_layers 12 --block_size 1024 --max_steps 20000 --compare_with_gpt2 false
    python examples/pretrain_m2_gpt.py --output_dir runs/wiki --dataset_name wikitext \\
        --dataset_config_name wikitext-103-raw-v1 --tokenizer_name gpt2      # when the Hub is reachable

Every trained model is saved under `output_dir/<model>` with its tokenizer: a folder that `from_pretrained` loads
(with `trust_remote_code=True` where m2-hf is not installed), and `--push_to_hub` uploads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from datasets import load_dataset
from example_utils import (  # first: it makes the checkout importable
    TrainedModelCard,
    end_distributed_run,
    eval_results,
    parse_arguments,
    publish,
    train_and_evaluate,
    training_arguments_for,
)
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Tokenizer,
    Trainer,
    TrainingArguments,
    set_seed,
)

from m2_hf import M2GPTConfig, M2GPTForCausalLM


@dataclass
class ModelArguments:
    hidden_size: int = field(default=256, metadata={"help": "Width of both models."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Depth of both models."})
    intermediate_size: int = field(default=1024, metadata={"help": "M2-GPT MLP width (GPT-2 uses 4 x hidden)."})
    monarch_mlp_nblocks: int = field(default=4, metadata={"help": "Blocks of M2-GPT's Monarch MLP layers."})
    compare_with_gpt2: bool = field(default=True, metadata={"help": "Also train GPT2LMHeadModel of the same shape."})
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "A tokenizer folder or Hub id (GPT-2's); default: train a byte-level BPE."}
    )
    trained_vocab_size: int = field(default=8192, metadata={"help": "Vocabulary of the BPE trained when needed."})


@dataclass
class DataArguments:
    train_file: Optional[str] = field(default=None, metadata={"help": "Plain text, one document per line."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Plain text for validation perplexity."})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A Hub dataset (needs the network)."})
    dataset_config_name: Optional[str] = field(default=None)
    text_column: str = field(default="text")
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence (texts are concatenated)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Cap on training blocks."})
    max_eval_samples: Optional[int] = field(default=256, metadata={"help": "Cap on validation blocks."})


def default_training_arguments(output_dir: str = "runs/pretrain-m2-gpt") -> list[str]:
    """Settings of the default CPU run, overridable from the command line."""
    return ["--output_dir", output_dir, "--max_steps", "300", "--per_device_train_batch_size", "16",
            "--per_device_eval_batch_size", "16", "--learning_rate", "2e-3", "--warmup_steps", "30",
            "--lr_scheduler_type", "cosine", "--weight_decay", "0.01", "--logging_steps", "25",
            "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--seed", "0"]


def write_offline_corpus(folder: Path) -> tuple[str, str]:
    """Training and validation text from the standard library's docstrings (disjoint files), a paragraph per line."""
    from conversion.offline_text import stdlib_paragraphs

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for part, name in (("calibration", "train.txt"), ("evaluation", "validation.txt")):
        path = folder / name
        path.write_text("\n".join(stdlib_paragraphs(part)) + "\n", encoding="utf-8")
        files.append(str(path))
    return files[0], files[1]


def load_text(data_args: DataArguments, output_dir: Path):
    if data_args.dataset_name is not None:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    train_file, validation_file = data_args.train_file, data_args.validation_file
    if train_file is None:
        train_file, validation_file = write_offline_corpus(output_dir / "corpus")
    files = {"train": train_file}
    if validation_file is not None:
        files["validation"] = validation_file
    raw = load_dataset("text", data_files=files)
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=0.05, seed=0)
        raw = {"train": split["train"], "validation": split["test"]}
    return raw


def build_tokenizer(model_args: ModelArguments, texts, output_dir: Path):
    if model_args.tokenizer_name is not None:
        return AutoTokenizer.from_pretrained(model_args.tokenizer_name)
    from tokenizers import ByteLevelBPETokenizer

    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator(texts, vocab_size=model_args.trained_vocab_size, min_frequency=2,
                                special_tokens=["<|endoftext|>"])
    folder = output_dir / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]  # after the version header
    merges = [tuple(line.split()) for line in lines if line]
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def tokenized_blocks(raw, tokenizer, data_args: DataArguments):
    """Each split tokenized, an end-of-text token after every document, concatenated and cut into blocks."""
    block = data_args.block_size

    def tokenize(batch):
        return {"input_ids": [ids + [tokenizer.eos_token_id] for ids in tokenizer(batch[data_args.text_column]).input_ids]}

    def group(batch):
        joined = [token for ids in batch["input_ids"] for token in ids]
        usable = len(joined) // block * block
        return {"input_ids": [joined[i : i + block] for i in range(0, usable, block)]}

    splits = {}
    for name in ("train", "validation"):
        split = raw[name].map(tokenize, batched=True, remove_columns=raw[name].column_names)
        splits[name] = split.map(group, batched=True, batch_size=2000)
    if data_args.max_train_samples is not None:
        splits["train"] = splits["train"].select(range(min(data_args.max_train_samples, len(splits["train"]))))
    if data_args.max_eval_samples is not None:
        count = min(data_args.max_eval_samples, len(splits["validation"]))
        splits["validation"] = splits["validation"].select(range(count))
    return splits


def build_models(model_args: ModelArguments, tokenizer, block_size: int) -> dict:
    vocab = len(tokenizer)
    special = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    models = {
        "m2-gpt": lambda: M2GPTForCausalLM(M2GPTConfig(
            vocab_size=vocab, hidden_size=model_args.hidden_size, num_hidden_layers=model_args.num_hidden_layers,
            intermediate_size=model_args.intermediate_size, monarch_mlp_nblocks=model_args.monarch_mlp_nblocks,
            max_position_embeddings=block_size, **special,
        ))
    }
    if model_args.compare_with_gpt2:
        models["gpt2"] = lambda: GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab, n_embd=model_args.hidden_size, n_layer=model_args.num_hidden_layers,
            n_head=max(1, model_args.hidden_size // 64), n_positions=block_size, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **special,
        ))
    return models


def train_one(name: str, build, splits, tokenizer, training_args: TrainingArguments, data_description: str) -> dict:
    set_seed(training_args.seed)
    model = build()
    args = training_arguments_for(training_args, name)
    trainer = Trainer(
        model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["validation"],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
    )
    figures = train_and_evaluate(trainer)
    result = {
        "model": name,
        **figures,
        "validation_loss": figures["loss"],
        "validation_perplexity": math.exp(figures["loss"]),
        "train_tokens": trainer.state.global_step * args.train_batch_size * args.gradient_accumulation_steps
        * len(splits["train"][0]["input_ids"]) * max(1, args.world_size),
        "validation_blocks": len(splits["validation"]),
    }
    publish(trainer, training_args, lambda folder: write_model_card(folder, model, result, data_description))
    return result


def write_model_card(folder: Path, model, result: dict, data_description: str) -> None:
    """M2-GPT: the m2-gpt card template; the baseline: the generic card. Both with the validation perplexity as
    `model-index` metadata."""
    from huggingface_hub import ModelCardData

    from model_cards import render_model_card

    metrics = {"perplexity": result["validation_perplexity"]}
    training = (f"{data_description}: {result['train_tokens']:,} tokens in {result['train_seconds']:.0f} s")
    if not isinstance(model, M2GPTForCausalLM):
        TrainedModelCard(
            pipeline_tag="text-generation", description="The GPT-2 baseline of `examples/pretrain_m2_gpt.py`.",
            data_description=data_description,
            validation_description=f"{result['validation_blocks']} validation blocks of {data_description}",
            training_description=training, example_input=repr("The standard library"),
            auto_class="AutoModelForCausalLM",
        ).write(folder, model, metrics)
        return
    config = model.config
    card_data = ModelCardData(
        model_name=folder.name, library_name="transformers", pipeline_tag="text-generation",
        tags=["m2", "monarch", "custom_code"], eval_results=eval_results("text-generation", data_description, metrics),
    )
    mlp = f"{'GLU, ' if config.use_glu_mlp else ''}{config.monarch_mlp_type} with {config.monarch_mlp_nblocks} blocks"
    card = render_model_card(
        "m2-gpt", card_data, model_name=folder.name, repo_id=folder.name, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers, mlp_description=mlp, max_length=config.max_position_embeddings,
        num_parameters=f"{result['parameters'] / 1e6:.1f}M", vocab_size=config.vocab_size,
        training_description=f"Trained with `examples/pretrain_m2_gpt.py` on {training}.",
        measurements=(f"Validation loss {result['validation_loss']:.3f}, perplexity "
                      f"{result['validation_perplexity']:.2f} ({data_description})."),
    )
    card.save(folder / "README.md")


def main() -> None:
    model_args, data_args, training_args = parse_arguments(
        (ModelArguments, DataArguments, TrainingArguments), default_training_arguments, "runs/pretrain-m2-gpt"
    )
    torch.manual_seed(training_args.seed)
    output = Path(training_args.output_dir)
    with training_args.main_process_first(desc="corpus and tokenizer"):  # under torchrun, one rank writes them
        raw = load_text(data_args, output)
        tokenizer = build_tokenizer(model_args, raw["train"][data_args.text_column], output)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    splits = tokenized_blocks(raw, tokenizer, data_args)
    print(f"{len(splits['train'])} training and {len(splits['validation'])} validation blocks of "
          f"{data_args.block_size} tokens; vocabulary {len(tokenizer)}")
    data_description = data_args.dataset_name or (
        Path(data_args.train_file).name if data_args.train_file else "Python standard-library docstrings"
    )
    results = [train_one(name, build, splits, tokenizer, training_args, data_description)
               for name, build in build_models(model_args, tokenizer, data_args.block_size).items()]
    if training_args.process_index == 0:
        print(f"\n{'model':<8} {'parameters':>11} {'tokens':>9} {'train s':>8} {'val loss':>9} {'val ppl':>9}")
        for r in results:
            print(f"{r['model']:<8} {r['parameters']:>11,} {r['train_tokens']:>9,} {r['train_seconds']:>8.0f} "
                  f"{r['validation_loss']:>9.3f} {r['validation_perplexity']:>9.2f}")
        (output / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    end_distributed_run()


if __name__ == "__main__":
    main()
