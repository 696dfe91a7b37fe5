"""Knowledge distillation for dense-to-sparse fine-tuning: a converted (Monarch / block-diagonal) student learns from
its dense original as teacher while it fine-tunes.

The student's loss is a mix of three terms:

- the task loss the model computes itself (``outputs.loss``), weighted ``1 - alpha``;
- the logit distillation loss, weighted ``alpha``: the Kullback-Leibler divergence between the teacher's and the
  student's output distributions at a temperature ``T``, scaled by ``T**2`` so that its gradients keep their size
  when ``T`` changes (Hinton et al., 2015); for a regression head (one output) the mean squared difference of the
  outputs instead;
- optionally, ``hidden_weight`` times the mean over the student's structured layers of their output error relative
  to the same-named layer of the teacher (``|s - t|^2 / |t|^2``): each Monarch layer is pulled towards the dense
  layer it replaces, on the task's own inputs. ``hidden_layers`` (regular expressions of module names) matches other
  modules' outputs instead, for example every transformer block's (``bert\\.encoder\\.layer\\.\\d+``), so that the
  student's hidden states follow the teacher's whatever the converted layers do on their own.
- optionally, ``feature_weight`` times the relative error (``|s - t|^2 / |t|^2``) of the features the head
  classifies (the input of the module ``feature_module``, by default ``classifier``: BERT's pooled output): a
  binary classifier's two logits say little about what the teacher computed, its hundreds of features more.

Token-level outputs (``[batch, length, classes]``, as in masked or causal language models and token classification)
are distilled at the positions the attention mask keeps.

Usage with `Trainer` (the teacher is typically the dense model fine-tuned on the task)::

    from m2_hf.distillation import DistillationTrainer

    trainer = DistillationTrainer(model=student, teacher_model=teacher, alpha=0.5, temperature=2.0,
                                  cache_teacher_logits=True, args=training_args, train_dataset=train,
                                  data_collator=collator)
    trainer.train()

The frozen teacher gives every example the same logits in every epoch, so with ``cache_teacher_logits=True`` they
are computed once, before training, into a ``teacher_logits`` column of the training set: the student's steps then
cost what they cost without distillation (the teacher's live forward would add about a third of a dense training
step to each of them). The one pass over the training set is timed in ``trainer.teacher_logits_seconds``. The
teacher's head features (``feature_weight``) are cached with them, as a ``teacher_features`` column.
"""

from __future__ import annotations

from contextlib import contextmanager
import re
import time
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer

from .monarch import structured_layers


def logit_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The distillation loss of ``student_logits`` towards ``teacher_logits`` (same shape, classes last).

    Args:
        temperature: softens both distributions; the loss is scaled by ``temperature**2``.
        mask: ``[batch, length]`` positions to distil when the logits are per token (1 = keep).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"The student's logits {tuple(student_logits.shape)} and the teacher's {tuple(teacher_logits.shape)} "
            "differ: distil a student into a teacher with the same head and labels."
        )
    classes = student_logits.shape[-1]
    student = student_logits.float().reshape(-1, classes)
    teacher = teacher_logits.float().reshape(-1, classes)
    if mask is not None and student_logits.dim() == 3 and mask.shape == student_logits.shape[:2]:
        kept = mask.reshape(-1).bool()
        student, teacher = student[kept], teacher[kept]
    if classes == 1:  # a regression head: match the outputs
        return F.mse_loss(student, teacher)
    return F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * temperature**2


TEACHER_LOGITS = "teacher_logits"
TEACHER_FEATURES = "teacher_features"


def without_labels(inputs: dict) -> dict:
    """The model inputs of a batch or example, without its labels (the teacher predicts, it is not scored)."""
    return {key: value for key, value in inputs.items() if key not in ("labels", "label", "label_ids")}


