"""The Monarch Mixer building blocks shared by the M2 models: implicit long-convolution filters, the FFT long
convolution, the gated sequence mixer and the GLU MLP with structured layers.

Parameter names and numerics follow HazyResearch/m2 (`bert/src/mm/`), so released checkpoints load unchanged, with one
exception: the official filter MLP shares one `Sin` module (one `freq` tensor) between its six sine slots, which
appears six times in its state dict; here it is stored once, as `implicit_filter.1.freq`.

Everything takes an optional `mask` (`[B, L]`, 1 for real tokens). Padded positions are zeroed before every
convolution, so they contribute nothing, and because the convolutions are shift-invariant the outputs at real tokens
equal those of the unpadded sequence, for left and right padding alike. Without a mask (or with an all-ones mask)
the computation is exactly the official one.

Each module's ``reference_forward`` is the official algorithm step by step, calling every submodule (so forward hooks,
PEFT wrappers and quantisers see every layer); it is what training, tracing (``torch.compile``, ``torch.export``, ONNX)
and any hooked module run. The CPU inference path (``mixer_cpu_inference``, ``mlp_cpu_inference``: chunked, in place,
in a `Workspace` of scratch tensors) computes the same, faster, and is taken only where no one can tell the difference
(`takes_inference_fast_path`). Incremental decoding (`M2SequenceMixer.step`) is a third, explicit entry point.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN, GELUActivation
from transformers.modeling_layers import GradientCheckpointingLayer

from .monarch import (
    BlockdiagLinear,
    MonarchLinear,
    _autocast_dtype,
    _tensor_state,
    autocast_input,
    blockdiag_multiply,
    eager_autograd,
    hand_written_backward_applies,
    is_traced,
    records_autograd,
)

__all__ = [
    "ConvolutionState",
    "HyenaFilter",
    "M2GatedMLP",
    "M2PreNormBlock",
    "M2SequenceMixer",
    "Workspace",
    "has_forward_hooks",
    "is_traced",
    "mixer_cpu_inference",
    "mlp_cpu_inference",
    "takes_inference_fast_path",
    "causal_depthwise_conv",
    "fft_conv",
    "fft_long_conv",
    "init_mixer_module",
    "kernel_spectrum",
    "long_conv_for_training",
    "padded_kernel",
    "structured_linear",
]


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision FFTs overflow and lose the filter's tail at long lengths: always float32 (or float64).
    return torch.float64 if dtype == torch.float64 else torch.float32


def padded_kernel(k_forward: torch.Tensor, k_reverse: Optional[torch.Tensor]) -> torch.Tensor:
    """The circular kernel of length ``2L`` whose convolution with a zero-padded input is the long convolution:
    ``[k_forward, 0] + [0, flip(k_reverse)]``, in the FFT dtype."""
    length = k_forward.shape[-1]
    dtype = _fft_dtype(k_forward.dtype)
    kernel = F.pad(k_forward.to(dtype), (0, length))
    if k_reverse is not None:
        kernel = kernel + F.pad(k_reverse.to(dtype).flip(-1), (length, 0))
    return kernel


def kernel_spectrum(k_forward: torch.Tensor, k_reverse: Optional[torch.Tensor]) -> torch.Tensor:
    """``rfft`` of the :func:`padded_kernel`, scaled by ``1/2L``: what :func:`fft_conv` multiplies with. Depends on the
    filters only, so it can be computed once per length."""
    return _scaled_spectrum(padded_kernel(k_forward, k_reverse))


def _scaled_spectrum(kernel: torch.Tensor) -> torch.Tensor:
    """``rfft`` of a padded kernel scaled by one over its length (:func:`fft_conv` inverts with ``norm="forward"``)."""
    size = kernel.shape[-1]
    return torch.fft.rfft(kernel, n=size) / size


def _per_channel(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """View ``[C, ...]`` values so that they broadcast over activations whose last ``ndim`` dimensions are
    ``[C, *batch, L]`` (channel-major: ``ndim`` = the activations' ``dim()``; batch-major ``[B, C, L]``: 2)."""
    return values.view(values.shape[0], *([1] * (ndim - values.dim())), *values.shape[1:])


class Workspace:
    """Scratch tensors of an inference forward on CPU, reused across the chunks of a mixer or MLP call and, when a model
    passes one workspace to all its layers, across layers.

    On CPU, glibc maps every freshly allocated block of more than a few MB and gives it back when it is freed, so each
    new activation is page-faulted in again (`benchmarks/profile_m2_bert_inference.py` counts the faults). Only
    tensors that never leave a layer live here: a tensor from :meth:`tensor` is valid until the next request of the
    same ``name``.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def tensor(self, name: str, shape: tuple[int, ...], like: torch.Tensor, dtype: Optional[torch.dtype] = None):
        """An uninitialised tensor of ``shape`` on ``like``'s device (and dtype, unless ``dtype`` is given)."""
        dtype = like.dtype if dtype is None else dtype
        if like.device.type != "cpu":
            # Accelerators' caching allocators reuse memory already; holding scratch tensors would only raise the peak.
            return like.new_empty(shape, dtype=dtype)
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = like.new_empty(numel, dtype=dtype)
            self._buffers[name] = buffer
        return buffer[:numel].view(shape)


def _scratch(workspace: Optional[Workspace], name: str, shape, like: torch.Tensor) -> Optional[torch.Tensor]:
    """``workspace.tensor(...)`` to pass as an ``out=`` argument, or None (a fresh output) without a workspace."""
    return None if workspace is None else workspace.tensor(name, tuple(shape), like)


def _gemm_output(workspace: Optional[Workspace], name: str, shape, like: torch.Tensor) -> Optional[torch.Tensor]:
    """:func:`_scratch` for a matrix product, except under autocast, whose choice of dtype ``out=`` calls bypass."""
    return None if _autocast_dtype(like.device.type) is not None else _scratch(workspace, name, shape, like)


def zero_padded_buffer(
    like: torch.Tensor, workspace: Optional[Workspace] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(buffer, head)``: an FFT-dtype buffer shaped like ``like`` but twice as long, its second half zero, and the
    view of its first half. Writing an input into ``head`` and passing ``padded=buffer`` to :func:`fft_conv` saves the
    copy that padding would make."""
    length = like.shape[-1]
    shape = (*like.shape[:-1], 2 * length)
    dtype = _fft_dtype(like.dtype)
    buffer = like.new_empty(shape, dtype=dtype) if workspace is None else workspace.tensor("padded", shape, like, dtype)
    buffer[..., length:].zero_()
    return buffer, buffer[..., :length]


def fft_conv(
    x: torch.Tensor,
    spectrum: torch.Tensor,
    d: torch.Tensor,
    inplace: bool = False,
    padded: Optional[torch.Tensor] = None,
    channel_dim: int = 0,
) -> torch.Tensor:
    """Long convolution of ``x`` with a kernel given by its :func:`kernel_spectrum` (``[C, L + 1]``), plus ``d x``
    (``d``: ``[C]``). ``x`` is channel-major ``[C, *batch, L]``, or has its channels at ``channel_dim`` (``[B, C, L]``:
    1).

    The zero padding to ``2L`` removes circular wrap-around; the result is cast back to ``x``'s dtype. ``inplace``
    (only where autograd does not record) updates the intermediate spectra instead of allocating new ones; ``padded``
    is ``x``'s :func:`zero_padded_buffer` when ``x`` was written into one.
    """
    length = x.shape[-1]
    x_c = x.to(_fft_dtype(x.dtype))
    ndim = x.dim() - channel_dim
    spectrum, d = _per_channel(spectrum, ndim), _per_channel(d.to(x_c.dtype), ndim)
    # Padded by hand and transformed at their own size: ONNX's DFT mis-sizes transforms given a dynamic `n`.
    frequencies = torch.fft.rfft(F.pad(x_c, (0, length)) if padded is None else padded)
    frequencies = frequencies.mul_(spectrum) if inplace else frequencies * spectrum
    if torch.onnx.is_in_onnx_export():
        y = _inverse_rfft_by_forward_transforms(frequencies, length)
    else:
        y = torch.fft.irfft(frequencies, norm="forward")[..., :length]  # 2L points from the L + 1 of a real signal
    y = y.addcmul_(x_c, d) if inplace else y + x_c * d
    return y.to(x.dtype)


class _LongConvolution(torch.autograd.Function):
    """``y = causal_part(x ⊛ kernel) + d x`` for training, with batch-major ``x`` ``[*batch, C, L]``, the time-domain
    :func:`padded_kernel` ``[C, 2L]`` and ``d`` ``[C]``. Composed, autograd differentiates the spectrum: each real FFT's
    backward is a complex FFT of twice the size over a zero-filled complex copy, and every step of the padding and
    scaling keeps or allocates a spectrum-sized tensor. Here both gradients are real FFT convolutions: the input's is
    the correlation with the kernel, the kernel's the correlation of the output gradient with the input, summed over
    the batch. Where a graph of the backward is built (double backward), the same formulas run out of place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        length, size = x.shape[-1], kernel.shape[-1]
        x_c = x.to(kernel.dtype)
        x_spectrum, kernel_spectrum_ = torch.fft.rfft(x_c, n=size), torch.fft.rfft(kernel)
        keep_x_spectrum = ctx.needs_input_grad[1]
        product = x_spectrum * kernel_spectrum_ if keep_x_spectrum else x_spectrum.mul_(kernel_spectrum_)
        y = torch.fft.irfft(product, n=size)[..., :length]
        # The backward multiplies by the conjugates: conjugated here, in place, a conjugate view would be copied there.
        conjugates = (x_spectrum.conj_physical_() if keep_x_spectrum else None, kernel_spectrum_.conj_physical_())
        ctx.save_for_backward(x, kernel, d, *conjugates)
        return torch.addcmul(y, x_c, d.to(x_c.dtype)[:, None]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, kernel, d, x_conjugate, kernel_conjugate = ctx.saved_tensors
        length, size = grad.shape[-1], kernel.shape[-1]
        x_c, grad_c = x.to(kernel.dtype), grad.to(kernel.dtype)
        graphed = torch.is_grad_enabled()
        if graphed:  # the spectra must come from the inputs within the graph
            x_conjugate = torch.fft.rfft(x_c, n=size).conj()
            kernel_conjugate = torch.fft.rfft(kernel).conj()
        grad_spectrum = torch.fft.rfft(grad_c, n=size)
        batch_dims = tuple(range(grad.dim() - 2))
        grad_x = grad_kernel = grad_d = None
        if ctx.needs_input_grad[1]:
            correlation = grad_spectrum * x_conjugate
            grad_kernel = torch.fft.irfft(correlation.sum(batch_dims) if batch_dims else correlation, n=size)
        if ctx.needs_input_grad[0]:
            spectrum = grad_spectrum * kernel_conjugate if graphed else grad_spectrum.mul_(kernel_conjugate)
            grad_x = torch.fft.irfft(spectrum, n=size)[..., :length]
            grad_x = torch.addcmul(grad_x, grad_c, d.to(grad_c.dtype)[:, None]).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_d = (grad_c * x_c).sum(batch_dims + (-1,)).to(d.dtype)
        return grad_x, grad_kernel, grad_d


def long_conv_for_training(x: torch.Tensor, kernel: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """:func:`fft_conv` of batch-major ``x`` ``[B, C, L]`` with the :func:`padded_kernel` ``kernel`` (``[C, 2L]``)
    while autograd records the kernel: `_LongConvolution` under plain eager autograd, else the composed ops."""
    if hand_written_backward_applies((x, kernel, d)):
        return _LongConvolution.apply(x, kernel, d)
    return fft_conv(x, _scaled_spectrum(kernel), d, channel_dim=x.dim() - 2)


def _inverse_rfft_by_forward_transforms(spectrum: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` points of ``irfft(spectrum, norm="forward")`` (``spectrum``: the ``L + 1`` one-sided bins
    of ``2L`` real points), computed with forward real FFTs: onnxruntime plans the ONNX exporter's inverse DFT with the
    one-sided size and fails at run time.

    For the full Hermitian spectrum ``Y``, ``y = Re(fft(conj(Y))) = Re(rfft(Re Y)) - Im(rfft(-Im Y))``."""
    real, imaginary = torch.view_as_real(spectrum).unbind(-1)
    mirrored = lambda part: part[..., 1:-1].flip(-1)  # noqa: E731 (bins L+1 .. 2L-1 of Y are those of 1 .. L-1)
    even = torch.view_as_real(torch.fft.rfft(torch.cat([real, mirrored(real)], dim=-1)))
    odd = torch.view_as_real(torch.fft.rfft(torch.cat([-imaginary, mirrored(imaginary)], dim=-1)))
    return (even[..., 0] - odd[..., 1])[..., :length]


def fft_long_conv(
    x: torch.Tensor, k_forward: torch.Tensor, k_reverse: Optional[torch.Tensor], d: torch.Tensor
) -> torch.Tensor:
    """Long convolution of channel-major ``x`` ``[C, *batch, L]`` with per-channel filters ``[C, L]``, via FFTs of
    size ``2L``.

    ``y[t] = Σ_{s≤t} k_forward[t-s] x[s] + Σ_{s>t} k_reverse[s-t-1] x[s] + d x[t]``; without ``k_reverse`` it is
    causal.
    """
    return fft_conv(x, kernel_spectrum(k_forward, k_reverse), d)


def causal_depthwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out: Optional[torch.Tensor] = None,
    channel_dim: int = 0,
) -> torch.Tensor:
    """Depthwise causal convolution of channel-major ``x`` ``[C, *batch, L]`` (or with its channels at
    ``channel_dim``) with an ``nn.Conv1d(groups=C)`` weight ``[C, 1, K]``: ``y[t] = bias + Σ_j weight[K-1-j] x[t-j]``,
    zero before the start; written into ``out`` if given (without autograd).

    This is ``Conv1d(padding=K-1)`` truncated to the first L outputs, as the official short filter computes it, done as
    K shifted multiply-adds: on CPU about 4x faster than the depthwise convolution kernel, and no layout change.
    """
    taps = weight.shape[-1]
    ndim = x.dim() - channel_dim
    weight = _per_channel(weight.view(weight.shape[0], taps), ndim + 1).to(x.dtype)
    if bias is None:
        y = torch.mul(x, weight[..., taps - 1], out=out)
    else:
        y = torch.addcmul(_per_channel(bias.to(x.dtype), ndim), x, weight[..., taps - 1], out=out)
    for shift in range(1, min(taps, x.shape[-1])):
        # In place on a view of y: autograd records it (y itself is not needed by any backward formula).
        y[..., shift:].addcmul_(x[..., :-shift], weight[..., taps - 1 - shift])
    return y


class _CausalDepthwiseConvolution(torch.autograd.Function):
    """:func:`causal_depthwise_conv` of batch-major ``x`` ``[*batch, C, L]`` for training. Through ``nn.Conv1d`` the
    short filter computes ``L + K - 1`` outputs of which the mixer keeps ``L``, and its backward pads the gradient back
    to that length and runs the depthwise kernel; here the forward and the input's gradient are K shifted
    multiply-adds each, and the weight's gradient K dot products per channel. Differentiable ops throughout, so a
    graph of the backward (double backward) needs no second formula."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return causal_depthwise_conv(x, weight, bias, channel_dim=x.dim() - 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        taps, length = weight.shape[-1], x.shape[-1]
        columns = weight.view(weight.shape[0], taps).to(grad.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # The transposed convolution: each input feeds the K outputs at and after it.
            grad_x = grad * columns[:, taps - 1, None]
            for shift in range(1, min(taps, length)):
                grad_x[..., :-shift].addcmul_(grad[..., shift:], columns[:, taps - 1 - shift, None])
        if ctx.needs_input_grad[1]:
            per_shift = [
                _channel_dot(grad[..., shift:], x[..., : length - shift]) if shift < length else None
                for shift in range(taps)
            ]
            zeros = torch.zeros_like(per_shift[0])
            per_tap = [zeros if p is None else p for p in reversed(per_shift)]
            grad_weight = torch.stack(per_tap, dim=-1).view_as(weight).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(tuple(range(grad.dim() - 2)) + (-1,)).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias


def _channel_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ a * b`` per channel of batch-major ``[*batch, C, n]`` tensors, as matrix products (no product tensor)."""
    channels, n = a.shape[-2], a.shape[-1]
    a, b = a.reshape(-1, channels, n), b.reshape(-1, channels, n)
    return sum(torch.bmm(a[i].unsqueeze(1), b[i].unsqueeze(2)).view(channels) for i in range(a.shape[0]))


def causal_short_conv(conv: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The mixer's causal short filter ``conv`` on batch-major ``z`` ``[B, C, L]`` (the first ``L`` outputs).

    A plain, hook-free ``nn.Conv1d`` outside graph capture runs as K shifted multiply-adds (`causal_depthwise_conv`;
    in training `_CausalDepthwiseConvolution`, under plain eager autograd), on inputs cast as autocast casts a
    convolution's: PyTorch's depthwise kernel took 17% of M2-BERT's bfloat16 forward on an H200 (benchmarks/RESULTS.md,
    2026-12-04), as slow in bfloat16 as in float32, and is about 4x slower on CPU. Else, and in a captured graph, the
    module."""
    tensors = (z, conv.weight) + (() if conv.bias is None else (conv.bias,))
    if type(conv) is nn.Conv1d and not has_forward_hooks(conv) and not is_traced():
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return causal_depthwise_conv(autocast_input(z), conv.weight, conv.bias, channel_dim=z.dim() - 2)
        if eager_autograd(tensors):
            return _CausalDepthwiseConvolution.apply(autocast_input(z), conv.weight, conv.bias)
    return conv(z)[..., : z.shape[-1]]


def filter_dependencies(module: nn.Module) -> Optional[tuple]:
    """What ``module``'s outputs depend on besides their length: every parameter and buffer (which tensor, its
    in-place version, shape, dtype and device) and the autocast dtype of its device; None where that cannot be
    known (tensors created under `torch.inference_mode()` have no version)."""
    named = [*module.named_parameters(), *module.named_buffers()]
    names, tensors = [name for name, _ in named], tuple(t for _, t in named)
    states = _tensor_state(tensors)
    if states is None:
        return None
    device_type = tensors[0].device.type if tensors else "cpu"
    return (_autocast_dtype(device_type),) + tuple(zip(names, states))


class _PositionalFeatures(nn.Module):
    """Time plus sine/cosine features of each position: the input of the implicit filter MLP.

    ``z`` is a learned parameter in the official model (its own learning rate), ``t`` a buffer.
    """

    def __init__(self, emb_dim: int, max_length: int) -> None:
        super().__init__()
        z, t = self.initial_features(emb_dim, max_length)
        # A model built in half precision (`from_pretrained(..., dtype=torch.float16)` sets the default dtype) stores
        # the features in it, rounded from the float32 construction.
        dtype = torch.get_default_dtype()
        self.z = nn.Parameter(z.to(dtype))
        self.register_buffer("t", t.to(dtype))

    @staticmethod
    def initial_features(emb_dim: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, t)`` in float32 whatever the default dtype: the official construction, bit for bit, and CPUs have no
        complex half-precision exponential."""
        t = torch.linspace(0, 1, max_length, dtype=torch.float32)[None, :, None]
        bands = (emb_dim - 1) // 2
        angle = 2 * math.pi * torch.linspace(0, max_length - 1, max_length, dtype=torch.float32)[None, :, None]
        angle = angle / max_length
        frequencies = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float32)[None, None]
        # exp(-i f w), split into real and imaginary parts.
        rotation = torch.exp(-1j * frequencies * angle)
        return torch.cat([t, rotation.real, rotation.imag], dim=-1), t

    def forward(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.z[:, :length], self.t[:, :length]


class _Sin(nn.Module):
    """``sin(w_mod * freq * x)``. The first instance owns ``freq``; the others borrow it without registering it."""

    def __init__(self, width: int, w: float, w_mod: float, owner: Optional["_Sin"] = None) -> None:
        super().__init__()
        self.w_mod = w_mod
        if owner is None:
            self.freq = nn.Parameter(torch.full((1, width), float(w)))
            self._owner = None
        else:
            object.__setattr__(self, "_owner", owner)  # a plain reference: not a submodule, not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        freq = self.freq if self._owner is None else self._owner.freq
        return torch.sin(self.w_mod * freq * x)


class _ExponentialModulation(nn.Module):
    """Decay envelope ``exp(-t |delta_c|)`` per channel, from a fast to a slow rate (buffer ``deltas``)."""

    def __init__(self, width: int, fast_decay: float = 0.3, slow_decay: float = 1.5, target: float = 1e-2) -> None:
        super().__init__()
        deltas = self.initial_deltas(width, fast_decay, slow_decay, target)
        self.register_buffer("deltas", deltas.to(torch.get_default_dtype()))

    @staticmethod
    def initial_deltas(width: int, fast_decay: float = 0.3, slow_decay: float = 1.5, target: float = 1e-2):
        """In float32, as :meth:`_PositionalFeatures.initial_features`: a half-precision model rounds the official
        values instead of computing its own."""
        start, end = math.log(target) / slow_decay, math.log(target) / fast_decay
        return torch.linspace(start, end, width, dtype=torch.float32)[None, None]

    def forward(self, t: torch.Tensor, h: torch.Tensor, channels: slice = slice(None)) -> torch.Tensor:
        """``h``: ``[1, L, c]``, the values of ``channels``."""
        return h * torch.exp(-t * self.deltas[..., channels].abs())


def _filter_mlp(config, width: int, first_sin: _Sin, owner: _Sin) -> nn.Sequential:
    order = config.hyena_filter_order
    return nn.Sequential(
        nn.Linear(config.hyena_emb_dim, order),
        first_sin,
        nn.Linear(order, order),
        _Sin(order, config.hyena_w, config.hyena_w_mod, owner=owner),
        nn.Linear(order, order),
        _Sin(order, config.hyena_w, config.hyena_w_mod, owner=owner),
        nn.Linear(order, width, bias=False),
    )


class HyenaFilter(nn.Module):
    """Implicit long-convolution filters: an MLP with sine activations of positional features, exponentially
    modulated, plus the per-channel skip term ``bias`` (the "D" term)."""

    def __init__(self, config, width: int, bidirectional: bool) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(width))
        self.pos_emb = _PositionalFeatures(config.hyena_emb_dim, config.long_conv_l_max)
        owner = _Sin(config.hyena_filter_order, config.hyena_w, config.hyena_w_mod)
        self.implicit_filter = _filter_mlp(config, width, owner, owner)
        if bidirectional:
            follower = _Sin(config.hyena_filter_order, config.hyena_w, config.hyena_w_mod, owner=owner)
            self.implicit_filter_rev = _filter_mlp(config, width, follower, owner)
        self.modulation = _ExponentialModulation(width)
        # Set by the model that owns this filter (`filter_cache.FilterCacheMixin`); without one, nothing is reused.
        self.filter_cache = None

    @property
    def bidirectional(self) -> bool:
        return hasattr(self, "implicit_filter_rev")

    @property
    def max_length(self) -> int:
        """The longest kernel this filter has positional features for (the config's ``long_conv_l_max``)."""
        return self.pos_emb.z.shape[1]

    def records_autograd(self) -> bool:
        """Whether autograd records this filter's kernels now (then nothing computed from them may be reused)."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def forward(self, length: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(k_forward, k_reverse)`` of shape ``[H, length]`` (``k_reverse`` is None when causal)."""
        z, t = self.pos_emb(length)
        k_forward = self.modulation(t, self.implicit_filter(z))[0].transpose(0, 1)
        if not self.bidirectional:
            return k_forward, None
        return k_forward, self.modulation(t, self.implicit_filter_rev(z))[0].transpose(0, 1)

    def spectrum(self, length: int) -> torch.Tensor:
        """The kernel spectrum for inputs of ``length`` tokens (see :func:`kernel_spectrum`)."""
        return self._reused_in_inference(
            "spectrum", length, lambda: kernel_spectrum(*self.forward(length)), lambda: self._spectrum_by_channels(length)
        )

    def padded_kernel(self, length: int) -> torch.Tensor:
        """The :func:`padded_kernel` for inputs of ``length`` tokens, computed by calling this module (its hooks fire),
        with autograd's graph: for training."""
        self._forget_cached()
        return padded_kernel(*self(length))

    def _forget_cached(self) -> None:
        if self.filter_cache is not None:
            self.filter_cache.discard(self)  # about to change: the memory is better spent on training

    def _reused_in_inference(self, kind: str, length: int, reference, inference) -> torch.Tensor:
        """``reference()`` (with the graph) while autograd records this filter; else ``inference()``, through the
        owning model's `FilterCache` if there is one."""
        if self.records_autograd():
            self._forget_cached()
            return reference()
        if self.filter_cache is None:
            return inference()
        return self.filter_cache.get_or_compute(self, kind, length, inference)

    def _spectrum_by_channels(self, length: int) -> torch.Tensor:
        """:func:`kernel_spectrum` of :meth:`forward`, computed over chunks of channels straight into its result.

        Besides the result, only one chunk's padded kernel and modulation are ever held (a whole padded kernel and its
        spectrum would be 4x the result: 400 MB per filter of hidden 768 at 16384 tokens), in buffers reused across
        chunks (fresh multi-MB CPU tensors are page-faulted in on every use). Each half of the padded kernel is one
        matrix product of the output layer with the MLP's hidden features, written in place: the reverse filter's
        features and modulation are flipped in time beforehand, so that nothing of the kernel's size is flipped,
        padded or concatenated. An output layer that is not a plain `nn.Linear` (a PEFT or quantised wrapper), a
        half-precision filter (whose kernels are rounded before the float32 FFT) or autocast takes the reference
        computation, over all channels at once."""
        mlps = [self.implicit_filter] + ([self.implicit_filter_rev] if self.bidirectional else [])
        z, t = self.pos_emb(length)
        dtype = _fft_dtype(z.dtype)
        if (
            any(type(mlp[-1]) is not nn.Linear for mlp in mlps)
            or z.dtype != dtype
            or _autocast_dtype(z.device.type) is not None
        ):
            return kernel_spectrum(*self.forward(length))
        # Time runs backwards in the second half of the padded kernel: [k_forward, flip(k_reverse)].
        times = [t[0, :, 0], t[0, :, 0].flip(0)]
        features = [mlp[:-1](z)[0] for mlp in mlps]  # [L, filter order]
        if self.bidirectional:
            features[1] = features[1].flip(0)
        # kernel_spectrum's 1/2L scale, applied to the (small) output weights instead of the spectrum.
        weights = [mlp[-1].weight / (2 * length) for mlp in mlps]
        decay = self.modulation.deltas[0, 0].abs()
        width = self.bias.shape[0]
        spectrum = torch.empty(width, length + 1, dtype=dtype.to_complex(), device=z.device)
        # Per channel: its padded kernel, modulation and the FFT's complex output and scratch (about 8L floats). Larger
        # buffers would also raise glibc's mmap threshold and leave the forward's later blocks on the heap.
        chunks = _chunks(width, 8 * length * z.element_size(), 8, z.device)
        size = chunks[0].stop
        kernel_buffer = z.new_empty(size, 2 * length)
        modulation_buffer = z.new_empty(size, length)
        for channels in chunks:
            count = channels.stop - channels.start
            kernel, modulation = kernel_buffer[:count], modulation_buffer[:count]
            halves = [kernel[:, :length], kernel[:, length:]]
            if not self.bidirectional:
                halves[1].zero_()
            for half, weight, h, time in zip(halves, weights, features, times):
                torch.mm(weight[channels], h.T, out=half)
                torch.outer(decay[channels], time, out=modulation).neg_().exp_()
                half.mul_(modulation)
            torch.fft.rfft(kernel, out=spectrum[channels])
        return spectrum


@torch.no_grad()
def init_mixer_module(module: nn.Module, config) -> bool:
    """The official initialisation of the M2-specific modules (with `transformers.initialization`, which leaves loaded
    tensors alone); returns whether ``module`` was one. Models call it first in ``_init_weights``."""
    from transformers import initialization as init

    if isinstance(module, nn.Conv1d):
        # The official model keeps PyTorch's default init for the short convolution.
        init.kaiming_uniform_(module.weight, a=5**0.5)
        fan_in = module.weight.shape[1] * module.weight.shape[2]
        init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)
    elif isinstance(module, _PositionalFeatures):
        z, t = _PositionalFeatures.initial_features(module.z.shape[-1], module.z.shape[1])
        init.copy_(module.z, z)
        init.copy_(module.t, t)
    elif isinstance(module, _ExponentialModulation):
        init.copy_(module.deltas, _ExponentialModulation.initial_deltas(module.deltas.shape[-1]))
    elif isinstance(module, _Sin):
        if module._owner is None:
            init.constant_(module.freq, config.hyena_w)
    elif isinstance(module, HyenaFilter):
        init.normal_(module.bias, mean=0.0, std=1.0)
    else:
        return False
    return True


def structured_linear(config, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """The MLP's linear layer: block-diagonal, two-factor Monarch or dense, as the config says."""
    if not config.use_monarch_mlp:
        return nn.Linear(in_features, out_features, bias=bias)
    cls = BlockdiagLinear if config.monarch_mlp_type == "blockdiag" else MonarchLinear
    return cls(
        in_features,
        out_features,
        nblocks=config.monarch_mlp_nblocks,
        bias=bias,
        inference_path=config.structured_inference_path,
        training_path=config.structured_training_path,
    )


def _zero_padding(x: torch.Tensor, mask: Optional[torch.Tensor], inplace: bool = False) -> torch.Tensor:
    """Zero channel-major ``[C, B, L]`` activations at padded positions (``mask``: ``[B, L]``)."""
    if mask is None:
        return x
    mask = mask.to(x.dtype)
    return x.mul_(mask) if inplace else x * mask


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether a forward hook or pre-hook is registered on ``module``, on any module below it, or globally."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def takes_inference_fast_path(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` may run its CPU inference path instead of its ``reference_forward``: only where no one can
    tell the difference. The input is on CPU, autograd records nothing (the fast path updates tensors in place), no
    graph is being captured, and no forward hook or pre-hook is registered on the module or below it (the fast path
    reads some layers' weights instead of calling them)."""
    return (
        x.device.type == "cpu"
        and not records_autograd(module, x)
        and not is_traced()
        and not has_forward_hooks(module)
    )


# Working-set size of one chunk of the mixer and the MLP on CPU. Chunks this small stay in cache, and their buffers are
# reused by the allocator instead of being freshly mapped (and page-faulted) for every op, which cost about a third of
# the time of an unchunked M2-BERT layer at 16k tokens. Accelerators keep whole tensors: there, fewer and larger
# kernel launches win, and the caching allocator already reuses memory.
_CPU_CHUNK_BYTES = 24 << 20


def _chunks(total: int, per_item_bytes: int, minimum: int, device: torch.device) -> list[slice]:
    """Consecutive slices of ``range(total)`` whose items take about ``_CPU_CHUNK_BYTES`` together (one slice off
    the CPU)."""
    if device.type != "cpu":
        return [slice(0, total)]
    size = min(total, max(minimum, _CPU_CHUNK_BYTES // max(per_item_bytes, 1)))
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


# The official short filter's length, and how many tokens of decoding a `ConvolutionState` can roll back (assisted
# generation drops rejected draft tokens this way).
SHORT_FILTER_TAPS = 3
ROLLBACK_LIMIT = 256


# Decoding flushes the newest inputs' contributions to later outputs in tiles (see `ConvolutionState`); a tile of at
# most this many (inputs x outputs) is a gathered Toeplitz block times the inputs, a larger one an FFT convolution.
_DIRECT_TILE = 1024
# The shortest window of future outputs a decoding state computes from the whole history at once.
_MIN_WINDOW = 64


def contributions_to_following_outputs(x: torch.Tensor, kernel: torch.Tensor, width: int) -> torch.Tensor:
    """What the inputs ``x`` (``[H, T, B]``, time in the middle) add to the ``width`` outputs that follow them through
    the causal convolution with ``kernel`` (``[H, >= T + width]``): ``out[:, j] = Σ_s kernel[:, T + j - s] x[:, s]``,
    ``[H, width, B]``."""
    channels, steps, _ = x.shape
    if steps * width <= _DIRECT_TILE:
        lags = steps + torch.arange(width, device=x.device)[:, None] - torch.arange(steps, device=x.device)
        return torch.bmm(kernel[:, lags.flatten()].view(channels, width, steps), x)
    # A circular convolution of T + width points: the products that wrap around land past the outputs kept.
    size = steps + width
    spectrum = torch.fft.rfft(kernel[:, :size], n=size, dim=1)[..., None]
    return torch.fft.irfft(torch.fft.rfft(x, n=size, dim=1) * spectrum, n=size, dim=1)[:, steps:]


class _FutureOutputs:
    """A decoding state's window of future outputs of one long filter: ``outputs[:, j]`` (``[H, width, B]``) is what
    the inputs so far contribute to the output at position ``start + j``; ``next`` is the position it expects next."""

    def __init__(self, dependencies: tuple, start: int, outputs: torch.Tensor) -> None:
        self.dependencies, self.start, self.next, self.outputs = dependencies, start, start, outputs

    def continues(self, position: int, dependencies: tuple) -> bool:
        """Whether this window can give the output at ``position`` of an unchanged filter: the next position, so no
        token came in between (several at once go through the FFT path and leave the window behind)."""
        inside = position < self.start + self.outputs.shape[1]
        return inside and position == self.next and dependencies == self.dependencies

    def add_newest_inputs(self, history: torch.Tensor, kernel: torch.Tensor, newest: int) -> None:
        """After the output at ``newest``: add the contribution of the last ``U`` inputs to the next ``U`` outputs
        (those inside the window; a later window takes the rest from the whole history)."""
        step = newest - self.start + 1
        size = step & -step  # the largest power of two dividing the step number
        width = min(size, self.start + self.outputs.shape[1] - newest - 1)
        if width > 0:
            tile = history[:, newest - size + 1 : newest + 1].to(kernel.dtype)
            offset = newest + 1 - self.start
            self.outputs[:, offset : offset + width] += contributions_to_following_outputs(tile, kernel, width)
        self.next = newest + 1

    def map_batch(self, function) -> None:
        self.outputs = function(self.outputs, 2)


class ConvolutionState:
    """What a causal M2 mixer keeps of earlier tokens for incremental decoding: the recent outputs of the input
    projection (channel-major ``[3H, B, n]``; the short convolution reads the last ``SHORT_FILTER_TAPS - 1``, and up
    to ``ROLLBACK_LIMIT`` more are kept so that `crop` can roll decoding back) and every input of the long
    convolutions so far, ``[C, length, B]`` (C = H, or 2H with the residual long convolution; time before batch), in a
    buffer that grows by doubling. Padded positions are stored as zeros, as the full forward sees them.

    One-token steps do not read the whole history (that would cost as much as attention's keys and values): for each
    long filter the state keeps its kernel and a window of *future* outputs holding what the inputs so far contribute
    to them. A step reads its output from the window, adds its own input's share, and then adds what the newest inputs
    contribute to the next outputs, in tiles that double in size (at the i-th step of a window, the last ``U`` inputs
    to the next ``U`` outputs, ``U`` the largest power of two dividing ``i``): every (input, output) pair is counted
    exactly once, and a step costs O(log² length) amortised instead of O(length): the tiling of relaxed convolution
    (Oncescu et al., "Flash Inference", arXiv:2410.12982). When the window runs out it is recomputed from the whole
    history (one FFT), twice as long; several tokens at once, `crop` or a changed filter start a new one.
    """

    def __init__(self) -> None:
        self._projections: Optional[torch.Tensor] = None  # [3H, B, capacity], the first `_stored` columns in use
        self._stored = 0
        self._inputs: Optional[torch.Tensor] = None
        self.length = 0
        self._kernels: dict[int, tuple[tuple, torch.Tensor]] = {}  # filter position -> (its dependencies, kernel)
        self._windows: dict[int, _FutureOutputs] = {}  # filter position -> its window of future outputs

    def newest_output(self, position: int, filter_fn: HyenaFilter, history: torch.Tensor) -> torch.Tensor:
        """``filter_fn``'s causal convolution of ``history`` (``[H, t, B]``: every input so far, the newest last), with
        its D term, at the newest position: ``[H, 1, B]`` in ``history``'s dtype."""
        newest = history.shape[1] - 1
        dtype = _fft_dtype(history.dtype)
        dependencies = (dtype, id(filter_fn)) + (filter_dependencies(filter_fn) or (object(),))  # unknown: no reuse
        window = self._windows.get(position)
        if window is None or not window.continues(newest, dependencies):
            width = min(max(newest, _MIN_WINDOW), filter_fn.max_length - newest)
            kernel = self._kernel(position, filter_fn, newest + width, dependencies)
            window = self._windows[position] = _FutureOutputs(
                dependencies, newest, contributions_to_following_outputs(history[:, :newest].to(dtype), kernel, width)
            )
        else:
            kernel = self._kernel(position, filter_fn, newest + 1, dependencies)
        own_share = (kernel[:, :1] + filter_fn.bias.to(dtype)[:, None])[..., None]  # k[0] + D, [H, 1, 1]
        offset = newest - window.start
        y = window.outputs[:, offset : offset + 1] + history[:, newest:].to(dtype) * own_share
        window.add_newest_inputs(history, kernel, newest)
        return y.to(history.dtype)

    def _kernel(self, position: int, filter_fn: HyenaFilter, length: int, dependencies: tuple) -> torch.Tensor:
        """``filter_fn``'s kernel ``[H, >= length]`` in the dtype that ``dependencies`` starts with, computed for twice
        the length (up to the filter's maximum) and reused while nothing it depends on changes."""
        kept = self._kernels.get(position)
        if kept is None or kept[0] != dependencies or kept[1].shape[-1] < length:
            with torch.no_grad():
                kernel = filter_fn(min(filter_fn.max_length, 2 * length))[0].to(dependencies[0])
            kept = self._kernels[position] = (dependencies, kernel)
        return kept[1]

    def forget_future_outputs(self) -> None:
        """Drop the windows of future outputs (after a crop, whose tokens they hold and which several new tokens at
        once could bring back to the expected position): the next one-token step recomputes them from the history."""
        self._windows.clear()

    def long_conv_inputs(self) -> torch.Tensor:
        """``[C, length, B]``."""
        return self._inputs[:, : self.length]

    def _recent_projections(self) -> torch.Tensor:
        return self._projections[..., : self._stored]

    def short_conv_inputs(self, like: torch.Tensor) -> torch.Tensor:
        """The last ``SHORT_FILTER_TAPS - 1`` input projections, ``[3H, B, taps - 1]``, with the zeros that the
        convolution pads the start with where there are fewer (``like``: the new projections)."""
        count = SHORT_FILTER_TAPS - 1
        stored = self._recent_projections() if self._projections is not None else like[..., :0]
        return F.pad(stored[..., stored.shape[-1] - min(count, stored.shape[-1]) :], (max(0, count - self._stored), 0))

    def append(self, projections: torch.Tensor, long_conv_inputs: torch.Tensor) -> None:
        """Append the new tokens' input projections (``[3H, B, n]``) and long-convolution inputs (``[C, B, n]``)."""
        self._append_projections(projections)
        new = long_conv_inputs.permute(0, 2, 1)
        new_length = self.length + new.shape[1]
        if self._inputs is None or new_length > self._inputs.shape[1]:
            capacity = max(new_length, 2 * (0 if self._inputs is None else self._inputs.shape[1]))
            grown = new.new_empty(new.shape[0], capacity, new.shape[2])
            if self.length:
                grown[:, : self.length] = self.long_conv_inputs()
            self._inputs = grown
        self._inputs[:, self.length : new_length] = new
        self.length = new_length

    def _append_projections(self, new: torch.Tensor) -> None:
        """Into a buffer of twice the rollback window: when it is full, the newest window moves to its front (one
        column copied per token, amortised)."""
        keep = SHORT_FILTER_TAPS - 1 + ROLLBACK_LIMIT
        count = new.shape[-1]
        if self._projections is None or self._stored + count > self._projections.shape[-1]:
            kept = self._recent_projections()[..., max(0, self._stored - keep) :] if self._stored else None
            buffer = new.new_empty(*new.shape[:-1], 2 * keep + count)
            self._stored = 0 if kept is None else kept.shape[-1]
            if kept is not None:
                buffer[..., : self._stored] = kept
            self._projections = buffer
        self._projections[..., self._stored : self._stored + count] = new
        self._stored += count

    def crop(self, tokens: int) -> None:
        """Forget the last ``tokens`` tokens, as if they had never been appended."""
        if not 0 <= tokens <= self.length:
            raise ValueError(f"Cannot remove {tokens} tokens from a state that holds {self.length}.")
        if tokens and self._stored - tokens < min(self.length - tokens, SHORT_FILTER_TAPS - 1):
            raise ValueError(
                f"An M2 convolution state can roll back at most {ROLLBACK_LIMIT} tokens (`ROLLBACK_LIMIT`), asked for "
                f"{tokens}."
            )
        self._stored -= tokens
        self.length -= tokens
        self.forget_future_outputs()  # they hold the dropped tokens' contributions

    def _map_batch(self, function) -> None:
        """``function(tensor, batch_dim)`` on every stored tensor: beam reordering, selection, repetition, moves."""
        if self._projections is not None:
            self._projections = function(self._recent_projections(), 1)
            self._inputs = function(self.long_conv_inputs(), 2)
        for window in self._windows.values():
            window.map_batch(function)

    def reorder(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda x, dim: x.index_select(dim, indices.to(x.device)))

    def select(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda x, dim: x.movedim(dim, 0)[indices].movedim(0, dim))

    def repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda x, dim: x.repeat_interleave(repeats, dim=dim))

    def move_to(self, device) -> None:
        self._map_batch(lambda x, dim: x.to(device, non_blocking=True))
        self._kernels.clear()  # recomputed where the next step runs

    def clear(self) -> None:
        self._projections, self._inputs, self._stored, self.length = None, None, 0, 0
        self._kernels.clear()
        self.forget_future_outputs()


def _gated_sum(convolved: list[torch.Tensor], x2: torch.Tensor) -> torch.Tensor:
    """The mixer's signal before its output projection: the gated branch ``long_conv(v * x1) * x2``, plus the residual
    long convolution of the input when there is one."""
    y = convolved[0] * x2
    return y + convolved[1] if len(convolved) > 1 else y


class M2SequenceMixer(nn.Module):
    """The M2 sequence mixer (``MonarchMixerSequenceMixing``): input projection, causal depthwise short convolution,
    gated long convolution, optional residual long convolution of the mixer input, output projection.

    ``forward`` runs :meth:`reference_forward`, or, where nothing observable changes, :func:`mixer_cpu_inference`;
    :meth:`step` continues a sequence for incremental decoding.
    """

    def __init__(self, config) -> None:
        super().__init__()
        hidden = config.hidden_size
        if config.hyena_training_additions:
            self.layernorm = nn.LayerNorm(hidden)
        self.in_linear = nn.Linear(hidden, 3 * hidden)
        self.out_linear = nn.Linear(hidden, hidden)
        self.short_filter = nn.Conv1d(
            3 * hidden, 3 * hidden, kernel_size=SHORT_FILTER_TAPS, groups=3 * hidden, padding=SHORT_FILTER_TAPS - 1
        )
        self.filter_fn = HyenaFilter(config, hidden, config.bidirectional)
        if config.residual_long_conv:
            self.filter_fn2 = HyenaFilter(config, hidden, config.bidirectional)

    def forward(self, u: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``u``: ``[B, L, hidden]``; ``mask``: ``[B, L]``, 1 for real tokens (None: all real)."""
        if takes_inference_fast_path(self, u) and self._fast_path_reads_its_layers():
            return mixer_cpu_inference(self, u, mask)
        return self.reference_forward(u, mask)

    def reference_forward(self, u: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The official algorithm, step by step, batch-major ``[B, channels, L]`` between the projections. Padded
        positions are zeroed before each convolution: the short one (else real tokens after left padding would read
        pad positions) and the long ones (the short convolution's bias and tail make pad positions non-zero)."""
        length, hidden = u.shape[1], u.shape[2]
        if hasattr(self, "layernorm"):
            u = self.layernorm(u)
        mask = None if mask is None else mask[:, None, :]
        z = _zero_padding(self.in_linear(u).transpose(1, 2), mask)
        x1, x2, v = causal_short_conv(self.short_filter, z).split(hidden, dim=1)
        inputs = self._long_conv_inputs(v, x1, u.transpose(1, 2), mask)
        y = _gated_sum([self._long_convolution(f, x) for f, x in zip(self.long_conv_filters(), inputs)], x2)
        return self.out_linear(y.transpose(1, 2))

    def _long_conv_inputs(self, v, x1, u, mask) -> list[torch.Tensor]:
        """What the long convolutions read: the gated value ``v * x1`` and, with the residual long convolution, the
        mixer's (normalised) input ``u``; zero at padded positions."""
        inputs = [_zero_padding(v * x1, mask)]
        if hasattr(self, "filter_fn2"):
            inputs.append(_zero_padding(u, mask))
        return inputs

    def long_conv_filters(self) -> list[HyenaFilter]:
        return [self.filter_fn] + ([self.filter_fn2] if hasattr(self, "filter_fn2") else [])

    def _long_convolution(self, filter_fn: HyenaFilter, x: torch.Tensor) -> torch.Tensor:
        """``filter_fn``'s convolution (with its D term) of batch-major ``x`` ``[B, hidden, L]``."""
        length = x.shape[-1]
        if filter_fn.records_autograd() and not is_traced():
            return long_conv_for_training(x, filter_fn.padded_kernel(length), filter_fn.bias)
        if is_traced() or has_forward_hooks(filter_fn):
            # Called as a module, so that its hooks fire; a traced graph computes it rather than reading a cache.
            spectrum = kernel_spectrum(*filter_fn(length))
        else:
            spectrum = filter_fn.spectrum(length)  # the same spectrum, reused between inference calls
        return fft_conv(x, spectrum, filter_fn.bias, channel_dim=1)

    def _fast_path_reads_its_layers(self) -> bool:
        """The CPU inference path slices the input projection's and the short filter's weights per chunk of channels:
        it must not run when they are wrapped or replaced (a PEFT layer, a quantised linear)."""
        return type(self.in_linear) is nn.Linear and type(self.short_filter) is nn.Conv1d

    def _short_convolution(self, z: torch.Tensor) -> torch.Tensor:
        """The short filter of channel-major ``z`` ``[3H, B, n]``, causal (the first ``n`` outputs)."""
        if type(self.short_filter) is nn.Conv1d and not has_forward_hooks(self.short_filter):
            return causal_depthwise_conv(z, self.short_filter.weight, self.short_filter.bias)
        return self.short_filter(z.permute(1, 0, 2))[..., : z.shape[-1]].permute(1, 0, 2)

    def step(self, u: torch.Tensor, mask: Optional[torch.Tensor], state: ConvolutionState) -> torch.Tensor:
        """Output ``[B, n, hidden]`` of a causal mixer for ``n`` new tokens ``u`` that continue the tokens ``state``
        holds, which it then holds too. ``mask`` covers all of them (``[B, length + n]``) or is None.

        The same computation as ``forward`` over the whole sequence, restricted to the new outputs: one new token
        reads its long convolutions' outputs from the state's windows of future outputs (O(log² length x hidden)
        amortised, see `ConvolutionState`); several new tokens (a prompt) cost one FFT convolution over all stored
        inputs.
        """
        batch, new, hidden = u.shape
        total = state.length + new
        new_mask = None if mask is None else mask[:, -new:]
        if hasattr(self, "layernorm"):
            u = self.layernorm(u)
        z = _zero_padding(self.in_linear(u).permute(2, 0, 1), new_mask)  # [3H, B, n]
        taps = SHORT_FILTER_TAPS
        convolved = self._short_convolution(torch.cat([state.short_conv_inputs(z), z], dim=-1))
        x1, x2, v = convolved[..., taps - 1 :].chunk(3)
        state.append(z, torch.cat(self._long_conv_inputs(v, x1, u.permute(2, 0, 1), new_mask)))
        outputs = []
        filters_and_inputs = zip(self.long_conv_filters(), state.long_conv_inputs().split(hidden))  # x: [H, total, B]
        for position, (f, x) in enumerate(filters_and_inputs):
            if new == 1 and not f.records_autograd():
                y = state.newest_output(position, f, x).permute(0, 2, 1)  # [H, B, 1]
            else:
                y = fft_conv(x.permute(0, 2, 1), f.spectrum(total), f.bias)[..., -new:]
            outputs.append(y)
        return self.out_linear(_gated_sum(outputs, x2).permute(1, 2, 0))


class _GeluGatedProduct(torch.autograd.Function):
    """``gelu(gate) * value`` with ``[gate, value] = hidden.chunk(2, -1)``, for training: composed, autograd keeps the
    GELU's output and forms the gate's and the value's gradients in fresh tensors that it then concatenates; here the
    backward recomputes the GELU and writes both gradients straight into the halves of one tensor (on CPU, at 4096
    tokens, about 150 -> 85 ms for a 3072-wide GLU, forward and backward), and the GELU's output is not kept. Where a graph
    of the backward is built (double backward), it is made of differentiable ops."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor) -> torch.Tensor:
        gate, value = hidden.chunk(2, dim=-1)
        ctx.save_for_backward(hidden)
        return F.gelu(gate).mul_(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (hidden,) = ctx.saved_tensors
        gate, value = hidden.chunk(2, dim=-1)
        if torch.is_grad_enabled():
            return torch.cat([torch.ops.aten.gelu_backward(grad * value, gate), grad * F.gelu(gate)], dim=-1)
        grad_hidden = torch.empty_like(hidden)
        grad_gate, grad_value = grad_hidden.chunk(2, dim=-1)
        torch.mul(grad, value, out=grad_gate)
        torch.ops.aten.gelu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        torch.ops.aten.gelu.out(gate, out=grad_value).mul_(grad)
        return grad_hidden


def _gated_activation(hidden: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """The GLU's ``act(gate) * value``; with the exact GELU, hooks-free, under plain eager autograd, by
    `_GeluGatedProduct`."""
    gate, value = hidden.chunk(2, dim=-1)
    fused = type(act) is GELUActivation and act.act is F.gelu and not has_forward_hooks(act)
    if fused and torch.is_grad_enabled() and hidden.requires_grad and hand_written_backward_applies((hidden,)):
        return _GeluGatedProduct.apply(hidden)
    return act(gate) * value


class M2GatedMLP(nn.Module):
    """M2-BERT's MLP with its post-LayerNorm: ``LN(wo(dropout(GELU(g) * v)) + x)`` with ``[g, v] = gated_layers(x)``
    (the gate is the first half), or ``LN(wo(dropout(GELU(W x))) + x)`` when ``use_glu_mlp=False``.

    With ``post_norm=False`` (pre-LayerNorm blocks, whose residual is outside) it is ``wo(dropout(GELU(g) * v))``.
    ``forward`` runs :meth:`reference_forward`, or, where nothing observable changes, :func:`mlp_cpu_inference`.
    """

    def __init__(self, config, post_norm: bool = True) -> None:
        super().__init__()
        hidden, intermediate = config.hidden_size, config.intermediate_size
        self.use_glu = config.use_glu_mlp
        if self.use_glu:
            self.gated_layers = structured_linear(config, hidden, 2 * intermediate, bias=False)
        else:
            self.gated_layers = structured_linear(config, hidden, intermediate, bias=False)
        self.act = ACT2FN[config.hidden_act]  # "gelu" is the exact erf form, as in the official model
        self.wo = structured_linear(config, intermediate, hidden, bias=True)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if post_norm:
            self.layernorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., hidden]``."""
        if takes_inference_fast_path(self, x):
            return mlp_cpu_inference(self, x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.gated_layers(x)
        hidden = _gated_activation(hidden, self.act) if self.use_glu else self.act(hidden)
        out = self.wo(self.dropout(hidden))
        return self.layernorm(out + x) if hasattr(self, "layernorm") else out


class M2PreNormBlock(GradientCheckpointingLayer):
    """The pre-LayerNorm residual block of M2-GPT and M2-ViT: ``h + mixer(LN(h))``, then ``h + mlp(LN(h))``, with
    dropout on the residual branches. Given a causal mixer's ``cache`` (`ConvolutionState`), the mixer continues the
    sequence that the state holds (`M2SequenceMixer.step`) instead of mixing the inputs alone."""

    def __init__(self, config) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mixer = M2SequenceMixer(config)
        self.post_mixer_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = M2GatedMLP(config, post_norm=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        cache: Optional[ConvolutionState] = None,
        **kwargs,
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        if cache is None:
            mixed = self.mixer(normed, mask)
        else:
            mixed = self.mixer.step(normed, mask, cache)
        hidden_states = hidden_states + self.dropout(mixed)
        return hidden_states + self.dropout(self.mlp(self.post_mixer_layernorm(hidden_states)))


# The CPU inference path. Between the projections every operation of the mixer is per channel, so the mixer runs over
# chunks of channels, channel-major (`[channels, B, L]`): the FFTs run over contiguous rows, the gates and the short
# convolution need no layout change, and a chunk's buffers stay small. The MLP is token-wise and runs over chunks of
# tokens. Intermediate results are updated in place in the tensors of a `Workspace` shared by the chunks of a call.


def mixer_cpu_inference(mixer: M2SequenceMixer, u: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What ``mixer.reference_forward(u, mask)`` computes, without autograd, on CPU, chunk by chunk and in place."""
    batch, length, hidden = u.shape
    if hasattr(mixer, "layernorm"):
        u = mixer.layernorm(u)
    tokens = u.reshape(batch * length, hidden)
    spectra = [(f.spectrum(length), f.bias) for f in mixer.long_conv_filters()]
    workspace = Workspace()
    mixed = workspace.tensor("mixed", (hidden, batch, length), u)
    # An FFT of a channel over the batch holds 2 x B x 2L floats (real input and complex half spectrum).
    for channels in _chunks(hidden, 4 * batch * length * u.element_size(), 8, u.device):
        _mix_channels_in_place(mixer, tokens, channels, batch, spectra, mask, mixed[channels], workspace)
    return mixer.out_linear(mixed.view(hidden, batch * length).t()).view(batch, length, hidden)


def _mix_channels_in_place(
    mixer: M2SequenceMixer, tokens, channels: slice, batch: int, spectra, mask, out, workspace: Workspace
) -> None:
    """The mixer for one chunk of channels, from the input projection to the gated long convolutions, written into
    ``out`` (channel-major ``[c, B, L]``)."""
    hidden = tokens.shape[1]
    weight = mixer.in_linear.weight.view(3, hidden, hidden)[:, channels].reshape(-1, hidden)
    bias = mixer.in_linear.bias.view(3, hidden, 1)[:, channels].reshape(-1, 1)
    scratch = _gemm_output(workspace, "projected", (weight.shape[0], len(tokens)), tokens)
    z = torch.addmm(bias, weight, tokens.t(), out=scratch)
    z = _zero_padding(z.view(z.shape[0], batch, -1), mask, inplace=True)
    taps = mixer.short_filter.weight.shape[-1]
    conv_weight = mixer.short_filter.weight.view(3, hidden, 1, taps)[:, channels].reshape(-1, 1, taps)
    conv_bias = mixer.short_filter.bias.view(3, hidden)[:, channels].reshape(-1)
    convolved = causal_depthwise_conv(z, conv_weight, conv_bias, out=_scratch(workspace, "convolved", z.shape, z))
    x1, x2, v = convolved.chunk(3, dim=0)
    # Inputs go straight into a zero-padded FFT buffer and results straight into `out`.
    padded, gated = zero_padded_buffer(v, workspace)
    _zero_padding(torch.mul(v, x1, out=gated), mask, inplace=True)
    y = fft_conv(gated, spectra[0][0][channels], spectra[0][1][channels], inplace=True, padded=padded)
    torch.mul(y, x2, out=out)
    if len(spectra) > 1:
        _zero_padding(gated.copy_(tokens[:, channels].t().view(v.shape)), mask, inplace=True)
        out.add_(fft_conv(gated, spectra[1][0][channels], spectra[1][1][channels], inplace=True, padded=padded))


def mlp_cpu_inference(mlp: M2GatedMLP, x: torch.Tensor) -> torch.Tensor:
    """What ``mlp.reference_forward(x)`` computes, without autograd, on CPU, over chunks of tokens whose widest
    activation (the gated layer's output) stays small."""
    tokens = x.reshape(-1, x.shape[-1])
    workspace = Workspace()
    out = None
    for rows in _chunks(tokens.shape[0], mlp.gated_layers.out_features * x.element_size(), 64, x.device):
        y = _mlp_tokens_in_place(mlp, tokens[rows], workspace)
        if out is None:
            out = y.new_empty(tokens.shape[0], y.shape[-1])
        out[rows] = y
    return out.view(*x.shape[:-1], out.shape[-1])


def _mlp_tokens_in_place(mlp: M2GatedMLP, x: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """The MLP of a chunk of tokens ``[N, hidden]``, in ``workspace``'s tensors."""
    hidden = _linear(mlp.gated_layers, x, workspace, "gated")
    if mlp.use_glu:
        gate, value = hidden.chunk(2, dim=-1)
        hidden = mlp.act(gate).mul_(value)
    else:
        hidden = mlp.act(hidden)
    out = _linear(mlp.wo, mlp.dropout(hidden), workspace, "mlp_output")
    return mlp.layernorm(out.add_(x)) if hasattr(mlp, "layernorm") else out


def _linear(layer: nn.Module, x: torch.Tensor, workspace: Workspace, name: str) -> torch.Tensor:
    """``layer(x)`` for 2-D ``x``. A plain dense layer, a structured one that applies its densified weight (see its
    ``inference_path``) and an unpadded block-diagonal one write into the workspace tensor ``name``; any other layer
    (a PEFT wrapper, a Monarch layer, a padded block-diagonal one) is called as it is."""
    weight = layer.weight if type(layer) is nn.Linear else None
    if type(layer) in (MonarchLinear, BlockdiagLinear):
        weight = layer.inference_dense_weight(x)
    blockdiag = weight is None and type(layer) is BlockdiagLinear and layer.in_features_padded == layer.in_features
    blockdiag = blockdiag and layer.out_features_padded == layer.out_features
    writes = weight is not None or blockdiag
    out = _gemm_output(workspace, name, (x.shape[0], layer.out_features), x) if writes else None
    if out is None:
        return layer(x)
    if weight is not None:
        if layer.bias is None:
            return torch.mm(x, weight.t(), out=out)
        return torch.addmm(layer.bias, x, weight.t(), out=out)
    out = blockdiag_multiply(x, layer.weight, out=out)
    return out if layer.bias is None else out.add_(layer.bias)
