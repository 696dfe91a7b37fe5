"""The causal-LM loss fused with the output layer (`m2_hf.lm_loss`) and its use by M2-GPT in training."""

import math

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from m2_hf import M2GPTConfig, M2GPTForCausalLM, lm_loss
from m2_hf.lm_loss import fused_linear_cross_entropy

VOCAB, HIDDEN = 37, 12


def inputs(batch=3, length=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, HIDDEN, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, requires_grad=True)
    labels = torch.randint(0, VOCAB, (batch, length), generator=generator)
    labels[0, :4] = -100
    labels[2, -2:] = -100
    return hidden, weight, labels


def loss_and_grads(loss_fn, hidden, weight):
    hidden.grad = weight.grad = None
    loss = loss_fn()
    loss.backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])
@pytest.mark.parametrize(
    "loss_kwargs", [{}, {"num_items_in_batch": 11}, {"num_items_in_batch": torch.tensor(40)}, {"ignore_index": 3}]
)
def test_equals_transformers_causal_lm_loss(monkeypatch, chunk_rows, loss_kwargs):
    monkeypatch.setattr(lm_loss, "_LOGITS_CHUNK_BYTES", 4 * VOCAB * chunk_rows)
    hidden, weight, labels = inputs()
    labels = labels.masked_fill(labels == -100, loss_kwargs.get("ignore_index", -100))
    expected = loss_and_grads(
        lambda: ForCausalLMLoss(hidden @ weight.t(), labels, VOCAB, **loss_kwargs), hidden, weight
    )
    fused = loss_and_grads(lambda: fused_linear_cross_entropy(hidden, weight, labels, **loss_kwargs), hidden, weight)
    for want, got in zip(expected, fused):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_large_logits_do_not_overflow():
    hidden, weight, labels = inputs()
    hidden = (hidden.detach() * 60).requires_grad_()  # logits in the hundreds: exp() of them is inf in float32
    expected = loss_and_grads(lambda: ForCausalLMLoss(hidden @ weight.t(), labels, VOCAB), hidden, weight)
    fused = loss_and_grads(lambda: fused_linear_cross_entropy(hidden, weight, labels), hidden, weight)
    assert torch.isfinite(fused[0])
    for want, got in zip(expected, fused):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows, budget_rows, expected", [(4096, 1335, 1024), (10, 3, 3), (7, 100, 7), (5, 0, 1)])
def test_chunks_are_of_equal_size_within_the_budget(monkeypatch, rows, budget_rows, expected):
    monkeypatch.setattr(lm_loss, "_LOGITS_CHUNK_BYTES", 4 * VOCAB * budget_rows)
    assert lm_loss._rows_per_chunk(rows, VOCAB) == expected


def test_shift_labels_and_scaled_upstream_gradient():
    hidden, weight, labels = inputs()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    expected = loss_and_grads(lambda: 3 * ForCausalLMLoss(hidden @ weight.t(), None, VOCAB, shift_labels=shifted),
                              hidden, weight)
    fused = loss_and_grads(lambda: 3 * fused_linear_cross_entropy(hidden, weight, shift_labels=shifted), hidden, weight)
    for want, got in zip(expected, fused):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_no_targets_gives_nan_like_the_mean_cross_entropy_and_frozen_weights_get_no_gradient():
    hidden, weight, labels = inputs()
    assert math.isnan(fused_linear_cross_entropy(hidden, weight, torch.full_like(labels, -100)).item())
    frozen = weight.detach()
    fused_linear_cross_entropy(hidden, frozen, labels).backward()
    assert hidden.grad is not None and frozen.grad is None
    with torch.no_grad():
        value = fused_linear_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(value, ForCausalLMLoss(hidden @ weight.t(), labels, VOCAB).detach())


def test_mismatched_labels_are_refused_with_the_shapes():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match=r"\(3, 8\).*\(3, 9\)"):
        fused_linear_cross_entropy(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(hidden, weight)


def tiny_lm(**overrides):
    torch.manual_seed(0)
    config = M2GPTConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         max_position_embeddings=48, hyena_filter_order=16, bos_token_id=0, eos_token_id=0,
                         **overrides)
    return M2GPTForCausalLM(config).train()


def model_loss_and_grads(model, ids, labels, fused, **kwargs):
    model.config.fused_training_loss = fused
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_kwargs", [{}, {"num_items_in_batch": torch.tensor(57)}])
def test_m2_gpt_training_loss_is_fused_and_exact(loss_kwargs):
    model = tiny_lm()
    ids = torch.randint(1, 101, (3, 30), generator=torch.Generator().manual_seed(1))
    labels = ids.masked_fill(torch.arange(30) < 4, -100)
    plain, plain_grads = model_loss_and_grads(model, ids, labels, False, **loss_kwargs)
    fused, fused_grads = model_loss_and_grads(model, ids, labels, True, **loss_kwargs)
    assert plain.logits is not None and fused.logits is None
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == fused_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # Tied weights: the output layer's gradient lands on the shared embedding matrix.
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bf16_autocast_is_as_accurate_as_the_unfused_loss():
    hidden, weight, labels = inputs(batch=4, length=64)
    reference = loss_and_grads(lambda: ForCausalLMLoss(hidden @ weight.t(), labels, VOCAB), hidden, weight)
    errors = {}
    for name, loss_fn in {
        "unfused": lambda: ForCausalLMLoss(torch.nn.functional.linear(hidden, weight), labels, VOCAB),
        "fused": lambda: fused_linear_cross_entropy(hidden, weight, labels),
    }.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = loss_and_grads(loss_fn, hidden, weight)
        assert result[0].dtype == torch.float32 and result[1].dtype == result[2].dtype == torch.float32
        errors[name] = [((got - want).norm() / want.norm()).item() for got, want in zip(result, reference)]
    assert max(errors["unfused"]) > 0  # bf16 did round
    for fused, unfused in zip(errors["fused"], errors["unfused"]):
        assert fused <= 1.5 * unfused + 1e-4, errors


def test_m2_gpt_fused_loss_trains_under_bf16_autocast():
    model = tiny_lm()
    ids = torch.randint(1, 101, (2, 40), generator=torch.Generator().manual_seed(2))
    reference, reference_grads = model_loss_and_grads(model, ids, ids, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, grads = model_loss_and_grads(model, ids, ids, True)
    assert fused.logits is None and fused.loss.dtype == torch.float32
    torch.testing.assert_close(fused.loss, reference.loss, rtol=1e-2, atol=0)
    flat = torch.cat([grads[name].flatten() for name in reference_grads])
    flat_reference = torch.cat([reference_grads[name].flatten() for name in reference_grads])
    assert ((flat - flat_reference).norm() / flat_reference.norm()).item() < 0.05


def test_m2_gpt_returns_logits_in_evaluation_and_when_fusion_is_off():
    model = tiny_lm()
    ids = torch.randint(1, 101, (2, 10))
    assert model.eval()(ids, labels=ids).logits.shape == (2, 10, 101)
    assert model.train()(ids, labels=ids[:, -3:], logits_to_keep=3).logits.shape == (2, 3, 101)
    assert tiny_lm(fused_training_loss=False)(ids, labels=ids).logits.shape == (2, 10, 101)
