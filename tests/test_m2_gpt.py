"""M2-GPT: strict causality, incremental decoding, generation, Transformers integration."""

import json

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Tokenizer,
    pipeline,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from m2_hf import (
    BlockdiagLinear,
    M2GPTCache,
    M2GPTConfig,
    M2GPTForCausalLM,
    M2GPTForSequenceClassification,
    M2GPTModel,
    MonarchLinear,
)
from m2_hf.configuration_m2_gpt import PRESETS
from remote_code import run_without_m2_hf

HEADS = {
    AutoModel: M2GPTModel,
    AutoModelForCausalLM: M2GPTForCausalLM,
    AutoModelForSequenceClassification: M2GPTForSequenceClassification,
}
VOCAB = 101


def tiny_config(**overrides) -> M2GPTConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=48,
        hyena_filter_order=16,
        bos_token_id=0,
        eos_token_id=0,
        num_labels=3,
    )
    values.update(overrides)
    return M2GPTConfig(**values)


def tiny_model(cls=M2GPTForCausalLM, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(**overrides)).eval()


def random_ids(batch, length, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def incremental_logits(model, ids, prompt_length, chunk=1, mask=None):
    """Logits of ``ids`` computed as a prompt of ``prompt_length`` tokens, then ``chunk`` tokens at a time."""
    with torch.no_grad():
        out = model(ids[:, :prompt_length], attention_mask=None if mask is None else mask[:, :prompt_length],
                    use_cache=True)
        logits, cache = [out.logits], out.cache
        for start in range(prompt_length, ids.shape[1], chunk):
            stop = min(start + chunk, ids.shape[1])
            out = model(ids[:, start:stop], cache=cache, use_cache=True,
                        attention_mask=None if mask is None else mask[:, :stop])
            logits.append(out.logits)
            cache = out.cache
    return torch.cat(logits, dim=1), cache


# --------------------------------------------------------------------------------------------------------------------
# Causality
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("residual_long_conv", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_future_tokens_do_not_change_the_past(residual_long_conv, autocast):
    model = tiny_model(residual_long_conv=residual_long_conv)
    length = model.config.max_position_embeddings  # the full filter length, where wrap-around would show
    ids = random_ids(2, length)
    for cut in (1, 17, length - 1):
        changed = ids.clone()
        changed[:, cut:] = random_ids(2, length - cut, seed=cut + 7)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            before = model(ids, use_cache=False).logits.float()
            after = model(changed, use_cache=False).logits.float()
        # The FFT mixes every position numerically, so the past may move by rounding (one bfloat16 step of a logit
        # under autocast), never by a real dependence, which moves logits by their own size.
        past_change = (before[:, :cut] - after[:, :cut]).abs().max()
        future_change = (before[:, cut:] - after[:, cut:]).abs().max()
        assert past_change <= (1e-2 if autocast else 1e-6) * before.abs().max()
        assert future_change > 0.1 * before.abs().max()
    assert torch.isfinite(before).all()


def test_jacobian_is_block_lower_triangular():
    model = tiny_model(residual_long_conv=True).double()
    embeds = torch.randn(1, 12, 32, dtype=torch.float64)

    def hidden(x):
        return model.model(inputs_embeds=x, use_cache=False).last_hidden_state

    jacobian = torch.autograd.functional.jacobian(hidden, embeds)[0, :, :, 0]  # [t, out, s, in]
    influence = jacobian.abs().sum(dim=(1, 3))  # [t, s]
    future = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1)
    assert influence[future].max() < 1e-12 * influence.max()  # float64 rounding of the FFT, nothing more
    assert influence[~future].min() > 1e-6 * influence.max()  # every past token reaches every later one


def test_too_long_inputs_name_the_limit():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(random_ids(1, 49), use_cache=False)
    out = model(random_ids(1, 48), use_cache=True)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(random_ids(1, 1), cache=out.cache)


# --------------------------------------------------------------------------------------------------------------------
# Incremental decoding
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"residual_long_conv": True}, {"monarch_mlp_type": "blockdiag"},
                                       {"use_monarch_mlp": False, "use_glu_mlp": False},
                                       {"hyena_training_additions": True}])
