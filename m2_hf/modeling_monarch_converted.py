"""Transformers models with Monarch or block-diagonal linear layers: what `m2-convert monarch` writes.

Each class is the original Transformers class (`BertForMaskedLM`, `GPT2LMHeadModel`, ...) with the linear layers that
its config's `monarch_layers` names replaced by `MonarchLinear` (or `BlockdiagLinear`); everything else, from the
forward pass to tying, generation and saving, is the original class's. Supporting another architecture takes a config
class (`configuration_monarch_converted.py`) and one entry in `_ORIGINAL_CLASSES` below.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    BertModel,
    DistilBertForMaskedLM,
    DistilBertForMultipleChoice,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertModel,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
    RobertaForCausalLM,
    RobertaForMaskedLM,
    RobertaForMultipleChoice,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
)

from .configuration_monarch_converted import (
    MonarchBertConfig,
    MonarchDistilBertConfig,
    MonarchGPT2Config,
    MonarchRobertaConfig,
)
from .model_utils import ShipsAllHeadsMixin, init_structured_layer
from .monarch import BlockdiagLinear, MonarchLinear, dense_weight_and_bias

STRUCTURED_CLASSES = {"monarch": MonarchLinear, "blockdiag": BlockdiagLinear}


def structure_linear_layers(root: nn.Module, layers: dict[str, int], structure: str) -> None:
    """Replace the named linear layers of ``root`` (``nn.Linear`` or GPT-2's ``Conv1D``) by freshly initialised
    structured layers of the same sizes, bias, device and dtype."""
    layer_class = STRUCTURED_CLASSES[structure]
    for name, nblocks in layers.items():
        try:
            weight, bias = dense_weight_and_bias(root.get_submodule(name))
        except (AttributeError, TypeError) as error:
            raise ValueError(
                f"`monarch_layers` names {name!r}, which is not a linear layer of {type(root).__name__}: {error}"
            ) from error
        out_features, in_features = weight.shape
        structured = layer_class(
            in_features, out_features, nblocks=nblocks, bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        root.set_submodule(name, structured)


class MonarchConvertedMixin(ShipsAllHeadsMixin):
    """Builds the original model, then structures the base model's layers named by ``config.monarch_layers``."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        structure_linear_layers(self.base_model, config.monarch_layers, config.monarch_structure)
        if self.base_model is not self:
            # Transformers initialises the weights that a checkpoint lacks with each sub-model's own `_init_weights`:
            # as the original class, a head's base model would leave its structured layers as uninitialised memory.
            self.base_model.__class__ = CONVERTED_CLASSES[type(self.base_model).__name__]
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if init_structured_layer(module):
            return
        try:
            super()._init_weights(module)
        except AttributeError:
            # Some original inits reach into a child layer's `.weight` (GPT-2's scaled init of `c_proj`); a
            # structured child has factors instead and is initialised on its own visit.
            if not any(isinstance(child, tuple(STRUCTURED_CLASSES.values())) for child in module.children()):
                raise


# Original classes per converted config; each gets a `Monarch<Original>` counterpart in this module. Every class listed
# must be one that an Auto class maps the original model type to (the package registers each under that Auto class).
_ORIGINAL_CLASSES = {
    MonarchBertConfig: (
        BertModel, BertForPreTraining, BertLMHeadModel, BertForMaskedLM, BertForNextSentencePrediction,
        BertForSequenceClassification, BertForMultipleChoice, BertForTokenClassification, BertForQuestionAnswering,
    ),
    MonarchRobertaConfig: (
        RobertaModel, RobertaForCausalLM, RobertaForMaskedLM, RobertaForSequenceClassification,
        RobertaForMultipleChoice, RobertaForTokenClassification, RobertaForQuestionAnswering,
    ),
    MonarchDistilBertConfig: (
        DistilBertModel, DistilBertForMaskedLM, DistilBertForSequenceClassification, DistilBertForMultipleChoice,
        DistilBertForTokenClassification, DistilBertForQuestionAnswering,
    ),
    MonarchGPT2Config: (
        GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification, GPT2ForTokenClassification, GPT2ForQuestionAnswering,
    ),
}


# Trainer leaves the division by the gradient-accumulation steps to the loss of any forward that takes `**kwargs`,
# expecting it to divide by `num_items_in_batch`. Of the original classes only these causal LMs' losses do; the others
# (plain mean cross-entropy and friends) would report and train on a loss `gradient_accumulation_steps` times too large.
_LOSSES_DIVIDED_BY_NUM_ITEMS = (BertLMHeadModel, RobertaForCausalLM, GPT2LMHeadModel)


def _converted_class(original: type, config_class: type) -> type:
    return type(
        f"Monarch{original.__name__}",
        (MonarchConvertedMixin, original),
        {
            "__module__": __name__,
            "__doc__": f"[`{original.__name__}`] with the linear layers named by `config.monarch_layers` structured.",
            "config_class": config_class,
            "original_class": original,
            "accepts_loss_kwargs": original in _LOSSES_DIVIDED_BY_NUM_ITEMS,
        },
    )


CONVERTED_CLASSES: dict[str, type] = {}
for _config_class, _originals in _ORIGINAL_CLASSES.items():
    for _original in _originals:
        CONVERTED_CLASSES[_original.__name__] = globals()[f"Monarch{_original.__name__}"] = _converted_class(
            _original, _config_class
        )

__all__ = ["CONVERTED_CLASSES", "MonarchConvertedMixin", "structure_linear_layers", *(
    f"Monarch{name}" for name in CONVERTED_CLASSES
)]
