"""The models' cache of filter spectra (`m2_hf/filter_cache.py`): what invalidates an entry, the byte budget, who owns
the cache, and that training never reads it.

Cached and uncached inference compute a spectrum with the same function, so their outputs are compared for equality:
any difference means a stale or foreign spectrum was used."""

import copy
import pickle
from itertools import chain

import pytest
import torch

from m2_hf import M2BertConfig, M2BertForMaskedLM, M2BertModel, M2GPTConfig, M2GPTForCausalLM, M2ViTConfig
from m2_hf import M2ViTForImageClassification
from m2_hf import m2_mixer
from m2_hf import FilterCache
from m2_hf.m2_mixer import HyenaFilter, kernel_spectrum

LENGTH = 16
HIDDEN = 32


def tiny_bert(cls=M2BertModel, **overrides):
    values = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64,
                  hyena_filter_order=16, hidden_dropout_prob=0.0)
    values.update(overrides)
    torch.manual_seed(0)
    return cls(M2BertConfig(**values)).eval()


def filters_of(model) -> list[HyenaFilter]:
    return [module for module in model.modules() if isinstance(module, HyenaFilter)]


def spectrum_bytes(length: int = LENGTH) -> int:
    return HIDDEN * (length + 1) * torch.complex64.itemsize


def ids(length: int = LENGTH) -> torch.Tensor:
    return torch.randint(5, 30000, (2, length), generator=torch.Generator().manual_seed(1))


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs).last_hidden_state


def uncached(model, inputs) -> torch.Tensor:
    """The output with every spectrum computed afresh."""
    budget = model.filter_cache.max_bytes
    model.filter_cache.max_bytes = 0
    try:
        return run(model, inputs)
    finally:
        model.filter_cache.max_bytes = budget


def filter_tensors(hyena: HyenaFilter) -> dict[str, torch.Tensor]:
    return dict(chain(hyena.named_parameters(), hyena.named_buffers()))


FILTER_TENSORS = list(filter_tensors(filters_of(tiny_bert())[0]))


def test_every_filter_tensor_is_covered():
    # The parametrised tests below must see the buffers that a spectrum depends on, not only parameters.
    assert {"pos_emb.t", "modulation.deltas", "pos_emb.z", "implicit_filter.1.freq"} <= set(FILTER_TENSORS)


# --------------------------------------------------------------------------------------------------------------------
# What invalidates an entry
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILTER_TENSORS)
def test_in_place_change_of_any_filter_tensor_is_seen(name):
    model, inputs = tiny_bert(), ids()
    before = run(model, inputs)
    assert len(model.filter_cache) == 4  # the spectra of both filters of both layers are cached
    with torch.no_grad():  # no grad-enabled call in between, which would drop the entries as a side effect
        filter_tensors(filters_of(model)[0])[name].mul_(1.5).add_(0.25)
    after = run(model, inputs)
    expected = uncached(model, inputs)
    assert not torch.equal(expected, before)  # the change matters
    assert torch.equal(after, expected)


@pytest.mark.parametrize("name", ["modulation.deltas", "pos_emb.t", "implicit_filter.6.weight"])
def test_replaced_filter_tensor_is_seen(name):
    """A tensor replaced by another with the same in-place version count must be told apart by its identity."""
    model, inputs = tiny_bert(), ids()
    run(model, inputs)
    module_name, _, attribute = name.rpartition(".")
    module = filters_of(model)[0].get_submodule(module_name)
    old = getattr(module, attribute)
    replacement = old.detach() * 1.5 + 0.25
    if isinstance(old, torch.nn.Parameter):
        replacement = torch.nn.Parameter(replacement)
    with torch.no_grad():
        while replacement._version < old._version:
            replacement.mul_(1.0)
    assert replacement._version == old._version and replacement.shape == old.shape
    setattr(module, attribute, replacement)
    after = run(model, inputs)
    assert torch.equal(after, uncached(model, inputs))