class LayerOutputRecorder:
    """Keeps the latest output of named submodules (forward hooks), for matching one model's layers to another's."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise ValueError(
                f"The teacher has no layer named {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: "
                "hidden-state matching needs a teacher of the student's original architecture (the dense model it "
                "was converted from), or hidden_weight=0."
            )
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._recorder(name)) for name in names]

    def _recorder(self, name: str):
        def record(module, inputs, output):
            # A transformer block may return (hidden_states, ...): its hidden states are what is matched.
            self.outputs[name] = output[0] if isinstance(output, (tuple, list)) else output

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.outputs.clear()


class ModuleInputRecorder:
    """Keeps the latest (first) input of one named submodule (a forward pre-hook): the features a head classifies."""

    def __init__(self, model: nn.Module, name: str, role: str) -> None:
        modules = dict(model.named_modules())
        if name not in modules:
            heads = [n for n, m in model.named_children() if any(isinstance(c, nn.Linear) for c in m.modules())]
            raise ValueError(
                f"The {role} has no module named {name!r}, whose input feature matching distils. Name the head that "
                f"classifies the features with feature_module (top-level modules with linear layers: "
                f"{', '.join(heads) or 'none'})."
            )
        self.input: Optional[torch.Tensor] = None
        self._handle = modules[name].register_forward_pre_hook(self._record)

    def _record(self, module, inputs) -> None:
        self.input = inputs[0]

    def remove(self) -> None:
        self._handle.remove()
        self.input = None


def relative_layer_error(
    student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean over the layers of ``|s - t|^2 / |t|^2``, at the positions ``mask`` keeps (``[batch, length]``)."""
    errors = []
    for name, target in teacher.items():
        output, target = student[name].float(), target.float()
        if mask is not None and output.dim() == 3 and mask.shape == output.shape[:2]:
            kept = mask.bool()
            output, target = output[kept], target[kept]
        errors.append((output - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12))
    return torch.stack(errors).mean()


def train_only_structured_layers(model: nn.Module, also: Sequence[str] = ()) -> int:
    """Freeze every parameter of ``model`` except those of its Monarch / block-diagonal layers and of the modules whose
    names fully match one of the regular expressions ``also`` (for example ``"classifier"``); returns the number of
    parameters left trainable.

    For a student converted from the fine-tuned dense model, whose other weights are already the teacher's solution.
    `Trainer` gives its optimizer the trainable parameters only, so the frozen ones cost no gradients and no optimizer
    state. (On all-MiniLM-L6-v2 / Rotten Tomatoes it scored below training every weight: see benchmarks/RESULTS.md.)
    """
    layers = structured_layers(model)
    if not layers:
        raise ValueError("The model has no Monarch or block-diagonal layers to train: convert it first "
                         "(`m2-convert monarch`), or train all of its parameters.")
    named = modules_named_like(model, also, "to keep trainable")
    model.requires_grad_(False)
    for name, module in dict(model.named_modules()).items():
        if name in layers or name in named:
            module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def modules_named_like(model: nn.Module, patterns: Sequence[str], purpose: str) -> list[str]:
    """Names of the modules of ``model`` that fully match one of the regular expressions ``patterns``, in
    ``named_modules`` order; a pattern that matches no module is an error (``purpose`` says what they were for)."""
    compiled = [re.compile(pattern) for pattern in patterns]
    names = [name for name, _ in model.named_modules() if name]
    for pattern in compiled:
        if not any(pattern.fullmatch(name) for name in names):
            top_level = ", ".join(name for name, _ in model.named_children())
            raise ValueError(f"No module of the model is named like {pattern.pattern!r}: name modules {purpose} as "
                             f"in `model.named_modules()` (top level: {top_level}).")
    return [name for name in names if any(pattern.fullmatch(name) for pattern in compiled)]


