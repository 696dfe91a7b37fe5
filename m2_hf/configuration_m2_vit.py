"""M2-ViT configuration: Monarch Mixer image classification."""

from __future__ import annotations

from typing import Optional

from transformers import PreTrainedConfig

from .configuration_m2_common import DEFAULT_FILTER_CACHE_BYTES, check_mixer_fields

_POOLING = ("mean", "cls")


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


class M2ViTConfig(PreTrainedConfig):
    r"""
    Configuration of an M2-ViT model: a ViT whose attention is replaced by the M2 gated long convolution over the
    patch sequence (bidirectional implicit filters, as in M2-BERT) and whose MLPs use block-diagonal or Monarch layers,
    in pre-LayerNorm residual blocks. As in the Hyena ViT the paper builds on, there are no position embeddings: the
    convolutions carry position.

    The defaults are the paper's M2-ViT-b sizes (hidden 768, 12 layers, 224 px images, 16 px patches, block-diagonal
    MLP with 4 blocks): 47.4M parameters with a 1000-class head, against 86.6M for `ViTForImageClassification` of the
    same sizes.

    Args:
        image_size (`int` or `tuple[int, int]`, defaults to 224):
            Height and width of the input images. The model accepts images of this size only: its long-convolution
            filters span the patch grid of this size (`num_patches`), and a grid of another width would change which
            patches the filters treat as neighbours. The image processor resizes images to it; for another size, build
            the model with that `image_size` (and fine-tune).
        patch_size (`int`, defaults to 16):
            Side of the square patches; must divide both sides of `image_size`.
        num_channels (`int`, defaults to 3):
            Channels of the input images.
        hidden_size (`int`, defaults to 768):
            Width of the model.
        num_hidden_layers (`int`, defaults to 12):
            Number of blocks.
        intermediate_size (`int`, defaults to 3072):
            Width of the MLP (of each half of the GLU when `use_glu_mlp`).
        hidden_act (`str`, defaults to `"gelu"`):
            MLP activation.
        hidden_dropout_prob (`float`, defaults to 0.0):
            Dropout inside the MLP, on each block's residual branches and on the patch embeddings.
        layer_norm_eps (`float`, defaults to 1e-6):
            Epsilon of the LayerNorms.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the truncated normal init of dense weights and of the class token.
        pooling (`str`, defaults to `"mean"`):
            What the classifier reads: `"mean"`, the average of the patch states (the Hyena ViT's choice), or `"cls"`, a
            learned class token prepended to the patches (its final state).
        use_glu_mlp (`bool`, defaults to `False`):
            Gated MLP `GELU(W_g x) * (W_v x)` instead of `GELU(W x)`.
        use_monarch_mlp (`bool`, defaults to `True`):
            Structured MLP layers (of type `monarch_mlp_type`); `False` gives dense `nn.Linear` layers.
        monarch_mlp_type (`str`, defaults to `"blockdiag"`):
            `"blockdiag"` (`BlockdiagLinear`, the paper's M2-ViT) or `"monarch"` (two-factor `MonarchLinear`).
        monarch_mlp_nblocks (`int`, defaults to 4):
            Number of blocks of the structured MLP layers.
        residual_long_conv (`bool`, defaults to `False`):
            A second long convolution of the mixer input, added after the gate, as in M2-BERT (whose blocks have no
            residual connection around the mixer; these do).
        hyena_w (`float`, defaults to 1), hyena_w_mod (`float`, defaults to 1), hyena_emb_dim (`int`, defaults to 33),
        hyena_filter_order (`int`, defaults to 128):
            The implicit filters: initial sine frequency and its multiplier, size of the positional features (odd),
            width of the filter MLP. The defaults are the Hyena ViT's.
        hyena_training_additions (`bool`, defaults to `False`):
            An extra LayerNorm at the mixer input.
        structured_inference_path (`str`, defaults to `"auto"`):
            How the structured MLP layers apply themselves in inference (outside training and tracing): `"auto"`
            (the structured multiply or a cached densified weight, whichever is faster: by the layer's FLOP rule on
            CPU, timed once per layer shape on CUDA), `"structured"`, `"dense"` or `"measured"`. See `MonarchLinear` and `m2_hf.set_structured_inference_path`. An m2-hf
            extension.
        structured_training_path (`str`, defaults to `"auto"`):
            How the structured MLP layers apply themselves in training: `"auto"` (the structured multiply on CPU; on
            CUDA, whichever of the structured multiply and the weight densified in the autograd graph was faster when
            timed once per layer shape), `"structured"`, `"dense"` or `"measured"`. See `MonarchLinear` and
            `m2_hf.set_structured_training_path`. An m2-hf extension.
        filter_cache_bytes (`int` or `None`, defaults to 167772160, 160 MiB):
            Budget of the model's cache of filter spectra for inference (`model.filter_cache`; free it with
            `model.clear_filter_cache()`). A spectrum that does not fit is computed for each forward instead, which
            costs time at long lengths (one filter's spectrum is `hidden_size x (length + 1)` complex values: 100 MB
            at hidden 768 and 16384 tokens). `0` disables the cache, `None` lifts the limit.
    """

    model_type = "m2_vit"

    def __init__(
        self,
        image_size=224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        layer_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        pooling: str = "mean",
        use_glu_mlp: bool = False,
        use_monarch_mlp: bool = True,
        monarch_mlp_type: str = "blockdiag",
        monarch_mlp_nblocks: int = 4,
        residual_long_conv: bool = False,
        hyena_w: float = 1.0,
        hyena_w_mod: float = 1.0,
        hyena_emb_dim: int = 33,
        hyena_filter_order: int = 128,
        hyena_training_additions: bool = False,
        filter_cache_bytes: Optional[int] = DEFAULT_FILTER_CACHE_BYTES,
        structured_inference_path: str = "auto",
        structured_training_path: str = "auto",
        **kwargs,
    ) -> None:
        self.image_size = image_size if isinstance(image_size, int) else list(_pair(image_size))
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.pooling = pooling
        self.use_glu_mlp = use_glu_mlp
        self.use_monarch_mlp = use_monarch_mlp
        self.monarch_mlp_type = monarch_mlp_type
        self.monarch_mlp_nblocks = monarch_mlp_nblocks
        self.residual_long_conv = residual_long_conv
        self.hyena_w = hyena_w
        self.hyena_w_mod = hyena_w_mod
        self.hyena_emb_dim = hyena_emb_dim
        self.hyena_filter_order = hyena_filter_order
        self.hyena_training_additions = hyena_training_additions
        self.filter_cache_bytes = filter_cache_bytes
        self.structured_inference_path = structured_inference_path
        self.structured_training_path = structured_training_path
        self._validate()
        super().__init__(**kwargs)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches per column and per row."""
        height, width = _pair(self.image_size)
        return height // self.patch_size, width // self.patch_size

    @property
    def num_patches(self) -> int:
        rows, columns = self.grid_size
        return rows * columns

    # The shared mixer reads these names (M2-BERT's config fields).
    @property
    def long_conv_l_max(self) -> int:
        return self.num_patches + (1 if self.pooling == "cls" else 0)

    @property
    def bidirectional(self) -> bool:
        return True

    def _validate(self) -> None:
        check_mixer_fields(self)
        if self.pooling not in _POOLING:
            raise ValueError(f"`pooling` must be one of {_POOLING}, got {self.pooling!r}.")
        height, width = _pair(self.image_size)
        if self.patch_size < 1 or height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"`patch_size` ({self.patch_size}) must divide both sides of `image_size` ({height}x{width})."
            )


__all__ = ["M2ViTConfig"]