@pytest.mark.parametrize("prompt_length,chunk", [(1, 1), (13, 1), (13, 5)])
def test_incremental_decoding_equals_the_full_forward(overrides, prompt_length, chunk):
    model = tiny_model(**overrides)
    ids = random_ids(3, 40)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    incremental, cache = incremental_logits(model, ids, prompt_length, chunk)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-4)
    assert isinstance(cache, M2GPTCache) and cache.get_seq_length() == 40


def test_long_one_token_decoding_equals_the_full_forward_and_rarely_reads_the_whole_history(monkeypatch):
    """300 one-token steps: every tile size up to 256 and several windows of future outputs. The whole history is
    convolved (an FFT over it) only when a window runs out, and each filter's kernel is computed a few times."""
    import m2_hf.m2_mixer as mixer

    model = tiny_model(max_position_embeddings=320, residual_long_conv=True)
    ids = random_ids(2, 303)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    windows, kernels = [], []
    window_class, forward = mixer._FutureOutputs, mixer.HyenaFilter.forward

    class CountedWindow(window_class):
        def __init__(self, dependencies, start, outputs):
            windows.append((start, outputs.shape[1]))
            super().__init__(dependencies, start, outputs)

    def counted_forward(module, length):
        kernels.append(length)
        return forward(module, length)

    monkeypatch.setattr(mixer, "_FutureOutputs", CountedWindow)
    monkeypatch.setattr(mixer.HyenaFilter, "forward", counted_forward)
    incremental, _ = incremental_logits(model, ids, prompt_length=3)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-4)
    filters = 2 * model.config.num_hidden_layers  # the residual long convolution doubles them
    # Each window is computed from the whole history (one FFT) and is as long as that history (at least 64 outputs,
    # at most up to the filters' length).
    assert sorted(set(windows)) == [(3, 64), (67, 67), (134, 134), (268, 52)] and len(windows) == 4 * filters
    assert sorted(kernels) == [134] * filters + [320] * filters  # twice what a window needs, up to the maximum


def test_one_token_steps_do_not_run_the_prompt_path(monkeypatch):
    """After the prompt, single tokens must not run an FFT convolution of the whole sequence (`fft_conv`)."""
    import m2_hf.m2_mixer as mixer

    model = tiny_model()
    ids = random_ids(1, 20)
    with torch.no_grad():
        out = model(ids[:, :10], use_cache=True)
        calls = []
        monkeypatch.setattr(mixer, "fft_conv", lambda *a, **k: calls.append(1))
        for t in range(10, 20):
            out = model(ids[:, t : t + 1], cache=out.cache)
    assert calls == []


def test_decoding_follows_in_place_changes_of_the_filter():
    model = tiny_model()
    ids = random_ids(1, 20)
    with torch.no_grad():
        out = model(ids[:, :10], use_cache=True)
        out = model(ids[:, 10:11], cache=out.cache)  # the kernels and future outputs are now kept in the cache
        for module in model.modules():
            if hasattr(module, "modulation"):
                module.modulation.deltas.mul_(3.0)
        stepped = model(ids[:, 11:12], cache=out.cache).logits
        expected = model(ids[:, :12], use_cache=False).logits[:, -1:]
    torch.testing.assert_close(stepped, expected, rtol=1e-4, atol=1e-4)


def test_crop_then_as_many_tokens_at_once_does_not_reuse_the_dropped_tokens_contributions():
    """One-token steps, a crop of 3, then 3 other tokens in one call: decoding is back at the position its windows of
    future outputs expect, but those hold the dropped tokens' contributions."""
    model = tiny_model()
    ids, other = random_ids(2, 24), random_ids(2, 3, seed=9)
    expected_ids = torch.cat([ids[:, :12], other, ids[:, 15:]], dim=1)
    with torch.no_grad():
        full = model(expected_ids, use_cache=False).logits
        cache = model(ids[:, :8], use_cache=True).cache
        for t in range(8, 15):
            model(ids[:, t : t + 1], cache=cache)
        cache.crop(-3)
        model(other, cache=cache)
        continued = [model(ids[:, t : t + 1], cache=cache).logits for t in range(15, 24)]
    torch.testing.assert_close(torch.cat(continued, dim=1), full[:, 15:], rtol=1e-4, atol=1e-4)


