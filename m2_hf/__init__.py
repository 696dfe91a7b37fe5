"""m2-hf: Monarch matrices and the Monarch Mixer (M2) model family for Hugging Face Transformers.

Importing the package registers the M2 models with the Auto classes (and their code for `save_pretrained`, so saved
folders load with `trust_remote_code=True` where m2-hf is not installed).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertTokenizer,
)

from .configuration_m2_bert import M2BertConfig
from .modeling_m2_bert import (
    M2BertForMaskedLM,
    M2BertForQuestionAnswering,
    M2BertForSequenceClassification,
    M2BertForTextEncoding,
    M2BertForTokenClassification,
    M2BertModel,
    M2BertPreTrainedModel,
)
from .monarch import (
    BlockdiagLinear,
    MonarchLinear,
    blockdiag_factor_shape,
    blockdiag_multiply,
    monarch_factor_shapes,
    monarch_multiply,
    project_blockdiag,
    project_monarch,
    projection_error,
    set_monarch_backend,
)

__version__ = "0.1.0"


def _register(config_class, model_type: str, heads: dict, tokenizer_class=None) -> None:
    """Register a model family with the Auto classes, here and in the code that `save_pretrained` ships."""
    AutoConfig.register(model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class()
    for auto_class, model_class in heads.items():
        auto_class.register(config_class, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)
    if tokenizer_class is not None:
        AutoTokenizer.register(config_class, fast_tokenizer_class=tokenizer_class, exist_ok=True)


_register(
    M2BertConfig,
    "m2_bert",
    {
        AutoModel: M2BertModel,
        AutoModelForMaskedLM: M2BertForMaskedLM,
        AutoModelForSequenceClassification: M2BertForSequenceClassification,
        AutoModelForTokenClassification: M2BertForTokenClassification,
        AutoModelForQuestionAnswering: M2BertForQuestionAnswering,
    },
    tokenizer_class=BertTokenizer,
)
# The retrieval encoder ships under AutoModel in its own folders, as the released retrieval models do.
M2BertForTextEncoding.register_for_auto_class("AutoModel")

__all__ = [
    "BlockdiagLinear",
    "M2BertConfig",
    "M2BertForMaskedLM",
    "M2BertForQuestionAnswering",
    "M2BertForSequenceClassification",
    "M2BertForTextEncoding",
    "M2BertForTokenClassification",
    "M2BertModel",
    "M2BertPreTrainedModel",
    "MonarchLinear",
    "blockdiag_factor_shape",
    "blockdiag_multiply",
    "monarch_factor_shapes",
    "monarch_multiply",
    "project_blockdiag",
    "project_monarch",
    "projection_error",
    "set_monarch_backend",
]
