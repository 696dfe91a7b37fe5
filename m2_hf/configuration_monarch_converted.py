"""Configurations of Transformers models whose linear layers were replaced by Monarch or block-diagonal layers (what
`m2-convert monarch` writes).

Each extends the original architecture's config with two fields, so that a converted folder records exactly which
layers are structured; everything else reads as the original config.
"""

from __future__ import annotations

from transformers import BertConfig, DistilBertConfig, GPT2Config, PreTrainedConfig, RobertaConfig

STRUCTURES = ("monarch", "blockdiag")

_FIELDS_DOC = r"""
    Args:
        monarch_layers (`dict[str, int]`, *optional*):
            The structured linear layers: module names relative to the base model (for example
            `"encoder.layer.0.intermediate.dense"`), each with its number of blocks. Unlisted layers stay dense.
        monarch_structure (`str`, *optional*, defaults to `"monarch"`):
            `"monarch"` for [`MonarchLinear`] (two block-diagonal factors) or `"blockdiag"` for [`BlockdiagLinear`].
        kwargs:
            The arguments of the original architecture's config.
"""


class MonarchFieldsMixin(PreTrainedConfig):
    """The two fields that every converted config adds to its original config (listed first in the bases)."""

    monarch_layers: dict | None = None
    monarch_structure: str = "monarch"

    def __post_init__(self, **kwargs):
        layers = self.monarch_layers
        if layers is None:
            self.monarch_layers = {}
        elif not isinstance(layers, dict) or not all(
            isinstance(name, str) and isinstance(nblocks, int) and not isinstance(nblocks, bool) and nblocks >= 1
            for name, nblocks in layers.items()
        ):
            raise ValueError(
                "`monarch_layers` maps module names (relative to the base model) to a number of blocks >= 1, for "
                f"example {{'encoder.layer.0.intermediate.dense': 4}}; got {layers!r}."
            )
        if self.monarch_structure not in STRUCTURES:
            raise ValueError(f"`monarch_structure` must be one of {STRUCTURES}, got {self.monarch_structure!r}.")
        super().__post_init__(**kwargs)


class MonarchBertConfig(MonarchFieldsMixin, BertConfig):
    __doc__ = "[`BertConfig`] with Monarch-structured linear layers." + _FIELDS_DOC
    model_type = "monarch_bert"


class MonarchRobertaConfig(MonarchFieldsMixin, RobertaConfig):
    __doc__ = "[`RobertaConfig`] with Monarch-structured linear layers." + _FIELDS_DOC
    model_type = "monarch_roberta"


class MonarchDistilBertConfig(MonarchFieldsMixin, DistilBertConfig):
    __doc__ = "[`DistilBertConfig`] with Monarch-structured linear layers." + _FIELDS_DOC
    model_type = "monarch_distilbert"


class MonarchGPT2Config(MonarchFieldsMixin, GPT2Config):
    __doc__ = "[`GPT2Config`] with Monarch-structured linear layers." + _FIELDS_DOC
    model_type = "monarch_gpt2"


# The original model type of each converted one: the table that `m2-convert` and the model classes read.
SOURCE_MODEL_TYPES = {
    config_class.model_type: config_class.__mro__[2].model_type
    for config_class in (MonarchBertConfig, MonarchRobertaConfig, MonarchDistilBertConfig, MonarchGPT2Config)
}
