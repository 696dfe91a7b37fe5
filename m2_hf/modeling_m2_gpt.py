"""M2-GPT: a causal Monarch Mixer language model (Fu et al. 2023, section 5; no reference code was released).

GPT-style pre-LayerNorm residual blocks, ``h + mixer(LN(h))`` then ``h + mlp(LN(h))``, where the mixer is the M2
sequence mixer of M2-BERT (`m2_mixer.py`, one implementation) in its causal form and the MLP uses Monarch matrices.
Generation is incremental: `M2GPTCache` keeps, per block, the inputs of the long convolutions so far, the short
convolution's last inputs and, per long filter, what the tokens so far contribute to the next outputs, so each new
token costs O(log² length x hidden) amortised (`m2_mixer.ConvolutionState`) rather than a new FFT over the whole
prefix.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_m2_gpt import M2GPTConfig
from .filter_cache import FilterCacheMixin
from .lm_loss import fused_linear_cross_entropy
from .m2_mixer import ConvolutionState, M2PreNormBlock, init_mixer_module, is_traced
from .model_utils import ShipsAllHeadsMixin, init_structured_layer

__all__ = [
    "M2GPTCache",
    "M2GPTForCausalLM",
    "M2GPTForSequenceClassification",
    "M2GPTModel",
    "M2GPTPreTrainedModel",
]


class M2GPTCacheLayer(ConvolutionState, CacheLayerMixin):
    """One block's convolution state (see `ConvolutionState`) behind the Transformers cache-layer interface. It
    holds no keys or values; `crop` rolls back up to `ROLLBACK_LIMIT` tokens (what assisted generation needs)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        CacheLayerMixin.__init__(self)
        ConvolutionState.__init__(self)

    def lazy_initialization(self, key_states, value_states) -> None:
        raise TypeError("An M2-GPT cache layer stores convolution inputs, not keys and values.")

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("An M2-GPT cache layer stores convolution inputs, not keys and values.")

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.reorder(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        # Transformers' convention: a negative count removes that many tokens; a positive one is a legacy final size.
        ConvolutionState.crop(self, -tokens_to_remove if tokens_to_remove <= 0 else self.length - tokens_to_remove)

    def offload(self) -> None:
        if self._inputs is not None:
            self.device = self._inputs.device
            self.move_to("cpu")

    def prefetch(self) -> None:
        device = getattr(self, "device", None)
        if self._inputs is not None and device is not None and self._inputs.device != device:
            self.move_to(device)


class M2GPTCache(Cache):
    """The incremental-decoding state of an M2-GPT model: one `M2GPTCacheLayer` per block. `forward` creates it
    when `use_cache` is set (outside training) and returns it as `cache`; pass it back with the next tokens."""

    def __init__(self, config: M2GPTConfig) -> None:
        super().__init__(layers=[M2GPTCacheLayer() for _ in range(config.num_hidden_layers)])


def _check_length(length: int, config: M2GPTConfig) -> None:
    if length > config.max_position_embeddings:
        raise ValueError(
            f"The sequence has {length} tokens (prompt plus generated ones, with a cache), more than the model's "
            f"maximum of {config.max_position_embeddings} (`max_position_embeddings`, the length of its long-"
            f"convolution filters). Truncate the input, or generate fewer tokens (`max_new_tokens`); a longer model "
            f"needs `M2GPTConfig(max_position_embeddings=N)` and training at that length."
        )


class M2GPTBlock(M2PreNormBlock):
    """``h + mixer(LN(h))``, then ``h + mlp(LN(h))``, with the causal mixer (`M2PreNormBlock`)."""


class M2GPTPreTrainedModel(FilterCacheMixin, ShipsAllHeadsMixin, PreTrainedModel):
    config: M2GPTConfig
    config_class = M2GPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["M2GPTBlock"]
    _can_record_outputs = {"hidden_states": M2GPTBlock}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's init for dense, embedding and norm layers; the official M2 init for the mixer's own modules."""
        if init_mixer_module(module, self.config):
            return
        super()._init_weights(module)
        init_structured_layer(module)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        # generate() would build a DynamicCache of key/value layers; this model keeps convolution inputs instead.
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = M2GPTCache(self.config)
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def _real_token_mask(self, attention_mask: Optional[torch.Tensor], length: int) -> Optional[torch.Tensor]:
        """The mask to apply, or None when every token is real."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != length:
            raise ValueError(
                f"`attention_mask` must be 2-D (batch, {length}): one entry per token, the cached ones included; got "
                f"shape {tuple(attention_mask.shape)}."
            )
        if is_traced():  # no branch on the mask's values in a graph (see M2BertPreTrainedModel._real_token_mask)
            return attention_mask
        return None if bool(attention_mask.all()) else attention_mask


class M2GPTModel(M2GPTPreTrainedModel):
    """The bare M2-GPT: token embeddings, blocks and a final LayerNorm."""

    def __init__(self, config: M2GPTConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.embedding_dropout_prob)
        self.layers = nn.ModuleList([M2GPTBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[M2GPTCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch_size, cached + sequence_length)`, *optional*):
            1 for real tokens, 0 for padding (left padding for batched generation). Padded positions contribute
            nothing to the convolutions, so the outputs at real tokens are those of the unpadded sequence.
        cache (`M2GPTCache`, *optional*):
            The state returned by a previous call; the new tokens continue that sequence.
        use_cache (`bool`, *optional*):
            Return the state for incremental decoding (`cache`); ignored in training unless a cache is passed.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if cache is not None and not isinstance(cache, M2GPTCache):
            raise TypeError(
                f"`cache` must be an M2GPTCache (the `cache` an M2-GPT forward returns), got {type(cache).__name__}."
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if cache is None and use_cache and not self.training:
            cache = M2GPTCache(self.config)
        past = 0 if cache is None else cache.get_seq_length()
        _check_length(past + inputs_embeds.shape[1], self.config)
        mask = self._real_token_mask(attention_mask, past + inputs_embeds.shape[1])
        hidden_states = self.dropout(inputs_embeds)
        for index, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[index]
            hidden_states = layer(hidden_states, mask, cache=layer_cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


# The loss keywords `fused_linear_cross_entropy` takes, as Transformers' `ForCausalLMLoss` does.
_FUSED_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


class M2GPTForCausalLM(M2GPTPreTrainedModel, GenerationMixin):
    """M2-GPT with a language-modelling head tied to the token embeddings; generates with `generate()`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: M2GPTConfig) -> None:
        super().__init__(config)
        self.model = M2GPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[M2GPTCache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets, aligned with `input_ids` (the loss shifts them); -100 marks positions without one.
        logits_to_keep (`int`, defaults to 0):
            Compute logits for the last `logits_to_keep` positions only (0: all), as `generate()` asks.
        """
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if self._fuses_loss(labels, logits_to_keep):
            loss_kwargs = {key: kwargs[key] for key in _FUSED_LOSS_KWARGS if key in kwargs}
            loss = fused_linear_cross_entropy(hidden_states, self.lm_head.weight, labels, **loss_kwargs)
            return CausalLMOutputWithPast(loss=loss, cache=outputs.cache, hidden_states=outputs.hidden_states)
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)


    def _fuses_loss(self, labels: Optional[torch.Tensor], logits_to_keep: int) -> bool:
        """Whether this forward computes the loss without logits (see `M2GPTConfig.fused_training_loss`). Not in a
        captured graph: the fused loss selects the labelled positions, a data-dependent size."""
        return (
            self.training
            and not is_traced()
            and labels is not None
            and self.config.fused_training_loss
            and not logits_to_keep
            and self.lm_head.bias is None
        )


class M2GPTForSequenceClassification(M2GPTPreTrainedModel):
    """M2-GPT with a classification/regression head on the last real token (the only one that has seen all others,
    the model being causal), as Transformers' GPT-2 does."""

    accepts_loss_kwargs = False

    def __init__(self, config: M2GPTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = M2GPTModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def _last_real_token(self, input_ids, attention_mask, batch: int, length: int, device) -> torch.Tensor:
        positions = torch.arange(length, device=device)
        if attention_mask is not None:
            real = attention_mask[:, -length:].bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        elif batch == 1 or input_ids is None:
            return torch.full((batch,), length - 1, device=device)
        else:
            raise ValueError(
                "A batch of several sequences needs an `attention_mask` or a `config.pad_token_id` to find each "
                "sequence's last token."
            )
        return (positions * real).argmax(-1)

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        r"""
        labels (`torch.Tensor` of shape `(batch_size,)`, *optional*):
            Class indices, or float targets for regression (`num_labels == 1`) and multi-label classification.
        """
        kwargs.pop("use_cache", None)
        outputs = self.model(
            input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=False, return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        batch, length = hidden_states.shape[:2]
        last = self._last_real_token(input_ids, attention_mask, batch, length, hidden_states.device)
        logits = self.score(hidden_states[torch.arange(batch, device=hidden_states.device), last])
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
