"""M2-BERT configuration. Field names are those of HazyResearch/m2, so a released `config.json` loads unchanged."""

from __future__ import annotations

from typing import Optional

from transformers import PreTrainedConfig

from .configuration_m2_common import DEFAULT_FILTER_CACHE_BYTES, check_mixer_fields



class M2BertConfig(PreTrainedConfig):
    r"""
    Configuration of an M2-BERT model (Monarch Mixer BERT, Fu et al. 2023): BERT whose attention is replaced by a
    gated bidirectional long convolution (implicit Hyena filters, computed with FFTs) and whose MLP uses
    block-diagonal layers. Defaults give M2-BERT-base 80M with a 512-token context; the released checkpoints set
    `max_position_embeddings` / `long_conv_l_max` to 128, 2048, 8192 or 32768.

    Args:
        vocab_size (`int`, defaults to 30528):
            Vocabulary size; the released models pad bert-base-uncased's 30522 to a multiple of 8.
        hidden_size (`int`, defaults to 768):
            Width of the model.
        num_hidden_layers (`int`, defaults to 12):
            Number of M2 layers.
        num_attention_heads (`int`, defaults to 12):
            Unused by the M2 mixer; kept because released configs carry it.
        intermediate_size (`int`, defaults to 3072):
            Width of the MLP (of each half of the GLU).
        hidden_act (`str`, defaults to `"gelu"`):
            MLP activation (`"gelu"` is the exact erf form, as in the official code).
        hidden_dropout_prob (`float`, defaults to 0.1):
            Dropout after the embeddings and inside the MLP.
        attention_probs_dropout_prob (`float`, defaults to 0.0):
            Unused by the M2 mixer; kept for config compatibility.
        max_position_embeddings (`int`, defaults to 512):
            Number of learned absolute positions, and the longest input the model accepts.
        type_vocab_size (`int`, defaults to 2):
            Number of token types.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal init of dense and embedding weights.
        layer_norm_eps (`float`, defaults to 1e-12):
            Epsilon of the embedding and MLP LayerNorms.
        pad_token_id (`int`, defaults to 0):
            Padding token id (its embedding row is zero-initialised).
        classifier_dropout (`float`, *optional*):
            Dropout of the classification heads; `hidden_dropout_prob` when unset.
        use_glu_mlp (`bool`, defaults to `True`):
            Gated MLP: `GELU(W_g x) * (W_v x)` with both halves computed by one layer.
        use_monarch_mlp (`bool`, defaults to `True`):
            Structured MLP layers (of type `monarch_mlp_type`); `False` gives dense `nn.Linear` layers.
        monarch_mlp_nblocks (`int`, defaults to 4):
            Number of blocks of the structured MLP layers.
        monarch_mlp_type (`str`, defaults to `"blockdiag"`):
            `"blockdiag"` (one block-diagonal factor, `BlockdiagLinear`, as in every released model) or `"monarch"`
            (the two-factor `MonarchLinear`). An m2-hf extension.
        monarch_mixer_sequence_mixing (`bool`, defaults to `True`):
            Use the M2 sequence mixer. Only `True` is supported (the attention variant of the official code base is
            plain BERT).
        long_conv_l_max (`int`, *optional*):
            Length of the implicit long-convolution filters; defaults to `max_position_embeddings` and must equal it.
        residual_long_conv (`bool`, defaults to `True`):
            Add a second long convolution of the mixer input after the gate.
        bidirectional (`bool`, defaults to `True`):
            Bidirectional long convolution (a forward and a reverse filter).
        hyena_w (`float`, defaults to 10):
            Initial frequency of the sine activations of the implicit filter MLP.
        hyena_w_mod (`float`, defaults to 1):
            Constant multiplier of that frequency.
        hyena_wd (`float`, defaults to 0.1):
            Weight decay of the filter MLP in the official training recipe.
        hyena_emb_dim (`int`, defaults to 5):
            Size of the positional features fed to the filter MLP (time plus sine/cosine bands).
        hyena_filter_order (`int`, defaults to 128):
            Width of the filter MLP.
        hyena_filter_dropout (`float`, defaults to 0.2):
            Kept for config compatibility; the official filter never applies it.
        hyena_training_additions (`bool`, defaults to `False`):
            LayerNorm at the mixer input (the 80M GLUE checkpoint uses it).
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
        hyena_lr_pos_emb (`float`, defaults to 1e-5):
            Learning rate of the positional features in the official recipe.
        long_conv_kernel_learning_rate (`float`, defaults to 1e-3):
            Learning rate of the filter MLP in the official recipe.
        use_positional_encodings (`bool`, defaults to `True`):
            Learned absolute position embeddings (every released model uses them).
        pool_all (`bool`, defaults to `False`):
            Pooler input: the first real token (`False`, CLS) or the masked mean over real tokens (`True`).
        use_normalized_embeddings (`bool`, defaults to `False`):
            L2-normalise the `sentence_embedding` of `M2BertForTextEncoding`.
        use_flash_fft (`bool`, defaults to `False`), use_flash_mm (`bool`, defaults to `False`):
            CUDA-only FlashFFTConv / FlashMM paths of the official code; m2-hf computes the same convolution with
            `torch.fft` and ignores the checkpoints' FlashFFTConv buffers.

    Fields this class does not know (for example `alibi_starting_size` of released configs) are kept as attributes
    and written back on save.
    """

    model_type = "m2_bert"

    def __init__(
        self,
        vocab_size: int = 30528,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.0,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int = 0,
        classifier_dropout: Optional[float] = None,
        use_glu_mlp: bool = True,
        use_monarch_mlp: bool = True,
        monarch_mlp_nblocks: int = 4,
        monarch_mlp_type: str = "blockdiag",
        monarch_mixer_sequence_mixing: bool = True,
        long_conv_l_max: Optional[int] = None,
        residual_long_conv: bool = True,
        bidirectional: bool = True,
        hyena_w: float = 10.0,
        hyena_w_mod: float = 1.0,
        hyena_wd: float = 0.1,
        hyena_emb_dim: int = 5,
        hyena_filter_order: int = 128,
        hyena_filter_dropout: float = 0.2,
        hyena_training_additions: bool = False,
        hyena_lr_pos_emb: float = 1e-5,
        filter_cache_bytes: Optional[int] = DEFAULT_FILTER_CACHE_BYTES,
        structured_inference_path: str = "auto",
        structured_training_path: str = "auto",
        long_conv_kernel_learning_rate: float = 1e-3,
        use_positional_encodings: bool = True,
        pool_all: bool = False,
        use_normalized_embeddings: bool = False,
        use_flash_fft: bool = False,
        use_flash_mm: bool = False,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        long_conv_l_max = max_position_embeddings if long_conv_l_max is None else long_conv_l_max
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.classifier_dropout = classifier_dropout
        self.use_glu_mlp = use_glu_mlp
        self.use_monarch_mlp = use_monarch_mlp
        self.monarch_mlp_nblocks = monarch_mlp_nblocks
        self.monarch_mlp_type = monarch_mlp_type
        self.monarch_mixer_sequence_mixing = monarch_mixer_sequence_mixing
        self.long_conv_l_max = long_conv_l_max
        self.residual_long_conv = residual_long_conv
        self.bidirectional = bidirectional
        self.hyena_w = hyena_w
        self.hyena_w_mod = hyena_w_mod
        self.hyena_wd = hyena_wd
        self.hyena_emb_dim = hyena_emb_dim
        self.hyena_filter_order = hyena_filter_order
        self.hyena_filter_dropout = hyena_filter_dropout
        self.hyena_training_additions = hyena_training_additions
        self.hyena_lr_pos_emb = hyena_lr_pos_emb
        self.filter_cache_bytes = filter_cache_bytes
        self.structured_inference_path = structured_inference_path
        self.structured_training_path = structured_training_path
        self.long_conv_kernel_learning_rate = long_conv_kernel_learning_rate
        self.use_positional_encodings = use_positional_encodings
        self.pool_all = pool_all
        self.use_normalized_embeddings = use_normalized_embeddings
        self.use_flash_fft = use_flash_fft
        self.use_flash_mm = use_flash_mm
        self.tie_word_embeddings = tie_word_embeddings
        self._validate()
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        # AutoModelForSequenceClassification chooses between the classifier and the text encoder by `architectures`,
        # which Transformers iterates: a fresh config gets the classifier, the first of the two.
        if self.architectures is None:
            self.architectures = []

    def _validate(self) -> None:
        if not self.monarch_mixer_sequence_mixing:
            raise ValueError(
                "`monarch_mixer_sequence_mixing=False` selects the attention baseline of the official code base; "
                "use transformers' BertConfig/BertModel for attention, or set it to True."
            )
        if self.long_conv_l_max != self.max_position_embeddings:
            raise ValueError(
                f"`long_conv_l_max` ({self.long_conv_l_max}) must equal `max_position_embeddings` "
                f"({self.max_position_embeddings}): the filters and the position table cover the same lengths."
            )
        check_mixer_fields(self)
