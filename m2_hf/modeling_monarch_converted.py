"""Transformers models with Monarch or block-diagonal linear layers: what `m2-convert monarch` writes.

Every Transformers model class `X` has a converted counterpart `MonarchX`, made on first use: the original class with
the linear layers that its config's `monarch_layers` names replaced by `MonarchLinear` (or `BlockdiagLinear`);
everything else, from the forward pass to tying, generation with the model's own cache and saving, is the original
class's. A converted family (the config and every head that an Auto class maps the original model type to) is
registered with those Auto classes when it is made, and its folders name every head in their `auto_map`, so they load
through the Auto class of the original head, here and as remote code. No architecture is listed here.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

from .configuration_monarch_converted import (
    converted_config_class,
    original_transformers_class,
    source_model_type,
)
from .model_utils import ShipsAllHeadsMixin, init_structured_layer
from .monarch import BlockdiagLinear, MonarchLinear, dense_weight_and_bias

class ConvertedMonarchLinear(MonarchLinear):
    """The `MonarchLinear` of converted models. Transformers model code that reads a linear layer's `weight` for its
    dtype does so behind `isinstance(layer.weight, torch.Tensor)`, as layers may be quantized (T5's feed-forward); a
    Monarch layer has two factors instead, and says so by a `weight` of None."""

    weight = None

    def _get_name(self) -> str:
        return MonarchLinear.__name__  # printed as the layer it is


STRUCTURED_CLASSES = {"monarch": ConvertedMonarchLinear, "blockdiag": BlockdiagLinear}


def structure_linear_layers(root: nn.Module, layers: dict[str, int], structure: str) -> None:
    """Replace the named linear layers of ``root`` (``nn.Linear`` or GPT-2's ``Conv1D``) by freshly initialised
    structured layers of the same sizes, bias, device and dtype."""
    layer_class = STRUCTURED_CLASSES[structure]
    for name, nblocks in layers.items():
        try:
            weight, bias = dense_weight_and_bias(root.get_submodule(name))
        except (AttributeError, TypeError) as error:
            raise ValueError(
                f"The config's structured layers name {name!r}, which is not a linear layer of {type(root).__name__}: "
                f"{error}"
            ) from error
        out_features, in_features = weight.shape
        structured = layer_class(
            in_features, out_features, nblocks=nblocks, bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        root.set_submodule(name, structured)


def has_submodule(root: nn.Module, name: str) -> bool:
    """Whether ``root.get_submodule(name)`` finds a module."""
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


def _register_output_recording(model: PreTrainedModel) -> None:
    """Transformers records hidden states and attentions (`output_hidden_states`, `output_attentions`) by hooks that
    it finds in a registry keyed by the model's class, filled when the model is built: a model whose class changed
    afterwards would silently return None for them."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a Transformers that does not record outputs by hooks
        return
    _CAN_RECORD_REGISTRY[model] = model._can_record_outputs


class MonarchConvertedMixin(ShipsAllHeadsMixin):
    """Builds the original model, then structures the base model's layers named by ``config.monarch_layers`` and the
    head's named by ``config.monarch_head_layers`` (those this class has)."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        structure_linear_layers(self.base_model, config.monarch_layers, config.monarch_structure)
        if self.base_model is not self:
            head_layers = {name: nblocks for name, nblocks in config.monarch_head_layers.items()
                           if has_submodule(self, name)}
            structure_linear_layers(self, head_layers, config.monarch_structure)
        if self.base_model is not self:
            # Transformers initialises the weights that a checkpoint lacks with each sub-model's own `_init_weights`:
            # as the original class, a head's base model would leave its structured layers as uninitialised memory.
            self.base_model.__class__ = converted_class(type(self.base_model))
            _register_output_recording(self.base_model)
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


def auto_model_classes() -> list[type]:
    """Every `AutoModel*` class of the installed Transformers, so that a head added tomorrow is found too."""
    classes = (getattr(modeling_auto, name) for name in dir(modeling_auto) if name.startswith("AutoModel"))
    return [cls for cls in classes if isinstance(cls, type) and hasattr(cls, "_model_mapping")]


def original_heads(original_config_class: type) -> dict[str, type]:
    """``{Auto class name: original class}`` for every Auto class that maps ``original_config_class`` to a model of
    its own (an Auto class may map a config to another family's model, which then belongs to that family)."""
    heads = {}
    for auto_class in auto_model_classes():
        if original_config_class in auto_class._model_mapping:
            head = auto_class._model_mapping[original_config_class]
            head = head[0] if isinstance(head, (tuple, list)) else head
            if getattr(head, "config_class", None) is original_config_class:
                heads[auto_class.__name__] = head
    return heads


_CONVERTED_CLASSES: dict[type, type] = {}
_FAMILIES: dict[type, dict[str, type]] = {}


def _shipped_name(cls: type) -> str:
    return f"{cls.__module__.rpartition('.')[2]}.{cls.__name__}"


def _divides_loss_by_num_items(original: type) -> bool:
    """Whether ``original``'s loss divides by Trainer's `num_items_in_batch`: Trainer leaves the division by the
    gradient-accumulation steps to the loss of any forward that takes `**kwargs`, which only the losses computed with
    `self.loss_function` do; plain mean cross-entropies would train on a loss `gradient_accumulation_steps` times too
    large."""
    code = getattr(inspect.unwrap(original.forward), "__code__", None)
    return code is not None and "loss_function" in code.co_names


def _class_for(original: type) -> type:
    if original not in _CONVERTED_CLASSES:
        if not (isinstance(original, type) and issubclass(original, PreTrainedModel)) or original.config_class is None:
            raise TypeError(f"{original!r} is not a Transformers model class with a config class.")
        if issubclass(original, MonarchConvertedMixin):
            raise TypeError(f"{original.__name__} is already a Monarch-converted class.")
        attributes = {
            "__module__": __name__,
            "__doc__": f"[`{original.__name__}`] with the linear layers named by `config.monarch_layers` structured.",
            "config_class": converted_config_class(original.config_class),
            "original_class": original,
        }
        if not hasattr(original, "accepts_loss_kwargs"):
            attributes["accepts_loss_kwargs"] = _divides_loss_by_num_items(original)
        converted = type(f"Monarch{original.__name__}", (MonarchConvertedMixin, original), attributes)
        _share_checkpoint_conversions(original.__name__, converted.__name__)
        _CONVERTED_CLASSES[original] = converted
    return _CONVERTED_CLASSES[original]


def _share_checkpoint_conversions(original_name: str, converted_name: str) -> None:
    """Give a converted model type or class the tensor renamings that Transformers applies to the original one when it
    loads and saves checkpoints (the names of older checkpoints, kept on disk): Transformers skips them for classes
    outside its package unless they are registered, and a converted folder's tensors are named as the original's."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a Transformers without checkpoint renamings
        return
    mapping = get_checkpoint_conversion_mapping(original_name)
    if mapping is not None:
        register_checkpoint_conversion_mapping(converted_name, mapping, overwrite=True)


def _register_family(config_class: type, heads: dict[str, type]) -> None:
    """Register a converted family with the Auto classes (and its tokenizer), and mark each class for shipping."""
    _share_checkpoint_conversions(config_class.original_config_class.model_type, config_class.model_type)
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class()
    for auto_name, model_class in heads.items():
        getattr(modeling_auto, auto_name).register(config_class, model_class, exist_ok=True)
        if model_class._auto_class is None:
            model_class.register_for_auto_class(auto_name)
    tokenizer = TOKENIZER_MAPPING_NAMES.get(config_class.original_config_class.model_type)
    tokenizer = tokenizer if isinstance(tokenizer, str) else next((name for name in tokenizer or () if name), None)
    tokenizer_class = getattr(transformers, tokenizer, None) if tokenizer else None
    if tokenizer_class is not None:
        AutoTokenizer.register(config_class, fast_tokenizer_class=tokenizer_class, exist_ok=True)


def converted_family(original_config_class: type) -> dict[str, type]:
    """``{Auto class name: converted head}`` of an original config class; made and registered on first use. Every
    class of the family ships an `auto_map` that names all its heads."""
    config_class = converted_config_class(original_config_class)
    if config_class not in _FAMILIES:
        heads = {name: _class_for(head) for name, head in original_heads(original_config_class).items()}
        _FAMILIES[config_class] = heads
        auto_map = {"AutoConfig": _shipped_name(config_class)} | {
            name: _shipped_name(head) for name, head in heads.items()
        }
        for head in heads.values():
            head.shipped_auto_map = auto_map
        _register_family(config_class, heads)
    return _FAMILIES[config_class]


def converted_class(original: type) -> type:
    """``Monarch<original>`` for a Transformers model class; made on first use, one per original class."""
    converted = _class_for(original)
    heads = converted_family(original.config_class)
    if heads and not converted.shipped_auto_map:  # a head no Auto class maps to, as GPT-2's double heads
        converted.shipped_auto_map = next(iter(heads.values())).shipped_auto_map
    return converted


class _ConvertedClassesByName(dict):
    """``{original class name: converted class}``, filled on first access of each name."""

    def __missing__(self, name: str) -> type:
        original = getattr(transformers, name, None)
        if not (isinstance(original, type) and issubclass(original, PreTrainedModel)):
            raise KeyError(name)
        self[name] = converted_class(original)
        return self[name]


CONVERTED_CLASSES = _ConvertedClassesByName()


class _ModelTypesWithConverted(dict):
    """What `CONFIG_MAPPING` keeps of registered model types, completed on demand with ``monarch_<type>`` for every
    model type Transformers knows, so that `AutoConfig` (and then each Auto model class) finds a converted folder
    of any architecture without registering hundreds of families up front."""

    def __contains__(self, model_type) -> bool:
        return super().__contains__(model_type) or self._add_converted(model_type)

    def __missing__(self, model_type):
        if self._add_converted(model_type):
            return self[model_type]
        raise KeyError(model_type)

    def _add_converted(self, model_type) -> bool:
        source = source_model_type(model_type)
        if source is None or source not in CONFIG_MAPPING._mapping:
            return False
        converted_family(CONFIG_MAPPING[source])
        return super().__contains__(model_type)


def resolve_converted_model_types() -> None:
    """Let `AutoConfig` resolve every ``monarch_<type>`` model type (called by the package's ``__init__``)."""
    if not isinstance(CONFIG_MAPPING._extra_content, _ModelTypesWithConverted):
        CONFIG_MAPPING._extra_content = _ModelTypesWithConverted(CONFIG_MAPPING._extra_content)


def __getattr__(name: str):
    # `MonarchLlamaForCausalLM` and friends, which an `auto_map` names (also where this file runs as remote code).
    original = original_transformers_class(name, PreTrainedModel)
    if original is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return converted_class(original)


__all__ = ["CONVERTED_CLASSES", "MonarchConvertedMixin", "converted_class", "converted_family",
           "structure_linear_layers"]
