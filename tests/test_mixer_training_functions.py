"""The sequence mixer's hand-written training functions (the long convolution and the short filter) against the
composed ops they replace: values, gradients, double backward, and where they must stay out."""

import pytest
import torch

import m2_hf.m2_mixer as mixer_module
from m2_hf import M2BertConfig, M2GPTConfig
from m2_hf.m2_mixer import (
    M2SequenceMixer,
    _CausalDepthwiseConvolution,
    _LongConvolution,
    fft_conv,
    kernel_spectrum,
    padded_kernel,
)


def mixer_config(causal: bool, **overrides):
    values = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, max_position_embeddings=24,
                  hyena_filter_order=8)
    values.update(overrides)
    return M2GPTConfig(**values) if causal else M2BertConfig(**values)


def outputs_and_gradients(mixer, u, mask, upstream):
    y = mixer(u, mask)
    return (y, *torch.autograd.grad(y, (u, *mixer.parameters()), upstream))


def count_calls(monkeypatch, function) -> list:
    calls = []
    apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *args: calls.append(1) or apply(*args))
    return calls


@pytest.mark.parametrize("causal", [True, False])  # M2-GPT's mixer and M2-BERT's bidirectional one
@pytest.mark.parametrize("residual", [False, True])
def test_mixer_training_functions_equal_the_composed_ops(monkeypatch, causal, residual):
    torch.manual_seed(0)
    mixer = M2SequenceMixer(mixer_config(causal, residual_long_conv=residual)).double().train()
    u = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 11, dtype=torch.float64)
    mask[1, :4] = 0  # left padding: the functions see zeroed positions
    upstream = torch.randn(3, 11, 16, dtype=torch.float64)
    long_calls = count_calls(monkeypatch, _LongConvolution)
    short_calls = count_calls(monkeypatch, _CausalDepthwiseConvolution)
    fused = outputs_and_gradients(mixer, u, mask, upstream)
    assert (len(long_calls), len(short_calls)) == (2 if residual else 1, 1)
    monkeypatch.setattr(mixer_module, "hand_written_backward_applies", lambda tensors: False)
    monkeypatch.setattr(mixer_module, "eager_autograd", lambda tensors: False)
    composed = outputs_and_gradients(mixer, u, mask, upstream)
    assert (len(long_calls), len(short_calls)) == (2 if residual else 1, 1)
    for got, want in zip(fused, composed):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch", [(), (1,), (2, 3)])
def test_long_convolution_function_equals_fft_conv_with_first_and_second_derivatives(bidirectional, batch):
    torch.manual_seed(0)
    channels, length = 3, 9
    x = torch.randn(*batch, channels, length, dtype=torch.float64, requires_grad=True)
    k_forward = torch.randn(channels, length, dtype=torch.float64, requires_grad=True)
    k_reverse = torch.randn(channels, length, dtype=torch.float64, requires_grad=True) if bidirectional else None
    d = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    inputs = (x, k_forward, d) + ((k_reverse,) if bidirectional else ())

    def convolve(x, k_forward, d, k_reverse=None):
        return _LongConvolution.apply(x, padded_kernel(k_forward, k_reverse), d)

    def composed(x, k_forward, d, k_reverse=None):
        return fft_conv(x, kernel_spectrum(k_forward, k_reverse), d, channel_dim=x.dim() - 2)

    upstream = torch.randn(*batch, channels, length, dtype=torch.float64)
    for got, want in zip(
        torch.autograd.grad(y := convolve(*inputs), inputs, upstream),
        torch.autograd.grad(composed(*inputs), inputs, upstream),
    ):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(y, composed(*inputs))
    assert torch.autograd.gradcheck(convolve, inputs)
    assert torch.autograd.gradgradcheck(convolve, inputs)


def test_long_convolution_function_backward_can_run_twice():
    # The backward reads spectra saved by the forward: a second backward (retain_graph) must find them unchanged.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, requires_grad=True)
    kernel = torch.randn(3, 16, requires_grad=True)
    d = torch.randn(3, requires_grad=True)
    y = _LongConvolution.apply(x, kernel, d)
    upstream = torch.randn_like(y)
    first = torch.autograd.grad(y, (x, kernel, d), upstream, retain_graph=True)
    second = torch.autograd.grad(y, (x, kernel, d), upstream)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("length", [1, 2, 9])  # shorter than, equal to and longer than the filter's 3 taps
