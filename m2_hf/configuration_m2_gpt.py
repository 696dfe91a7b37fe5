"""M2-GPT configuration: a causal Monarch Mixer language model."""

from __future__ import annotations

from typing import Optional

from transformers import PreTrainedConfig

from .configuration_m2_common import DEFAULT_FILTER_CACHE_BYTES, check_mixer_fields


# Documented sizes, with their parameter counts (Monarch GLU MLP, GPT-2 vocabulary, tied embeddings). "125m", the
# default, is GPT-2 small's shape (the paper's smaller scale): 93.6M parameters against GPT-2 small's 124.4M, the
# Monarch MLPs being where the difference lies. "360m" matches GPT-2 medium (354.8M) in parameters, as the paper's
# PILE comparison does at 360M: 364.9M parameters.
PRESETS: dict[str, dict] = {
    "125m": {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072},
    "360m": {"hidden_size": 1280, "num_hidden_layers": 24, "intermediate_size": 5120},
}


class M2GPTConfig(PreTrainedConfig):
    r"""
    Configuration of an M2-GPT model: a causal language model whose attention is replaced by the M2 gated long
    convolution in its causal form (causal short convolution, causal implicit Hyena filters, FFT convolution
    zero-padded to twice the length) and whose MLP uses Monarch matrices, in GPT-style pre-LayerNorm residual blocks
    with tied input and output embeddings. There are no position embeddings: the convolutions carry position.

    The defaults give GPT-2 small's shape (hidden 768, 12 layers; 93.6M parameters); `M2GPTConfig.from_preset("360m")`
    gives 364.9M parameters, about GPT-2 medium's 354.8M (see `PRESETS`).

    Args:
        vocab_size (`int`, defaults to 50257):
            Vocabulary size (the GPT-2 tokenizer's).
        hidden_size (`int`, defaults to 768):
            Width of the model.
        num_hidden_layers (`int`, defaults to 12):
            Number of blocks.
        intermediate_size (`int`, defaults to 3072):
            Width of the MLP (of each half of the GLU).
        hidden_act (`str`, defaults to `"gelu"`):
            MLP activation.
        hidden_dropout_prob (`float`, defaults to 0.0):
            Dropout inside the MLP and on each block's residual branches.
        embedding_dropout_prob (`float`, defaults to 0.0):
            Dropout on the token embeddings.
        max_position_embeddings (`int`, defaults to 2048):
            Length of the implicit long-convolution filters: the longest sequence (prompt plus generated tokens) the
            model accepts.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal init of dense and embedding weights.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the LayerNorms.
        use_glu_mlp (`bool`, defaults to `True`):
            Gated MLP: `GELU(W_g x) * (W_v x)`.
        use_monarch_mlp (`bool`, defaults to `True`):
            Structured MLP layers (of type `monarch_mlp_type`); `False` gives dense `nn.Linear` layers.
        monarch_mlp_type (`str`, defaults to `"monarch"`):
            `"monarch"` (two-factor `MonarchLinear`) or `"blockdiag"` (`BlockdiagLinear`).
        monarch_mlp_nblocks (`int`, defaults to 4):
            Number of blocks of the structured MLP layers.
        residual_long_conv (`bool`, defaults to `False`):
            A second long convolution of the mixer input, added after the gate, as in M2-BERT. M2-BERT needs it because
            its layers have no residual connection around the mixer; pre-LayerNorm blocks have one, and without it
            incremental decoding keeps half as much history.
        hyena_w (`float`, defaults to 10), hyena_w_mod (`float`, defaults to 1), hyena_emb_dim (`int`, defaults to 5),
        hyena_filter_order (`int`, defaults to 128):
            The implicit filters, as in M2-BERT: initial sine frequency and its multiplier, size of the positional
            features, width of the filter MLP.
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
        fused_training_loss (`bool`, defaults to `True`):
            In training mode, when `labels` are given, compute the loss fused with the output layer, chunk by chunk,
            without materialising the `[batch, length, vocab_size]` logits (`lm_loss.fused_linear_cross_entropy`:
            the same loss and gradients, less memory, a faster step); the output's `logits` are then None. Evaluation
            and inference always return logits.
        use_cache (`bool`, defaults to `True`):
            Whether forward returns the convolution state for incremental decoding (`M2GPTCache`).
        tie_word_embeddings (`bool`, defaults to `True`):
            Tie the output projection to the token embeddings.
    """

    model_type = "m2_gpt"

    def __init__(
        self,
        vocab_size: int = 50257,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        embedding_dropout_prob: float = 0.0,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        use_glu_mlp: bool = True,
        use_monarch_mlp: bool = True,
        monarch_mlp_type: str = "monarch",
        monarch_mlp_nblocks: int = 4,
        residual_long_conv: bool = False,
        hyena_w: float = 10.0,
        hyena_w_mod: float = 1.0,
        hyena_emb_dim: int = 5,
        hyena_filter_order: int = 128,
        hyena_training_additions: bool = False,
        filter_cache_bytes: Optional[int] = DEFAULT_FILTER_CACHE_BYTES,
        structured_inference_path: str = "auto",
        structured_training_path: str = "auto",
        fused_training_loss: bool = True,
        use_cache: bool = True,
        bos_token_id: Optional[int] = 50256,
        eos_token_id: Optional[int] = 50256,
        pad_token_id: Optional[int] = None,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.embedding_dropout_prob = embedding_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
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
        self.fused_training_loss = fused_training_loss
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self._validate()
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    # The shared mixer reads these names (M2-BERT's config fields).
    @property
    def long_conv_l_max(self) -> int:
        return self.max_position_embeddings

    @property
    def bidirectional(self) -> bool:
        return False

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "M2GPTConfig":
        """A config of one of the documented sizes (`PRESETS`); keyword arguments override its fields."""
        if name not in PRESETS:
            raise ValueError(f"Unknown M2-GPT preset {name!r}; choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **kwargs})

    def _validate(self) -> None:
        check_mixer_fields(self)
        if self.max_position_embeddings < 1:
            raise ValueError(f"`max_position_embeddings` must be positive, got {self.max_position_embeddings}.")
