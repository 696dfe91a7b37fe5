"""M2-BERT (Monarch Mixer BERT) as a native Transformers model.

Architecture, parameter names and numerics follow HazyResearch/m2 (`bert/src/bert_layers.py`), so the released
checkpoints give the released results. Unlike the official code, the attention mask is honoured: padded positions
contribute nothing to the convolutions and position ids count real tokens only, so padding (left or right) does not
change the outputs at real tokens. With an all-ones mask or none, the computation is the official one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_m2_bert import M2BertConfig
from .filter_cache import FilterCacheMixin
from .m2_mixer import M2GatedMLP, M2SequenceMixer, init_mixer_module, is_traced
from .model_utils import ShipsAllHeadsMixin, init_structured_layer, write_sentence_transformers_files

__all__ = [
    "M2BertForMaskedLM",
    "M2BertForQuestionAnswering",
    "M2BertForSequenceClassification",
    "M2BertForTextEncoding",
    "M2BertForTokenClassification",
    "M2BertModel",
    "M2BertPreTrainedModel",
]


@dataclass
class M2BertTextEncodingOutput(ModelOutput):
    r"""
    Output of [`M2BertForTextEncoding`].

    sentence_embedding (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        The text embedding: the pooler output (L2-normalised when `config.use_normalized_embeddings`), as the
        released M2-BERT retrieval encoders return it.
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Hidden states of the last layer.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Embedding output and every layer's output, when `output_hidden_states=True`.
    """

    sentence_embedding: Optional[torch.FloatTensor] = None
    last_hidden_state: Optional[torch.FloatTensor] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None


def _check_length(length: int, config: M2BertConfig) -> None:
    if length > config.long_conv_l_max:
        raise ValueError(
            f"Input length {length} exceeds the model's maximum of {config.long_conv_l_max} tokens "
            f"(`long_conv_l_max` = `max_position_embeddings`). Truncate the input (tokenizer `truncation=True, "
            f"max_length={config.long_conv_l_max}`) or use a longer model: build one with "
            f"`M2BertConfig(max_position_embeddings=N, long_conv_l_max=N)` and train or extend it."
        )


def _positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (0 for padding): left padding does not shift real tokens."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class M2BertEmbeddings(nn.Module):
    """Word, learned absolute position and token-type embeddings, LayerNorm and dropout."""

    def __init__(self, config: M2BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        if config.use_positional_encodings:
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            # Persistent, as in the official model (it is in the released state dicts).
            self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)))
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer(
            "token_type_ids", torch.zeros((1, config.max_position_embeddings), dtype=torch.long), persistent=False
        )

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if token_type_ids is None:
            token_type_ids = self.token_type_ids[:, :length].expand(batch, length)
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids)
        if hasattr(self, "position_embeddings"):
            if position_ids is None:
                position_ids = self.position_ids[:, :length]
            embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class M2BertLayer(GradientCheckpointingLayer):
    """``mlp(attention(h))``: the M2 sequence mixer (named `attention` as in the official model, no residual and no
    norm around it) followed by the gated MLP with its residual and post-LayerNorm."""

    def __init__(self, config: M2BertConfig) -> None:
        super().__init__()
        self.attention = M2SequenceMixer(config)
        self.mlp = M2GatedMLP(config)

    def forward(self, hidden_states: torch.Tensor, mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        return self.mlp(self.attention(hidden_states, mask))


class M2BertEncoder(nn.Module):
    def __init__(self, config: M2BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([M2BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor, mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, mask, **kwargs)
        return hidden_states


class M2BertPooler(nn.Module):
    """``tanh(dense(h))`` of the first real token (CLS), or of the masked mean when ``config.pool_all``."""

    def __init__(self, config: M2BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()
        self.pool_all = config.pool_all

    def forward(self, hidden_states: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.pool_all:
            weights = torch.ones_like(hidden_states[..., 0]) if mask is None else mask.to(hidden_states.dtype)
            pooled = (hidden_states * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
        elif mask is None:
            pooled = hidden_states[:, 0]
        else:
            first_real = mask.long().argmax(dim=1)  # CLS, wherever left padding put it
            pooled = hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), first_real]
        return self.activation(self.dense(pooled))


class M2BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: M2BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)  # hard-coded in the official head

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class M2BertLMPredictionHead(nn.Module):
    def __init__(self, config: M2BertConfig) -> None:
        super().__init__()
        self.transform = M2BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class M2BertOnlyMLMHead(nn.Module):
    def __init__(self, config: M2BertConfig) -> None:
        super().__init__()
        self.predictions = M2BertLMPredictionHead(config)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.predictions(sequence_output)


class M2BertPreTrainedModel(FilterCacheMixin, ShipsAllHeadsMixin, PreTrainedModel):
    config: M2BertConfig
    config_class = M2BertConfig
    base_model_prefix = "bert"
    supports_gradient_checkpointing = True
    _no_split_modules = ["M2BertLayer", "M2BertEmbeddings"]
    _can_record_outputs = {"hidden_states": M2BertLayer}
    # Released checkpoints repeat the shared sine frequency under five more slots and carry CUDA-only FlashFFTConv
    # buffers; neither is a parameter here.
    _keys_to_ignore_on_load_unexpected = [
        r"\.implicit_filter\.[35]\.freq$",
        r"\.implicit_filter_rev\.[135]\.freq$",
        r"\.flashfft\.",
    ]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """HF BERT init for dense, embedding and norm layers; the official init for everything M2-specific."""
        if init_mixer_module(module, self.config):
            return
        super()._init_weights(module)
        if isinstance(module, M2BertEmbeddings):
            if hasattr(module, "position_ids"):
                init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)
        else:
            init_structured_layer(module)

    def _backbone(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **kwargs):
        """The heads' call of their `bert` backbone."""
        return self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )

    def _real_token_mask(self, attention_mask: Optional[torch.Tensor], input_shape: torch.Size):
        """The mask to apply, or None when every token is real (then the official computation runs unchanged)."""
        if attention_mask is None:
            return None
        if attention_mask.shape != input_shape:
            raise ValueError(
                f"`attention_mask` must have the shape of the input {tuple(input_shape)}, got "
                f"{tuple(attention_mask.shape)}."
            )
        # A traced graph applies the mask whatever it holds: multiplying by ones changes nothing, and a branch on its
        # values would be a host sync and a graph break. Eager code skips the multiplications.
        if is_traced():
            return attention_mask
        return None if bool(attention_mask.all()) else attention_mask