def test_crop_rolls_decoding_back_exactly():
    model = tiny_model(residual_long_conv=True)
    ids = random_ids(2, 30)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :12], use_cache=True)
        cache = out.cache
        model(random_ids(2, 7, seed=5), cache=cache)  # a rejected draft: 7 wrong tokens
        cache.crop(-7)
        assert cache.get_seq_length() == 12
        for layer in cache.layers:  # a round trip through the CPU (a no-op move here) keeps the state usable
            layer.offload()
            layer.prefetch()
        continued = [model(ids[:, t : t + 1], cache=cache).logits for t in range(12, 30)]
    torch.testing.assert_close(torch.cat(continued, dim=1), full[:, 12:], rtol=1e-4, atol=1e-4)


def test_convolution_state_keeps_the_rollback_window_and_refuses_more():
    from m2_hf.m2_mixer import ROLLBACK_LIMIT, SHORT_FILTER_TAPS, ConvolutionState

    state = ConvolutionState()
    total = 3 * (ROLLBACK_LIMIT + SHORT_FILTER_TAPS)  # long enough for the projection buffer to wrap around
    for t in range(total):
        state.append(torch.full((3, 1, 1), float(t)), torch.full((2, 1, 1), float(t)))
    state.crop(ROLLBACK_LIMIT)
    kept = total - ROLLBACK_LIMIT
    assert state.length == kept
    assert state.short_conv_inputs(torch.empty(3, 1, 1))[0, 0].tolist() == [kept - 2.0, kept - 1.0]
    assert state.long_conv_inputs()[0, -1, 0].item() == kept - 1
    with pytest.raises(ValueError, match="roll back at most"):
        state.crop(state.length - 1)  # far more than the window: the projections it needs are gone


def test_assisted_generation_equals_plain_greedy():
    model = tiny_model()
    assistant = tiny_model(seed=4, num_hidden_layers=1)
    prompt = random_ids(1, 6)
    plain = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assisted = model.generate(prompt, max_new_tokens=12, do_sample=False, assistant_model=assistant)
    assert torch.equal(assisted, plain)


def test_left_padding_does_not_change_real_tokens():
    model = tiny_model(residual_long_conv=True)
    ids = random_ids(1, 15)
    padded = torch.cat([torch.full((1, 6), 5), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 15, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
        left = model(padded, attention_mask=mask, use_cache=False).logits[:, 6:]
    torch.testing.assert_close(left, plain, rtol=1e-5, atol=1e-5)
    incremental, _ = incremental_logits(model, padded, 9, 1, mask)
    torch.testing.assert_close(incremental[:, 6:], plain, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# generate()
# --------------------------------------------------------------------------------------------------------------------


def greedy_by_full_recompute(model, ids, new_tokens):
    with torch.no_grad():
        for _ in range(new_tokens):
            next_token = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    return ids


def test_greedy_generation_equals_a_full_recompute_loop():
    model = tiny_model()
    prompt = random_ids(2, 7)
    mask = torch.ones_like(prompt)
    cached = model.generate(prompt, attention_mask=mask, max_new_tokens=15, do_sample=False)
    uncached = model.generate(prompt, attention_mask=mask, max_new_tokens=15, do_sample=False, use_cache=False)
    expected = greedy_by_full_recompute(model, prompt, 15)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)
    assert torch.equal(model.generate(prompt, attention_mask=mask, max_new_tokens=15, do_sample=False), cached)


def test_sampling_is_reproducible_and_beam_search_matches_without_cache():
    model = tiny_model()
    prompt = random_ids(1, 5)
    samples = []
    for _ in range(2):
        torch.manual_seed(3)
        samples.append(model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20))
    assert torch.equal(samples[0], samples[1]) and samples[0].shape == (1, 15)
    beams = model.generate(prompt, max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False)
    beams_uncached = model.generate(prompt, max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False,
                                    use_cache=False)
    assert beams.shape == (2, 15)
    assert torch.equal(beams, beams_uncached)


def test_batched_left_padded_generation_equals_unbatched():
    model = tiny_model(pad_token_id=VOCAB - 1)
    prompts = [random_ids(1, 9, seed=11)[0], random_ids(1, 4, seed=12)[0]]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((width - len(p),), VOCAB - 1), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), torch.ones(len(p), dtype=torch.long)])
                        for p in prompts])
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=12, do_sample=False)
        assert torch.equal(batched[row, width:], alone[0, len(prompt):])


