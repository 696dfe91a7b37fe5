"""M2-ViT: Monarch Mixer image classification (Fu et al. 2023, section 5; no reference code was released).

A Hyena-style ViT: patch embedding, then pre-LayerNorm residual blocks ``h + mixer(LN(h))``, ``h + mlp(LN(h))`` where
the mixer is the M2 gated long convolution over the patch sequence in raster order (the bidirectional mixer of M2-BERT,
`m2_mixer.py`, one implementation) and the MLP uses block-diagonal (or Monarch) layers; a final LayerNorm, mean
pooling over patches (or a class token) and a linear classifier.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_m2_vit import M2ViTConfig, _pair
from .filter_cache import FilterCacheMixin
from .m2_mixer import M2PreNormBlock, init_mixer_module
from .model_utils import ShipsAllHeadsMixin, init_structured_layer

__all__ = ["M2ViTForImageClassification", "M2ViTModel", "M2ViTPreTrainedModel"]


class M2ViTPatchEmbeddings(nn.Module):
    """Non-overlapping ``patch_size`` patches, linearly embedded (a strided convolution), in raster order, with an
    optional class token in front."""

    def __init__(self, config: M2ViTConfig) -> None:
        super().__init__()
        self.image_size = _pair(config.image_size)
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        if config.pooling == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self._check_images(pixel_values)
        patches = self.projection(pixel_values.to(self.projection.weight.dtype)).flatten(2).transpose(1, 2)
        if hasattr(self, "cls_token"):
            patches = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        return self.dropout(patches)

    def _check_images(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"`pixel_values` must have shape (batch, {self.num_channels}, height, width) (`config.num_channels` = "
                f"{self.num_channels}); got {tuple(pixel_values.shape)}."
            )
        size = tuple(pixel_values.shape[-2:])
        if size != self.image_size:
            height, width = self.image_size
            raise ValueError(
                f"This M2-ViT takes {height}x{width} images (`config.image_size`), got {size[0]}x{size[1]}: its "
                "long-convolution filters span the patch grid of that size. Resize the images (its image processor "
                "does), or build a model with `image_size` set to the new size and fine-tune it."
            )


class M2ViTLayer(M2PreNormBlock):
    """``h + mixer(LN(h))``, then ``h + mlp(LN(h))``, with the bidirectional mixer over the patches
    (`M2PreNormBlock`)."""


class M2ViTPreTrainedModel(FilterCacheMixin, ShipsAllHeadsMixin, PreTrainedModel):
    config: M2ViTConfig
    config_class = M2ViTConfig
    base_model_prefix = "m2_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["M2ViTPatchEmbeddings", "M2ViTLayer"]
    _can_record_outputs = {"hidden_states": M2ViTLayer}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """ViT's init for dense layers, norms and the class token; the official M2 init for the mixer's own modules."""
        if init_mixer_module(module, self.config) or init_structured_layer(module):
            return
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, M2ViTPatchEmbeddings) and hasattr(module, "cls_token"):
            init.trunc_normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)
        else:
            super()._init_weights(module)


class M2ViTModel(M2ViTPreTrainedModel):
    """The bare M2-ViT: patch embeddings, blocks, a final LayerNorm, and the pooled representation (mean of the patch
    states, or the class token's state)."""

    def __init__(self, config: M2ViTConfig) -> None:
        super().__init__(config)
        self.embeddings = M2ViTPatchEmbeddings(config)
        self.layers = nn.ModuleList([M2ViTLayer(config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.projection

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self, pixel_values: Optional[torch.Tensor] = None, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithPooling:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Images of `config.image_size`, normalised as the image processor (`ViTImageProcessor`) does.
        """
        if pixel_values is None:
            raise ValueError("Pass `pixel_values` (batch, channels, height, width).")
        hidden_states = self.embeddings(pixel_values)
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        hidden_states = self.layernorm(hidden_states)
        if self.config.pooling == "cls":
            pooled = hidden_states[:, 0]
        else:
            pooled = hidden_states.mean(dim=1)
        return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=pooled)


class M2ViTForImageClassification(M2ViTPreTrainedModel):
    """M2-ViT with a linear classifier on the pooled representation (single-label, multi-label or regression, by
    `config.problem_type`, as Transformers' ViT)."""

    # The regression and multi-label losses are means that ignore `num_items_in_batch`: let Trainer scale the loss for
    # gradient accumulation.
    accepts_loss_kwargs = False

    def __init__(self, config: M2ViTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.m2_vit = M2ViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, config.num_labels)` (or float targets for regression and multi-label problems).
        """
        outputs = self.m2_vit(pixel_values, return_dict=True, **kwargs)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