class M2BertModel(M2BertPreTrainedModel):
    """The bare M2-BERT encoder: embeddings, M2 layers and (optionally) the pooler."""

    def __init__(self, config: M2BertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = M2BertEmbeddings(config)
        self.encoder = M2BertEncoder(config)
        self.pooler = M2BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for real tokens, 0 for padding. Padding may be on either side; it does not change the outputs at real
            tokens. The official M2-BERT ignores the mask; with an all-ones mask the two compute the same.
        position_ids (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            Defaults to `0, 1, ...` counted over real tokens only.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        input_shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        _check_length(input_shape[-1], self.config)
        mask = self._real_token_mask(attention_mask, input_shape)
        if position_ids is None and mask is not None:
            position_ids = _positions_from_mask(mask)
        hidden_states = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        hidden_states = self.encoder(hidden_states, mask, **kwargs)
        pooled = self.pooler(hidden_states, mask) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled)


def _classifier_dropout(config: M2BertConfig) -> nn.Dropout:
    rate = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    return nn.Dropout(rate)


class M2BertForMaskedLM(M2BertPreTrainedModel):
    """M2-BERT with the masked-language-modelling head; the decoder weight is tied to the word embeddings."""

    _tied_weights_keys = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"}

    def __init__(self, config: M2BertConfig) -> None:
        super().__init__(config)
        self.bert = M2BertModel(config, add_pooling_layer=False)
        self.cls = M2BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.predictions.decoder = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids to predict; -100 marks positions without a target.
        """
        outputs = self._backbone(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **kwargs)
        logits = self.cls(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class M2BertForSequenceClassification(M2BertPreTrainedModel):
    """M2-BERT with a classification/regression head on the pooled output."""

    # Its losses are means that ignore `num_items_in_batch`: let Trainer scale them for gradient accumulation.
    accepts_loss_kwargs = False

    def __init__(self, config: M2BertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = M2BertModel(config)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        r"""
        labels (`torch.Tensor` of shape `(batch_size,)`, *optional*):
            Class indices, or float targets for regression (`num_labels == 1`) and multi-label classification.
        """
        outputs = self._backbone(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **kwargs)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class M2BertForTokenClassification(M2BertPreTrainedModel):
    """M2-BERT with a per-token classification head."""

    def __init__(self, config: M2BertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = M2BertModel(config, add_pooling_layer=False)
        self.dropout = _classifier_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Class index per token; -100 marks positions without a target.
        """
        outputs = self._backbone(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **kwargs)
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            # Divides by `num_items_in_batch` when Trainer passes it: with gradient accumulation, every target token
            # weighs the same however the -100 labels fall across the micro-batches.
            loss = self.loss_function(logits, labels, self.config, **kwargs)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class M2BertForQuestionAnswering(M2BertPreTrainedModel):
    """M2-BERT with an extractive question-answering head (span start and end logits)."""

    accepts_loss_kwargs = False

    def __init__(self, config: M2BertConfig) -> None:
        super().__init__(config)
        self.bert = M2BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        start_positions: Optional[torch.Tensor] = None,
        end_positions: Optional[torch.Tensor] = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QuestionAnsweringModelOutput:
        r"""
        start_positions, end_positions (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Token index of the answer span's first and last token.
        """
        outputs = self._backbone(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **kwargs)
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).unbind(dim=-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions)
        return QuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=outputs.hidden_states
        )


class M2BertForTextEncoding(M2BertPreTrainedModel):
    """M2-BERT as a text encoder for retrieval: ``sentence_embedding`` is the pooler output, as in the released
    long-context retrieval models (compare embeddings with cosine similarity).

    Its folders load as the released ones do (``AutoModelForSequenceClassification`` gives this class) and are
    sentence-transformers models: ``SentenceTransformer(folder, trust_remote_code=True).encode(texts)`` returns
    ``sentence_embedding``."""

    def __init__(self, config: M2BertConfig) -> None:
        super().__init__(config)
        self.bert = M2BertModel(config)
        self.post_init()

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_sentence_transformers_files(save_directory, normalize=self.config.use_normalized_embeddings)

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> M2BertTextEncodingOutput:
        outputs = self._backbone(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, **kwargs)
        embedding = outputs.pooler_output
        if self.config.use_normalized_embeddings:
            embedding = F.normalize(embedding, dim=-1)
        return M2BertTextEncodingOutput(
            sentence_embedding=embedding,
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
        )