# --------------------------------------------------------------------------------------------------------------------
# Transformers integration
# --------------------------------------------------------------------------------------------------------------------


def test_config_presets_defaults_and_validation():
    config = M2GPTConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (768, 12, 50257)
    assert config.monarch_mlp_type == "monarch" and config.monarch_mlp_nblocks == 4 and config.tie_word_embeddings
    assert M2GPTConfig.from_preset("360m").hidden_size == PRESETS["360m"]["hidden_size"]
    with pytest.raises(ValueError, match="preset"):
        M2GPTConfig.from_preset("1b")
    with pytest.raises(ValueError, match="monarch_mlp_type"):
        M2GPTConfig(monarch_mlp_type="lowrank")


@pytest.mark.parametrize("preset,millions", [("125m", 93.6), ("360m", 364.9)])
def test_preset_parameter_counts_are_the_documented_ones(preset, millions):
    with torch.device("meta"):
        model = M2GPTForCausalLM(M2GPTConfig.from_preset(preset))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def test_default_mlp_is_monarch_and_options_switch_it():
    assert isinstance(tiny_model().model.layers[0].mlp.gated_layers, MonarchLinear)
    assert isinstance(tiny_model(monarch_mlp_type="blockdiag").model.layers[0].mlp.wo, BlockdiagLinear)
    assert isinstance(tiny_model(use_monarch_mlp=False).model.layers[0].mlp.wo, torch.nn.Linear)


@pytest.mark.parametrize("auto_class,model_class", list(HEADS.items()))
def test_auto_classes(auto_class, model_class):
    values = {k: v for k, v in tiny_config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("m2_gpt", **values)
    assert type(config) is M2GPTConfig
    assert type(auto_class.from_config(config)) is model_class


def test_hidden_states_and_tuple_outputs():
    model = tiny_model()
    ids = random_ids(2, 10)
    with torch.no_grad():
        outputs = model(ids, output_hidden_states=True, use_cache=False)
        as_tuple = model(ids, return_dict=False, use_cache=False)
    assert len(outputs.hidden_states) == 3
    torch.testing.assert_close(as_tuple[0], outputs.logits)


def test_save_and_load_round_trip_keeps_weights_tied(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", *(auto.__name__ for auto in HEADS)}
    assert {"modeling_m2_gpt.py", "configuration_m2_gpt.py", "m2_mixer.py", "monarch.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert (tmp_path / "generation_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = random_ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_trust_remote_code_without_the_package(tmp_path):
    model = tiny_model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    prompt = random_ids(1, 6)
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
    torch.save({"prompt": prompt, "expected": expected}, tmp_path / "expected.pt")
    run_without_m2_hf(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
        data = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        generated = model.generate(data["prompt"], max_new_tokens=8, do_sample=False)
        assert torch.equal(generated, data["expected"]), (generated, data["expected"])
        AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)(data["prompt"])
        AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)(data["prompt"])
        """,
        tmp_path,
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(residual_long_conv=True)
    model.train()
    ids = random_ids(2, 16)

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_sequence_classification_reads_the_last_real_token():
    model = tiny_model(M2GPTForSequenceClassification, pad_token_id=VOCAB - 1)
    ids = random_ids(1, 8)
    padded = torch.cat([ids, torch.full((1, 3), VOCAB - 1)], dim=1)
    with torch.no_grad():
        plain = model(ids).logits
        by_pad_id = model(padded).logits
        by_mask = model(padded, attention_mask=(padded != VOCAB - 1).long()).logits
    torch.testing.assert_close(by_pad_id, plain)
    torch.testing.assert_close(by_mask, plain)
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.cat([padded, padded]))


def byte_level_tokenizer() -> GPT2Tokenizer:
    """A GPT-2 tokenizer over single bytes (no merges): GPT-2's files are not available offline."""
    vocab = {character: index for index, character in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    return GPT2Tokenizer(vocab=vocab, merges=[])


def test_tokenizer_mapping_and_text_generation_pipeline(tmp_path):
    tokenizer = byte_level_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer), bos_token_id=256, eos_token_id=256)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, GPT2Tokenizer) and loaded("mixer").input_ids == tokenizer("mixer").input_ids
    generator = pipeline("text-generation", model=str(tmp_path), tokenizer=loaded)
    assert generator("Monarch", max_new_tokens=6, do_sample=False)[0]["generated_text"].startswith("Monarch")
    generated = generator("Monarch", max_new_tokens=6, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    prompt = torch.tensor([loaded("Monarch").input_ids])
    assert list(generated) == model.generate(prompt, max_new_tokens=6, do_sample=False)[0].tolist()


@pytest.mark.parametrize("cls", [M2GPTForCausalLM, M2GPTForSequenceClassification])
def test_trainer_lowers_the_loss(cls, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = tiny_model(cls, residual_long_conv=True)
    ids = random_ids(16, 24)
    labels = ids.tolist() if cls is M2GPTForCausalLM else (ids[:, -1] % 3).tolist()
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                 "labels": labels})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=12, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12
    assert losses[-1] < 0.8 * losses[0]


