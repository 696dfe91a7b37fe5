"""Configurations of Transformers models whose linear layers were replaced by Monarch or block-diagonal layers (what
`m2-convert monarch` writes).

Every original config class `XConfig` (model type `x`) has a converted counterpart `MonarchXConfig` (model type
`monarch_x`), made on first use: the original config's fields plus three that record exactly which layers are
structured. No architecture is listed here, so an architecture that Transformers adds tomorrow converts as well.
"""

from __future__ import annotations

import transformers
from transformers import PreTrainedConfig

STRUCTURES = ("monarch", "blockdiag")
CONVERTED_PREFIX = "Monarch"
CONVERTED_MODEL_TYPE_PREFIX = "monarch_"

_FIELDS_DOC = r"""
    Args:
        monarch_layers (`dict[str, int]`, *optional*):
            The structured linear layers: module names relative to the base model (for example
            `"encoder.layer.0.intermediate.dense"`), each with its number of blocks. Unlisted layers stay dense.
        monarch_head_layers (`dict[str, int]`, *optional*):
            Structured linear layers outside the base model, in a head (for example `"lm_head"` or
            `"classifier.dense"`): module names relative to the head model, each with its number of blocks. A head
            class without such a layer (the base model loaded alone, another head) leaves the name aside.
        monarch_structure (`str`, *optional*, defaults to `"monarch"`):
            `"monarch"` for [`MonarchLinear`] (two block-diagonal factors) or `"blockdiag"` for [`BlockdiagLinear`].
        kwargs:
            The arguments of the original architecture's config.
"""


class MonarchFieldsMixin(PreTrainedConfig):
    """The fields that every converted config adds to its original config (listed first in the bases)."""

    monarch_layers: dict | None = None
    monarch_head_layers: dict | None = None
    monarch_structure: str = "monarch"

    def __post_init__(self, **kwargs):
        examples = {"monarch_layers": ("the base model", "encoder.layer.0.intermediate.dense"),
                    "monarch_head_layers": ("the head model", "lm_head")}
        for field, (root, example) in examples.items():
            layers = getattr(self, field)
            if layers is None:
                setattr(self, field, {})
            elif not isinstance(layers, dict) or not all(
                isinstance(name, str) and isinstance(nblocks, int) and not isinstance(nblocks, bool) and nblocks >= 1
                for name, nblocks in layers.items()
            ):
                raise ValueError(
                    f"`{field}` maps module names (relative to {root}) to a number of blocks >= 1, for example "
                    f"{{{example!r}: 4}}; got {layers!r}."
                )
        if self.monarch_structure not in STRUCTURES:
            raise ValueError(f"`monarch_structure` must be one of {STRUCTURES}, got {self.monarch_structure!r}.")
        super().__post_init__(**kwargs)


_CONVERTED_CONFIGS: dict[type, type] = {}


def converted_config_class(original: type) -> type:
    """``Monarch<original>``: ``original`` (a Transformers config class) with the two fields, model type
    ``monarch_<original model type>``; one class per original, made on first use."""
    if original not in _CONVERTED_CONFIGS:
        if not (isinstance(original, type) and issubclass(original, PreTrainedConfig)) or not original.model_type:
            raise TypeError(f"{original!r} is not a Transformers config class with a model type.")
        if issubclass(original, MonarchFieldsMixin):
            raise TypeError(f"{original.__name__} is already a Monarch-converted config.")
        _CONVERTED_CONFIGS[original] = type(
            f"{CONVERTED_PREFIX}{original.__name__}",
            (MonarchFieldsMixin, original),
            {
                "__module__": __name__,
                "__doc__": f"[`{original.__name__}`] with Monarch-structured linear layers." + _FIELDS_DOC,
                "model_type": CONVERTED_MODEL_TYPE_PREFIX + original.model_type,
                "original_config_class": original,
            },
        )
    return _CONVERTED_CONFIGS[original]


def source_model_type(converted_model_type: str) -> str | None:
    """The original model type of a ``monarch_<type>`` model type, or None for any other."""
    if not isinstance(converted_model_type, str) or not converted_model_type.startswith(CONVERTED_MODEL_TYPE_PREFIX):
        return None
    return converted_model_type[len(CONVERTED_MODEL_TYPE_PREFIX):]


def original_transformers_class(converted_name: str, base: type) -> type | None:
    """The Transformers class (a subclass of ``base``) that ``Monarch<Name>`` converts, or None."""
    if not converted_name.startswith(CONVERTED_PREFIX):
        return None
    original = getattr(transformers, converted_name[len(CONVERTED_PREFIX):], None)
    return original if isinstance(original, type) and issubclass(original, base) else None


def __getattr__(name: str):
    # `MonarchLlamaConfig` and friends, which an `auto_map` names (also where this file runs as remote code).
    original = original_transformers_class(name, PreTrainedConfig)
    if original is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return converted_config_class(original)