def test_lengths_are_cached_separately():
    model = tiny_bert()
    short, long = ids(LENGTH), ids(2 * LENGTH)
    outputs = [run(model, short), run(model, long), run(model, short)]
    assert len(model.filter_cache) == 8
    for output, inputs in zip(outputs, (short, long, short)):
        assert torch.equal(output, uncached(model, inputs))


def test_autocast_gets_its_own_spectra():
    """Under autocast the filter MLP runs in bfloat16: a float32 spectrum cached before must not be used."""
    model, inputs = tiny_bert(), ids()
    run(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run(model, inputs)
        expected = uncached(model, inputs)
    assert torch.equal(autocast, expected)
    assert not torch.equal(autocast.float(), run(model, inputs))


def test_dtype_change_is_seen():
    model, inputs = tiny_bert(), ids()
    run(model, inputs)
    model.double()
    assert torch.equal(run(model, inputs), uncached(model, inputs))
    assert all(entry.value.dtype == torch.complex128 for entry in model.filter_cache._entries.values())


# --------------------------------------------------------------------------------------------------------------------
# The budget
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fitting", [0, 1, 3])
def test_budget_is_never_exceeded_and_results_do_not_change(fitting):
    model, inputs = tiny_bert(), ids()
    expected = uncached(model, inputs)
    model.filter_cache.max_bytes = fitting * spectrum_bytes() + spectrum_bytes() // 2
    for _ in range(2):
        assert torch.equal(run(model, inputs), expected)
        assert len(model.filter_cache) == fitting
        assert model.filter_cache.nbytes <= model.filter_cache.max_bytes


def test_the_first_filters_stay_cached_when_not_all_fit():
    """A forward visits the filters in turn: evicting the least recently used would keep none of them."""
    model, inputs = tiny_bert(), ids()
    model.filter_cache.max_bytes = 2 * spectrum_bytes()
    run(model, inputs)
    with torch.no_grad():
        first = [f.spectrum(LENGTH) for f in filters_of(model)[:2]]
        run(model, inputs)
        assert all(f.spectrum(LENGTH) is spectrum for f, spectrum in zip(filters_of(model), first))
    assert len(model.filter_cache) == 2


def test_other_lengths_give_way_to_a_new_one():
    model = tiny_bert()
    model.filter_cache.max_bytes = 4 * spectrum_bytes(2 * LENGTH)
    run(model, ids(LENGTH))
    run(model, ids(2 * LENGTH))
    assert len(model.filter_cache) == 4
    assert {slot[2] for slot in model.filter_cache._entries} == {2 * LENGTH}


def test_lowering_the_budget_evicts():
    model = tiny_bert()
    run(model, ids())
    model.filter_cache.max_bytes = spectrum_bytes()
    assert len(model.filter_cache) == 1 and model.filter_cache.nbytes <= spectrum_bytes()


@pytest.mark.parametrize("budget", [-1, 1.5, True, "1GB"])
def test_bad_budget_is_refused(budget):
    with pytest.raises(ValueError, match="filter_cache_bytes"):
        M2BertConfig(filter_cache_bytes=budget)
    with pytest.raises(ValueError, match="filter_cache_bytes"):
        FilterCache(budget)


# --------------------------------------------------------------------------------------------------------------------
# Clearing, ownership, training
# --------------------------------------------------------------------------------------------------------------------


def test_clear():
    model, inputs = tiny_bert(M2BertForMaskedLM), ids()
    with torch.no_grad():
        before = model(inputs).logits
    assert len(model.filter_cache) == 4 and model.filter_cache.nbytes == 4 * spectrum_bytes()
    model.clear_filter_cache()
    assert len(model.filter_cache) == 0 and model.filter_cache.nbytes == 0
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, before)


