"""The Monarch Mixer building blocks shared by the M2 models: implicit long-convolution filters, the FFT long
convolution, the gated sequence mixer and the GLU MLP with structured layers.

Parameter names and numerics follow HazyResearch/m2 (`bert/src/mm/`), so released checkpoints load unchanged, with one
exception: the official filter MLP shares one `Sin` module (one `freq` tensor) between its six sine slots, which
appears six times in its state dict; here it is stored once, as `implicit_filter.1.freq`.

Everything takes an optional `mask` (`[B, L]`, 1 for real tokens). Padded positions are zeroed before every
convolution, so they contribute nothing, and because the convolutions are shift-invariant the outputs at real tokens
equal those of the unpadded sequence, for left and right padding alike. Without a mask (or with an all-ones mask)
the computation is exactly the official one.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .monarch import BlockdiagLinear, MonarchLinear

__all__ = ["HyenaFilter", "M2GatedMLP", "M2SequenceMixer", "fft_conv", "fft_long_conv", "kernel_spectrum", "structured_linear"]


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision FFTs overflow and lose the filter's tail at long lengths: always float32 (or float64).
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_spectrum(k_forward: torch.Tensor, k_reverse: Optional[torch.Tensor]) -> torch.Tensor:
    """``rfft`` of the length-``2L`` kernel ``[k_forward, 0] + [0, flip(k_reverse)]``, scaled by ``1/2L``: what
    :func:`fft_conv` multiplies with. Depends on the filters only, so it can be computed once per length."""
    length = k_forward.shape[-1]
    dtype = _fft_dtype(k_forward.dtype)
    kernel = F.pad(k_forward.to(dtype), (0, length))
    if k_reverse is not None:
        kernel = kernel + F.pad(k_reverse.to(dtype).flip(-1), (length, 0))
    return torch.fft.rfft(kernel, n=2 * length) / (2 * length)


def fft_conv(x: torch.Tensor, spectrum: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Long convolution of ``x`` ``[B, H, L]`` with a kernel given by its :func:`kernel_spectrum`, plus ``d x``.

    The zero padding to ``2L`` removes circular wrap-around; the result is cast back to ``x``'s dtype.
    """
    length = x.shape[-1]
    x_c = x.to(_fft_dtype(x.dtype))
    y = torch.fft.irfft(torch.fft.rfft(x_c, n=2 * length) * spectrum, n=2 * length, norm="forward")[..., :length]
    return (y + x_c * d.to(x_c.dtype).unsqueeze(-1)).to(x.dtype)


def fft_long_conv(
    x: torch.Tensor, k_forward: torch.Tensor, k_reverse: Optional[torch.Tensor], d: torch.Tensor
) -> torch.Tensor:
    """Long convolution of ``x`` ``[B, H, L]`` with per-channel filters ``[H, L]``, via FFTs of size ``2L``.

    ``y[t] = Σ_{s≤t} k_forward[t-s] x[s] + Σ_{s>t} k_reverse[s-t-1] x[s] + d x[t]``; without ``k_reverse`` it is
    causal.
    """
    return fft_conv(x, kernel_spectrum(k_forward, k_reverse), d)


