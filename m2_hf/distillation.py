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
  layer it replaces, on the task's own inputs.

Token-level outputs (``[batch, length, classes]``, as in masked or causal language models and token classification)
are distilled at the positions the attention mask keeps.

Usage with `Trainer` (the teacher is typically the dense model fine-tuned on the task)::

    from m2_hf.distillation import DistillationTrainer

    trainer = DistillationTrainer(model=student, teacher_model=teacher, alpha=0.5, temperature=2.0,
                                  args=training_args, train_dataset=train, data_collator=collator)
    trainer.train()
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from .monarch import BlockdiagLinear, MonarchLinear


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


def structured_layer_names(model: nn.Module) -> list[str]:
    """Names of the Monarch and block-diagonal layers of ``model``: the layers a conversion replaced."""
    return [name for name, module in model.named_modules() if isinstance(module, (MonarchLinear, BlockdiagLinear))]


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
            self.outputs[name] = output

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.outputs.clear()


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


class DistillationTrainer(Trainer):
    """A `Trainer` whose model (the student) also learns from a frozen ``teacher_model``.

    Args:
        teacher_model: the dense model to learn from, with the student's head and labels; kept frozen, in eval mode,
            on the student's device.
        alpha: weight of the logit distillation loss; the task loss gets ``1 - alpha``.
        temperature: softening of both output distributions.
        hidden_weight: weight of the structured layers' output error relative to the teacher's same-named layers
            (0 turns it off).
        All other arguments are `Trainer`'s.
    """

    def __init__(
        self,
        *args,
        teacher_model: nn.Module,
        alpha: float = 0.5,
        temperature: float = 2.0,
        hidden_weight: float = 0.0,
        **kwargs,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha weighs the distillation loss against the task loss: use 0 <= alpha <= 1, got {alpha}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {hidden_weight}.")
        super().__init__(*args, **kwargs)
        # The mixed loss is a mean over the batch: Trainer must divide it for gradient accumulation itself.
        self.model_accepts_loss_kwargs = False
        self.teacher = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        self._matched_layers = structured_layer_names(self.model) if hidden_weight > 0 else []
        if hidden_weight > 0 and not self._matched_layers:
            raise ValueError("hidden_weight > 0 matches the student's Monarch/block-diagonal layers, and it has none.")

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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._recording(model) as (student_layers, teacher_layers):
            outputs = model(**inputs)
            if outputs.loss is None:
                raise ValueError("The student computed no task loss: pass `labels` in the training inputs.")
            teacher_inputs = {key: value for key, value in inputs.items() if key != "labels"}
            with torch.no_grad():
                teacher_outputs = self.teacher(**teacher_inputs)
            mask = inputs.get("attention_mask")
            distillation = logit_distillation_loss(outputs.logits, teacher_outputs.logits, self.temperature, mask)
            loss = (1 - self.alpha) * outputs.loss + self.alpha * distillation
            if student_layers is not None:
                layer_error = relative_layer_error(student_layers.outputs, teacher_layers.outputs, mask)
                loss = loss + self.hidden_weight * layer_error
        return (loss, outputs) if return_outputs else loss