@pytest.mark.parametrize("batch", [(), (1,), (3,)])
def test_short_filter_function_equals_conv1d_with_first_and_second_derivatives(length, batch):
    torch.manual_seed(0)
    channels = 4
    conv = torch.nn.Conv1d(channels, channels, 3, groups=channels, padding=2).double()
    x = torch.randn(*batch, channels, length, dtype=torch.float64, requires_grad=True)
    inputs = (x, conv.weight, conv.bias)
    upstream = torch.randn(*batch, channels, length, dtype=torch.float64)
    y = _CausalDepthwiseConvolution.apply(*inputs)
    want = conv(x)[..., :length]
    torch.testing.assert_close(y, want)
    for got, expected in zip(torch.autograd.grad(y, inputs, upstream), torch.autograd.grad(want, inputs, upstream)):
        torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(_CausalDepthwiseConvolution.apply, inputs)
    assert torch.autograd.gradgradcheck(_CausalDepthwiseConvolution.apply, inputs)


def test_mixer_training_functions_stay_out_of_hooks_autocast_no_grad_and_forward_ad(monkeypatch):
    long_calls = count_calls(monkeypatch, _LongConvolution)
    short_calls = count_calls(monkeypatch, _CausalDepthwiseConvolution)
    torch.manual_seed(0)
    mixer = M2SequenceMixer(mixer_config(causal=True)).train()
    u = torch.randn(2, 10, 16, requires_grad=True)
    seen = []
    handle = mixer.short_filter.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    filter_seen = []
    mixer.filter_fn.register_forward_hook(lambda module, args, output: filter_seen.append(args))
    mixer(u).sum().backward()
    assert seen == [(2, 48, 12)] and not short_calls  # the short filter ran as a module
    assert filter_seen == [(10,)] and len(long_calls) == 1  # the filter's hooks fire on the training path too
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixer(u).sum().backward()
    assert (len(long_calls), len(short_calls)) == (1, 1)  # the short filter takes autocast's casts; the FFTs do not
    with torch.no_grad():
        mixer(u)
    tangent = torch.func.jvp(lambda v: mixer(v), (u.detach(),), (torch.ones_like(u),))[1]  # forward-mode AD
    assert torch.isfinite(tangent).all()
    assert (len(long_calls), len(short_calls)) == (1, 1)
    mixer(u).sum().backward()
    assert (len(long_calls), len(short_calls)) == (2, 2)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_short_filter_skips_the_depthwise_kernel_and_keeps_autocasts_dtypes(monkeypatch, grad, autocast):
    """Outside graph capture the short filter never runs PyTorch's depthwise kernel (17% of M2-BERT's bfloat16
    forward on an H200), in inference or training, and gives what the module gives under autocast: its dtype and,
    within bfloat16 rounding, its values and gradients."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 3, groups=6, padding=2)
    z = torch.randn(2, 6, 9, requires_grad=grad)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        want = conv(z)[..., :9]
        kernel = conv._conv_forward
        monkeypatch.setattr(conv, "_conv_forward", lambda *args: pytest.fail("the depthwise kernel ran"))
        with torch.set_grad_enabled(grad):
            got = mixer_module.causal_short_conv(conv, z)
    assert got.dtype == want.dtype == (autocast or torch.float32)
    tolerance = 2e-2 if autocast else 1e-6
    torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance)
    if grad:
        upstream = torch.randn(2, 6, 9)
        got_grads = torch.autograd.grad(got, (z, conv.weight, conv.bias), upstream.to(got.dtype))
        monkeypatch.setattr(conv, "_conv_forward", kernel)
        want_grads = torch.autograd.grad(want, (z, conv.weight, conv.bias), upstream.to(want.dtype))
        for g, w in zip(got_grads, want_grads):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w, rtol=tolerance * 2, atol=tolerance * 2)