class _PositionalFeatures(nn.Module):
    """Time plus sine/cosine features of each position: the input of the implicit filter MLP.

    ``z`` is a learned parameter in the official model (its own learning rate), ``t`` a buffer.
    """

    def __init__(self, emb_dim: int, max_length: int) -> None:
        super().__init__()
        z, t = self.initial_features(emb_dim, max_length)
        self.z = nn.Parameter(z)
        self.register_buffer("t", t)

    @staticmethod
    def initial_features(emb_dim: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.linspace(0, 1, max_length)[None, :, None]
        bands = (emb_dim - 1) // 2
        angle = 2 * math.pi * torch.linspace(0, max_length - 1, max_length)[None, :, None] / max_length
        frequencies = torch.linspace(1e-4, bands - 1, bands)[None, None]
        # exp(-i f w), split into real and imaginary parts: the official construction, bit for bit.
        rotation = torch.exp(-1j * frequencies * angle)
        return torch.cat([t, rotation.real.to(t.dtype), rotation.imag.to(t.dtype)], dim=-1), t

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
        self.register_buffer("deltas", self.initial_deltas(width, fast_decay, slow_decay, target))

    @staticmethod
    def initial_deltas(width: int, fast_decay: float = 0.3, slow_decay: float = 1.5, target: float = 1e-2):
        return torch.linspace(math.log(target) / slow_decay, math.log(target) / fast_decay, width)[None, None]

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h * torch.exp(-t * self.deltas.abs())


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
        self._cache: Optional[tuple[tuple, torch.Tensor]] = None

    @property
    def bidirectional(self) -> bool:
        return hasattr(self, "implicit_filter_rev")

    def forward(self, length: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(k_forward, k_reverse)`` of shape ``[H, length]`` (``k_reverse`` is None when causal)."""
        z, t = self.pos_emb(length)
        k_forward = self.modulation(t, self.implicit_filter(z))[0].transpose(0, 1)
        if not self.bidirectional:
            return k_forward, None
        return k_forward, self.modulation(t, self.implicit_filter_rev(z))[0].transpose(0, 1)

    def spectrum(self, length: int) -> torch.Tensor:
        """The kernel spectrum for inputs of ``length`` tokens (see :func:`kernel_spectrum`)."""
        if self.training or torch.is_grad_enabled():
            self._cache = None
            return kernel_spectrum(*self.forward(length))
        # The filters depend on the length only: in inference, reuse the spectrum until a parameter changes.
        key = (length, *(p._version for p in self.parameters()), *(p.data_ptr() for p in self.parameters()))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, kernel_spectrum(*self.forward(length)))
        return self._cache[1]


def structured_linear(config, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """The MLP's linear layer: block-diagonal, two-factor Monarch or dense, as the config says."""
    if not config.use_monarch_mlp:
        return nn.Linear(in_features, out_features, bias=bias)
    cls = BlockdiagLinear if config.monarch_mlp_type == "blockdiag" else MonarchLinear
    return cls(in_features, out_features, nblocks=config.monarch_mlp_nblocks, bias=bias)


def _zero_padding(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero channel-first ``[B, C, L]`` activations at padded positions."""
    return x if mask is None else x * mask.unsqueeze(1).to(x.dtype)


class M2SequenceMixer(nn.Module):
    """The M2 sequence mixer (``MonarchMixerSequenceMixing``): input projection, causal depthwise short convolution,
    gated long convolution, optional residual long convolution of the mixer input, output projection."""

    def __init__(self, config) -> None:
        super().__init__()
        hidden = config.hidden_size
        if config.hyena_training_additions:
            self.layernorm = nn.LayerNorm(hidden)
        self.in_linear = nn.Linear(hidden, 3 * hidden)
        self.out_linear = nn.Linear(hidden, hidden)
        self.short_filter = nn.Conv1d(3 * hidden, 3 * hidden, kernel_size=3, groups=3 * hidden, padding=2)
        self.filter_fn = HyenaFilter(config, hidden, config.bidirectional)
        if config.residual_long_conv:
            self.filter_fn2 = HyenaFilter(config, hidden, config.bidirectional)

    def forward(self, u: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        length = u.shape[1]
        if hasattr(self, "layernorm"):
            u = self.layernorm(u)
        # Padding is zeroed before each convolution: the short one (else real tokens after left padding would read
        # pad positions) and the long ones (the short convolution's bias and tail make pad positions non-zero).
        z = _zero_padding(self.in_linear(u).transpose(1, 2), mask)
        # padding=2 on both sides; keeping the first L outputs makes the short convolution causal.
        x1, x2, v = self.short_filter(z)[..., :length].chunk(3, dim=1)
        y = fft_conv(_zero_padding(v * x1, mask), self.filter_fn.spectrum(length), self.filter_fn.bias) * x2
        if hasattr(self, "filter_fn2"):
            residual = _zero_padding(u.transpose(1, 2), mask)
            y = y + fft_conv(residual, self.filter_fn2.spectrum(length), self.filter_fn2.bias)
        return self.out_linear(y.transpose(1, 2))


class M2GatedMLP(nn.Module):
    """M2-BERT's MLP with its post-LayerNorm: ``LN(wo(dropout(GELU(g) * v)) + x)`` with ``[g, v] = gated_layers(x)``
    (the gate is the first half), or ``LN(wo(dropout(GELU(W x))) + x)`` when ``use_glu_mlp=False``."""

    def __init__(self, config) -> None:
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
        self.layernorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.gated_layers(x)
        if self.use_glu:
            gate, value = hidden.chunk(2, dim=-1)
            hidden = self.act(gate) * value
        else:
            hidden = self.act(hidden)
        return self.layernorm(self.wo(self.dropout(hidden)) + x)