def glu_outputs_and_gradients(mlp, x, upstream):
    y = mlp(x)
    return (y, *torch.autograd.grad(y, (x, *mlp.parameters()), upstream))


@pytest.mark.parametrize("post_norm", [False, True])  # M2-GPT's and M2-BERT's MLP
def test_glu_training_function_equals_the_composed_ops(monkeypatch, post_norm):
    import m2_hf.m2_mixer as mixer_module

    torch.manual_seed(0)
    mlp = mixer_module.M2GatedMLP(tiny_config(), post_norm=post_norm).train()
    x = torch.randn(2, 7, 32, requires_grad=True)
    upstream = torch.randn(2, 7, 32)
    applied = []
    product = mixer_module._GeluGatedProduct.apply
    monkeypatch.setattr(mixer_module._GeluGatedProduct, "apply", lambda h: applied.append(1) or product(h))
    fused = glu_outputs_and_gradients(mlp, x, upstream)
    assert len(applied) == 1
    monkeypatch.setattr(mixer_module, "hand_written_backward_applies", lambda tensors: False)
    composed = glu_outputs_and_gradients(mlp, x, upstream)
    assert len(applied) == 1
    for got, want in zip(fused, composed):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_glu_training_function_has_first_and_second_derivatives():
    from m2_hf.m2_mixer import _GeluGatedProduct

    hidden = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_GeluGatedProduct.apply, (hidden,))
    assert torch.autograd.gradgradcheck(_GeluGatedProduct.apply, (hidden,))
    upstream = torch.randn(3, 5, 4, dtype=torch.float64)
    # The backward that builds a graph (double backward) is other code than the one that does not: same gradient.
    plain = torch.autograd.grad(_GeluGatedProduct.apply(hidden), hidden, upstream)[0]
    graphed = torch.autograd.grad(_GeluGatedProduct.apply(hidden), hidden, upstream, create_graph=True)[0]
    assert graphed.requires_grad
    torch.testing.assert_close(graphed, plain)


def test_glu_training_function_stays_out_of_hooks_other_activations_and_autocast(monkeypatch):
    import m2_hf.m2_mixer as mixer_module

    applied = []
    product = mixer_module._GeluGatedProduct.apply
    monkeypatch.setattr(mixer_module._GeluGatedProduct, "apply", lambda h: applied.append(1) or product(h))
    torch.manual_seed(0)
    x = torch.randn(2, 7, 32, requires_grad=True)
    mlp = mixer_module.M2GatedMLP(tiny_config(), post_norm=False).train()
    seen = []
    handle = mlp.act.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    mlp(x).sum().backward()
    assert seen == [(2, 7, 64)] and not applied
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mlp(x).sum().backward()
    with torch.no_grad():
        mlp(x)
    assert not applied
    tangent = torch.func.jvp(lambda v: mlp(v), (x.detach(),), (torch.ones_like(x),))[1]  # forward-mode AD
    assert torch.isfinite(tangent).all() and not applied
    relu = mixer_module.M2GatedMLP(tiny_config(hidden_act="relu"), post_norm=False).train()
    relu(x).sum().backward()
    assert not applied
    mlp(x).sum().backward()
    assert applied == [1]