@pytest.mark.parametrize(
    "build",
    [
        lambda budget: M2BertForMaskedLM(M2BertConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                                      max_position_embeddings=64, hyena_filter_order=16,
                                                      filter_cache_bytes=budget)),
        lambda budget: M2GPTForCausalLM(M2GPTConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64,
                                                    num_hidden_layers=2, max_position_embeddings=24,
                                                    hyena_filter_order=16, filter_cache_bytes=budget)),
        lambda budget: M2ViTForImageClassification(M2ViTConfig(image_size=32, patch_size=8, hidden_size=HIDDEN,
                                                               intermediate_size=64, num_hidden_layers=2,
                                                               hyena_filter_order=16, hyena_emb_dim=5,
                                                               filter_cache_bytes=budget)),
    ],
    ids=["bert", "gpt", "vit"],
)
def test_one_cache_per_model_with_the_config_budget(build):
    model = build(12345)
    cache = model.filter_cache
    assert isinstance(cache, FilterCache) and cache.max_bytes == 12345
    assert all(f.filter_cache is cache for f in filters_of(model))
    assert model.base_model.filter_cache is cache  # the backbone reports the cache its filters use
    assert build(None).filter_cache is not cache


def test_budget_round_trips_through_save_and_load(tmp_path):
    model = tiny_bert(filter_cache_bytes=4096)
    model.save_pretrained(tmp_path)
    loaded = M2BertModel.from_pretrained(tmp_path)
    assert loaded.filter_cache.max_bytes == 4096
    assert M2BertModel.from_pretrained(tmp_path, filter_cache_bytes=0).filter_cache.max_bytes == 0


def test_copies_start_with_an_empty_cache_of_their_own():
    model, inputs = tiny_bert(), ids()
    run(model, inputs)
    for duplicate in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert duplicate.filter_cache is not model.filter_cache and len(duplicate.filter_cache) == 0
        assert all(f.filter_cache is duplicate.filter_cache for f in filters_of(duplicate))
        assert torch.equal(run(duplicate, inputs), run(model, inputs))
    assert len(model.filter_cache) == 4


def test_a_model_created_in_inference_mode_computes_its_spectra_without_caching_them():
    with torch.inference_mode():
        model = tiny_bert()
        first = model(ids()).last_hidden_state
        assert model.filter_cache.nbytes == 0
        for hyena in filters_of(model):
            next(iter(filter_tensors(hyena).values())).mul_(1.5)
        changed = model(ids()).last_hidden_state
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(changed, uncached(model, ids()))


def test_training_never_reads_or_fills_the_cache():
    model, inputs = tiny_bert(), ids()
    reference = copy.deepcopy(model)
    run(model, inputs)
    with torch.no_grad():
        for f in filters_of(model):
            f.spectrum(LENGTH).zero_()  # poison the cached entries: an output that reads them changes
    model.train()
    output = model(inputs).last_hidden_state
    assert len(model.filter_cache) == 0
    torch.testing.assert_close(output, reference.train()(inputs).last_hidden_state, rtol=1e-5, atol=1e-6)
    output.square().mean().backward()
    weight = filters_of(model)[0].implicit_filter[6].weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0  # the spectra were computed with the graph


def test_cache_is_bypassed_while_compiling(monkeypatch):
    model, inputs = tiny_bert(), ids()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    run(model, inputs)
    assert len(model.filter_cache) == 0


# --------------------------------------------------------------------------------------------------------------------
# The inference computation of a spectrum
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [HIDDEN, HIDDEN + 4])  # chunks of 8 channels; the second ends with a partial one
@pytest.mark.parametrize("bidirectional", [True, False])
def test_spectrum_by_channel_chunks_equals_the_reference(monkeypatch, bidirectional, width, dtype):
    monkeypatch.setattr(m2_mixer, "_CPU_CHUNK_BYTES", 1)  # one chunk per 8 channels: several chunks
    config = M2BertConfig(hidden_size=width, max_position_embeddings=64, hyena_filter_order=16)
    torch.manual_seed(0)
    hyena = HyenaFilter(config, width, bidirectional).to(dtype)
    with torch.no_grad():
        hyena.modulation.deltas.mul_(torch.rand_like(hyena.modulation.deltas) + 0.5)  # trained-like, not a ramp
        expected = kernel_spectrum(*hyena.forward(40))
        tolerance = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(hyena._spectrum_by_channels(40), expected, **tolerance)
