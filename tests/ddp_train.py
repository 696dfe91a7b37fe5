"""Trains a tiny M2 model with `Trainer` for a few full-dataset steps; run alone or under `torchrun`.

Used by `test_distributed.py`: one process with the whole batch and two data-parallel processes (gloo) with half of
it each must end with the same weights. Each rank writes which samples it saw to `OUT/rank<R>.json`.
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments, set_seed

from m2_hf import M2BertConfig, M2BertForSequenceClassification, M2GPTConfig, M2GPTForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from example_utils import end_distributed_run  # noqa: E402  (the examples' clean torchrun exit)

SAMPLES, LENGTH, VOCAB = 16, 24, 97


def build(kind: str):
    """Without dropout: its random masks would differ between one and two processes."""
    set_seed(0)
    if kind == "m2-gpt":
        return M2GPTForCausalLM(M2GPTConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=LENGTH,
            hyena_filter_order=16, bos_token_id=0, eos_token_id=0,
        ))
    return M2BertForSequenceClassification(M2BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=LENGTH,
        hyena_filter_order=16, num_labels=3, hidden_dropout_prob=0.0, hyena_filter_dropout=0.0,
    ))


def dataset(kind: str) -> Dataset:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (SAMPLES, LENGTH), generator=generator)
    if kind == "m2-gpt":
        labels = ids.clone()
        labels[::3, : LENGTH // 2] = -100  # uneven target counts across samples (and ranks)
    else:
        labels = ids[:, 0] % 3
    return Dataset.from_dict({"index": list(range(SAMPLES)), "input_ids": ids.tolist(), "labels": labels.tolist()})


def main(kind: str, out: str, per_device_batch: int) -> None:
    rank = int(os.environ.get("RANK", "0"))
    seen = []

    def collate(features):
        seen.extend(f["index"] for f in features)
        return {"input_ids": torch.tensor([f["input_ids"] for f in features]),
                "labels": torch.tensor([f["labels"] for f in features])}

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device_batch, max_steps=4, learning_rate=3e-3,
        lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", remove_unused_columns=False, ddp_find_unused_parameters=False, seed=0,
        dataloader_drop_last=True,
    )
    trainer = Trainer(model=build(kind), args=args, train_dataset=dataset(kind), data_collator=collate)
    trainer.train()
    trainer.save_model(out)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump({"world_size": args.world_size, "parallel_mode": str(args.parallel_mode), "seen": seen}, handle)
    end_distributed_run()

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
