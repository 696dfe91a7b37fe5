"""`--refine-steps`: after the layer-by-layer projection, the structured layers learn together to reproduce the
original model's hidden states on the calibration text.

Both projections fit each layer on its own: the closed form to its weight, the calibrated method to its outputs given
its inputs. Neither sees what an error does downstream (through attention, the nonlinearities, the layer norms), nor
that a later layer could absorb part of an earlier one's error. Refinement trains the structured layers' parameters
(and nothing else: every other weight stays the original's) with Adam, for a given number of steps over the
calibration batches, to minimise the squared error of the base model's hidden states relative to the original's,
averaged over the outputs of every layer, at the real tokens.

The original's hidden states are computed once, before projection, and kept for the whole refinement: in float32,
at the real tokens only, without the embeddings (which no conversion changes): 1000 snippets of about 20 words are
26,904 tokens, x 6 layer outputs x 384 features x 4 bytes = 248 MB for all-MiniLM-L6-v2 (about 1 GB for BERT-base).
The model trains in float32 (and each tensor returns to its dtype afterwards), in eval mode, so that dropout does not
make the targets noisy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from m2_hf import structured_layers

from .checkpoints import ConversionError

REFINE_LEARNING_RATE = 3e-4
REFINE_SEED = 0


@dataclass
class TeacherStates:
    """The original model's layer outputs per calibration batch, at its real tokens: ``states[b][l]`` is
    ``(real_tokens, hidden)`` for the output of layer ``l`` in batch ``b`` (the embeddings are left out)."""

    states: list[list[torch.Tensor]]


def _hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The outputs of every layer of the base model (an encoder-decoder's encoder, then its decoder; the embeddings
    left out) at the real tokens of ``batch``."""
    outputs = model.base_model(**batch, output_hidden_states=True)
    if getattr(outputs, "decoder_hidden_states", None) is not None:
        stacks = [outputs.encoder_hidden_states, outputs.decoder_hidden_states]
    else:
        stacks = [getattr(outputs, "hidden_states", None)]
    if any(states is None for states in stacks):
        raise ConversionError(f"{type(model.base_model).__name__} returns no hidden_states, which --refine-steps "
                              "matches: leave out --refine-steps for this architecture.")
    real = batch["attention_mask"].bool()
    return [state[real].float() for states in stacks for state in states[1:]]


@torch.no_grad()
def teacher_states(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> TeacherStates:
    """The hidden states that refinement pulls the converted model towards (call before converting)."""
    return TeacherStates([_hidden_states(model, batch) for batch in batches])


def structured_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every Monarch and block-diagonal layer: what refinement trains."""
    return [p for layer in structured_layers(model).values() for p in layer.parameters(recurse=False)]


def _hidden_state_error(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the layer outputs of ``‖s − t‖² / ‖t‖²``, summed over the batch's real tokens: ``student`` and
    ``teacher`` are layer outputs of `_hidden_states`."""
    errors = [(s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12) for s, t in zip(student, teacher, strict=True)]
    return torch.stack(errors).mean()


def refine(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], teacher: TeacherStates, steps: int,
    learning_rate: float = REFINE_LEARNING_RATE, seed: int = REFINE_SEED,
) -> dict:
    """Train the structured layers of ``model`` (in place) for ``steps`` Adam steps, one calibration batch per step
    (the batches in a seeded random order, every batch once per pass). Returns the mean hidden-state error over the
    batches before and after, and the seconds taken.

    Refinement never leaves the model worse on the calibration text than the projection: if the error after the
    steps is not lower (too few steps for Adam's first, large moves to pay off, or too high a learning rate), the
    projected weights are restored and ``kept_projection`` is true."""
    if steps < 1:
        raise ConversionError(f"Refinement takes at least one step, got {steps}.")
    parameters = structured_parameters(model)
    if not parameters:
        raise ConversionError("The model has no Monarch or block-diagonal layers to refine (a --budget can keep every "
                              "layer dense): leave out --refine-steps.")
    dtypes, was_training = _floating_dtypes(model), model.training
    trainable = {p: p.requires_grad for p in model.parameters()}
    start = time.perf_counter()
    model.float().eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in parameters:
            p.requires_grad_(True)
        error_before = _mean_error(model, batches, teacher)
        projected = [p.detach().clone() for p in parameters]
        optimizer = torch.optim.Adam(parameters, lr=learning_rate)
        generator = torch.Generator().manual_seed(seed)
        order: list[int] = []
        for _ in range(steps):
            if not order:
                order = torch.randperm(len(batches), generator=generator).tolist()
            index = order.pop()
            loss = _hidden_state_error(_hidden_states(model, batches[index]), teacher.states[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        error_after = _mean_error(model, batches, teacher)
        kept_projection = not error_after < error_before
        if kept_projection:
            with torch.no_grad():
                for p, value in zip(parameters, projected):
                    p.copy_(value)
    finally:
        for p, requires_grad in trainable.items():
            p.requires_grad_(requires_grad)
        _restore_dtypes(model, dtypes)
        model.train(was_training)
    return {"steps": steps, "learning_rate": learning_rate, "hidden_state_error_before": error_before,
            "hidden_state_error_after": error_after, "kept_projection": kept_projection,
            "seconds": time.perf_counter() - start}


def _floating_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """The dtype of each floating-point parameter and buffer, by name: a model may keep some modules in float32 while
    the rest is in half precision (Transformers' `_keep_in_fp32_modules`)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: tensor.dtype for name, tensor in named if tensor.is_floating_point()}


def _restore_dtypes(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Give every tensor named in ``dtypes`` its dtype back (the same Parameter objects, new data)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in dtypes or tensor.dtype == dtypes[name]:
            continue
        if isinstance(tensor, nn.Parameter):
            tensor.data = tensor.data.to(dtypes[name])
        else:
            module_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(module_name), attribute, tensor.to(dtypes[name]))


@torch.no_grad()
def _mean_error(model: nn.Module, batches: list[dict[str, torch.Tensor]], teacher: TeacherStates) -> float:
    errors = [_hidden_state_error(_hidden_states(model, batch), states)
              for batch, states in zip(batches, teacher.states)]
    return float(torch.stack(errors).mean())
