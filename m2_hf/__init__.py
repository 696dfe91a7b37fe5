"""m2-hf: Monarch matrices and the Monarch Mixer (M2) model family for Hugging Face Transformers.

Importing the package registers the M2 models with the Auto classes (and their code for `save_pretrained`, so saved
folders load with `trust_remote_code=True` where m2-hf is not installed).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertTokenizer,
    GPT2Tokenizer,
)

# Imported from their modules: where torchvision is missing, the top-level names are placeholders that warn (the ViT
# processor) or raise (AutoImageProcessor, in Transformers before 5.2x).
from transformers.models.auto.image_processing_auto import AutoImageProcessor
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
from transformers.models.vit.image_processing_vit import ViTImageProcessor

from .configuration_m2_bert import M2BertConfig
from .configuration_m2_gpt import M2GPTConfig
from .configuration_m2_vit import M2ViTConfig
from .filter_cache import FilterCache
from .lm_loss import fused_linear_cross_entropy
from .modeling_m2_bert import (
    M2BertForMaskedLM,
    M2BertForQuestionAnswering,
    M2BertForSequenceClassification,
    M2BertForTextEncoding,
    M2BertForTokenClassification,
    M2BertModel,
    M2BertPreTrainedModel,
)
from .modeling_m2_gpt import (
    M2GPTCache,
    M2GPTForCausalLM,
    M2GPTForSequenceClassification,
    M2GPTModel,
    M2GPTPreTrainedModel,
)
from .modeling_m2_vit import M2ViTForImageClassification, M2ViTModel, M2ViTPreTrainedModel
from .modeling_monarch_converted import (
    CONVERTED_CLASSES,
    converted_class,
    converted_family,
    resolve_converted_model_types,
    structure_linear_layers,
)
from .monarch import (
    BlockdiagLinear,
    MonarchLinear,
    blockdiag_factor_shape,
    blockdiag_multiply,
    clear_measured_inference_paths,
    clear_measured_training_paths,
    dense_weight_and_bias,
    measured_inference_paths,
    measured_training_paths,
    monarch_factor_shapes,
    monarch_multiply,
    project_blockdiag,
    project_monarch,
    projection_error,
    set_monarch_backend,
    set_structured_inference_path,
    set_structured_training_path,
    structured_layers,
)

__version__ = "0.1.0"


def _shipped_name(cls: type) -> str:
    """How an `auto_map` names a class of this package: `<module file>.<class>`."""
    return f"{cls.__module__.rpartition('.')[2]}.{cls.__name__}"


def _register(
    config_class, model_type: str, heads: dict, tokenizer_class=None, extra_classes=(), image_processors=None
) -> None:
    """Register a model family with the Auto classes, here and in the code that `save_pretrained` ships (whose
    `auto_map` names every head: `ShipsAllHeadsMixin`)."""
    AutoConfig.register(model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class()
    auto_map = {"AutoConfig": _shipped_name(config_class)}
    for auto_class, model_class in heads.items():
        auto_class.register(config_class, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)
        auto_map[auto_class.__name__] = _shipped_name(model_class)
    for model_class in (*heads.values(), *extra_classes):
        model_class.shipped_auto_map = auto_map
    if tokenizer_class is not None:
        AutoTokenizer.register(config_class, fast_tokenizer_class=tokenizer_class, exist_ok=True)
    if image_processors is not None:
        AutoImageProcessor.register(config_class, image_processor_classes=image_processors, exist_ok=True)


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
    extra_classes=(M2BertForTextEncoding,),
)
# As in the released retrieval models, AutoModelForSequenceClassification gives the text encoder for a text encoder's
# folder (chosen by its `architectures`), here and in the code its folders ship; AutoModel stays the bare encoder,
# which sentence-transformers loads.
AutoModelForSequenceClassification.register(
    M2BertConfig, (M2BertForSequenceClassification, M2BertForTextEncoding), exist_ok=True
)
M2BertForTextEncoding.register_for_auto_class("AutoModelForSequenceClassification")

_register(
    M2GPTConfig,
    "m2_gpt",
    {
        AutoModel: M2GPTModel,
        AutoModelForCausalLM: M2GPTForCausalLM,
        AutoModelForSequenceClassification: M2GPTForSequenceClassification,
    },
    tokenizer_class=GPT2Tokenizer,
)

_register(
    M2ViTConfig,
    "m2_vit",
    {AutoModel: M2ViTModel, AutoModelForImageClassification: M2ViTForImageClassification},
    # ViT's processor: the torchvision backend where torchvision is installed, else the PIL one.
    image_processors={"torchvision": ViTImageProcessor, "pil": ViTImageProcessorPil},
)

# Converted folders (`monarch_<type>`, any architecture) resolve through the Auto classes on demand.
resolve_converted_model_types()


def __getattr__(name: str):
    # `m2_hf.MonarchLlamaForCausalLM`, `m2_hf.MonarchBertConfig`, ...: the converted counterpart of a Transformers
    # class, made (and its family registered) on first use.
    from . import configuration_monarch_converted, modeling_monarch_converted

    try:
        if name.endswith("Config"):
            config_class = getattr(configuration_monarch_converted, name)
            converted_family(config_class.original_config_class)
            return config_class
        return getattr(modeling_monarch_converted, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


__all__ = [
    "BlockdiagLinear",
    "clear_measured_inference_paths",
    "clear_measured_training_paths",
    "measured_inference_paths",
    "measured_training_paths",
    "FilterCache",
    "MonarchBertConfig",
    "MonarchDistilBertConfig",
    "MonarchGPT2Config",
    "MonarchRobertaConfig",
    "converted_class",
    "converted_family",
    "structure_linear_layers",
    "M2BertConfig",
    "M2BertForMaskedLM",
    "M2BertForQuestionAnswering",
    "M2BertForSequenceClassification",
    "M2BertForTextEncoding",
    "M2BertForTokenClassification",
    "M2BertModel",
    "M2BertPreTrainedModel",
    "M2GPTCache",
    "M2GPTConfig",
    "M2GPTForCausalLM",
    "M2GPTForSequenceClassification",
    "M2GPTModel",
    "M2GPTPreTrainedModel",
    "M2ViTConfig",
    "M2ViTForImageClassification",
    "M2ViTModel",
    "M2ViTPreTrainedModel",
    "MonarchLinear",
    "blockdiag_factor_shape",
    "blockdiag_multiply",
    "dense_weight_and_bias",
    "fused_linear_cross_entropy",
    "monarch_factor_shapes",
    "monarch_multiply",
    "project_blockdiag",
    "project_monarch",
    "projection_error",
    "set_monarch_backend",
    "set_structured_inference_path",
    "set_structured_training_path",
    "structured_layers",
]