class DistillationTrainer(Trainer):
    """A `Trainer` whose model (the student) also learns from a frozen ``teacher_model``.

    Args:
        teacher_model: the dense model to learn from, with the student's head and labels; kept frozen, in eval mode,
            on the student's device.
        alpha: weight of the logit distillation loss; the task loss gets ``1 - alpha``.
        temperature: softening of both output distributions.
        hidden_weight: weight of the structured layers' output error relative to the teacher's same-named layers
            (0 turns it off).
        hidden_layers: regular expressions (full match) naming the modules whose outputs ``hidden_weight`` matches
            instead of the structured layers, for example ``["bert\\.encoder\\.layer\\.\\d+"]`` for every block
            of a BERT; a module returning a tuple has its first element matched.
        feature_weight: weight of the error of the student's head features (the input of ``feature_module``)
            relative to the teacher's (0 turns it off). One feature vector per example (sequence classification).
        feature_module: the module whose input is matched, named as in the student and the teacher.
        cache_teacher_logits: compute the teacher's logits for the whole training set (a `datasets.Dataset`) once,
            before training, instead of running the teacher at every step. For one prediction per example
            (sequence classification or regression); with ``hidden_weight > 0`` the teacher still runs at every step
            for its layer outputs. With ``feature_weight > 0`` the teacher's features are cached with the logits.
        All other arguments are `Trainer`'s.

    Evaluation and prediction score the student alone: ``eval_loss`` is its task loss, comparable with the dense
    model's, and the teacher does not run (it would double the cost of every evaluation step).
    """

    def __init__(
        self,
        *args,
        teacher_model: nn.Module,
        alpha: float = 0.5,
        temperature: float = 2.0,
        hidden_weight: float = 0.0,
        hidden_layers: Optional[Sequence[str]] = None,
        feature_weight: float = 0.0,
        feature_module: str = "classifier",
        cache_teacher_logits: bool = False,
        **kwargs,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha weighs the distillation loss against the task loss: use 0 <= alpha <= 1, got {alpha}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        for name, weight in (("hidden_weight", hidden_weight), ("feature_weight", feature_weight)):
            if weight < 0:
                raise ValueError(f"{name} must be >= 0, got {weight}.")
        super().__init__(*args, **kwargs)
        # The mixed loss is a mean over the batch: Trainer must divide it for gradient accumulation itself.
        self.model_accepts_loss_kwargs = False
        self.teacher = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        self.feature_weight, self.feature_module = feature_weight, feature_module
        self._matched_layers = self._layers_to_match(hidden_layers) if hidden_weight > 0 else []
        self._student_features = self._teacher_features = None
        if feature_weight > 0:
            self._student_features = ModuleInputRecorder(self.accelerator.unwrap_model(self.model), feature_module,
                                                         "student")
            self._teacher_features = ModuleInputRecorder(self.teacher, feature_module, "teacher")
        self._scoring_student_alone = False  # set while evaluation or prediction scores the student
        self.teacher_logits_seconds = 0.0
        if cache_teacher_logits:
            start = time.perf_counter()
            self.train_dataset = self._with_teacher_logits(self.train_dataset)
            self.teacher_logits_seconds = time.perf_counter() - start

    def _layers_to_match(self, hidden_layers: Optional[Sequence[str]]) -> list[str]:
        student = self.accelerator.unwrap_model(self.model)
        if hidden_layers is not None:
            return modules_named_like(student, hidden_layers, "whose outputs hidden_weight matches")
        layers = list(structured_layers(student))
        if not layers:
            raise ValueError("hidden_weight > 0 matches the student's Monarch/block-diagonal layers, and it has none: "
                             "convert it first, or name the modules to match with hidden_layers.")
        return layers

    def _with_teacher_logits(self, dataset):
        """``dataset`` with a ``teacher_logits`` column: the teacher's prediction for each example, in order."""
        if not hasattr(dataset, "add_column"):
            raise ValueError(
                "cache_teacher_logits=True stores the teacher's logits as a column of the training set: pass a "
                f"`datasets.Dataset` as train_dataset (got {type(dataset).__name__}), or cache_teacher_logits=False."
            )
        if TEACHER_LOGITS in dataset.column_names:
            raise ValueError(f"The training set already has a '{TEACHER_LOGITS}' column; remove it or pass "
                             "cache_teacher_logits=False to use it as it is.")
        features = self._remove_unused_columns(dataset, description="training")
        collate = self.data_collator
        loader = DataLoader(features, batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                            collate_fn=lambda rows: collate([without_labels(row) for row in rows]))
        logits, features = [], []
        with torch.inference_mode():
            for batch in loader:
                batch_logits = self.teacher(**self._prepare_inputs(batch)).logits
                if batch_logits.dim() != 2:
                    raise ValueError(
                        f"cache_teacher_logits=True keeps one prediction per example, and the teacher predicts per "
                        f"token (logits {tuple(batch_logits.shape)}): use cache_teacher_logits=False for token-level "
                        "heads, whose cached logits would not fit in memory."
                    )
                logits.extend(batch_logits.float().cpu().tolist())
                if self._teacher_features is not None:
                    features.extend(self._checked_features(self._teacher_features.input).float().cpu().tolist())
        dataset = dataset.add_column(TEACHER_LOGITS, logits)
        return dataset.add_column(TEACHER_FEATURES, features) if features else dataset

    def _checked_features(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2:
            raise ValueError(
                f"feature_weight > 0 matches one feature vector per example, and the input of "
                f"{self.feature_module!r} has shape {tuple(features.shape)}: name a module that takes pooled features "
                "(batch, features) with feature_module, or feature_weight=0."
            )
        return features

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in (TEACHER_LOGITS, TEACHER_FEATURES):  # Trainer would drop them: the model doesn't take them
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    @contextmanager
    def _recording(self, model: nn.Module) -> Iterator[tuple[Optional[LayerOutputRecorder], ...]]:
        if not self._matched_layers:
            yield None, None
            return
        student = LayerOutputRecorder(self.accelerator.unwrap_model(model), self._matched_layers)
        teacher = LayerOutputRecorder(self.teacher, self._matched_layers)
        try:
            yield student, teacher
        finally:
            student.remove()
            teacher.remove()

    def prediction_step(self, *args, **kwargs):
        self._scoring_student_alone = True
        try:
            return super().prediction_step(*args, **kwargs)
        finally:
            self._scoring_student_alone = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cached_logits = inputs.pop(TEACHER_LOGITS, None)
        teacher_features = inputs.pop(TEACHER_FEATURES, None)
        if self._scoring_student_alone:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self._recording(model) as (student_layers, teacher_layers):
            outputs = model(**inputs)
            if outputs.loss is None:
                raise ValueError("The student computed no task loss: pass `labels` in the training inputs.")
            teacher_logits = cached_logits
            if teacher_logits is None or student_layers is not None:  # layer matching needs the teacher's forward
                with torch.no_grad():
                    live_logits = self.teacher(**without_labels(inputs)).logits
                if teacher_logits is None:
                    teacher_logits = live_logits
                if teacher_features is None and self._teacher_features is not None:
                    teacher_features = self._checked_features(self._teacher_features.input)
            mask = inputs.get("attention_mask")
            distillation = logit_distillation_loss(outputs.logits, teacher_logits, self.temperature, mask)
            loss = (1 - self.alpha) * outputs.loss + self.alpha * distillation
            if student_layers is not None:
                layer_error = relative_layer_error(student_layers.outputs, teacher_layers.outputs, mask)
                loss = loss + self.hidden_weight * layer_error
            if self._student_features is not None:
                student_features = {self.feature_module: self._checked_features(self._student_features.input)}
                feature_error = relative_layer_error(student_features, {self.feature_module: teacher_features})
                loss = loss + self.feature_weight * feature_error
        return (loss, outputs) if return_outputs else loss
