"""Monarch and block-diagonal linear layers, their closed-form projections and exact densification.

Conventions follow HazyResearch/fly (``MonarchLinear``) and HazyResearch/m2 (``BlockdiagLinear``), so factors and
state dicts interoperate with both: ``blkdiag1`` / ``blkdiag2`` / ``bias`` for Monarch, ``weight`` / ``bias`` for
block-diagonal layers.

With ``b = nblocks``, ``p = ceil(in_features / b)``, ``s = ceil(out_features / b)`` and ``q = min(p, s)``, a Monarch
layer holds ``blkdiag1`` of shape ``(b, q, p)`` and ``blkdiag2`` of shape ``(b, s, q)`` and computes, for an input
``x`` zero-padded to ``b * p`` features::

    h[κ*q + t]     = Σ_i blkdiag1[κ, t, i] · x[κ*p + i]          # first block-diagonal factor
    y[σ*b + λ]     = Σ_ρ blkdiag2[λ, σ, ρ] · h[ρ*b + λ]          # permutation, then second factor

then truncates ``y`` to ``out_features`` and adds the bias. In matrix form, with the weight laid out as in
``nn.Linear`` (``out × in``)::

    W = P_out · blockdiag(blkdiag2) · P_mid · blockdiag(blkdiag1)

where ``P_mid`` sends intermediate feature ``f`` to position ``(f mod b) * q + f // b`` (feature ``f`` feeds block
``f mod b`` of the second factor) and ``P_out`` sends row ``σ`` of output block ``λ`` to output ``σ*b + λ``. For
``in = out = m²`` and ``b = m`` this is the paper's ``M = P L Pᵀ R``.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from typing import Callable, Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad

from .monarch_triton import monarch_multiply_triton, triton_supported

__all__ = [
    "BlockdiagLinear",
    "MonarchLinear",
    "blockdiag_factor_shape",
    "blockdiag_multiply",
    "monarch_factor_shapes",
    "monarch_multiply",
    "project_blockdiag",
    "project_monarch",
    "projection_error",
    "dense_weight_and_bias",
    "is_traced",
    "records_autograd",
    "set_monarch_backend",
    "set_structured_inference_path",
    "set_structured_training_path",
    "structured_layers",
]

logger = logging.getLogger(__name__)

Structure = Literal["monarch", "blockdiag"]
Backend = Literal["auto", "torch", "triton"]
_BACKENDS = ("auto", "torch", "triton")
_STRUCTURES = ("monarch", "blockdiag")

# The multiply that `backend="auto"` runs on tensors of each device type (any other: "torch"): the path that
# `benchmarks/bench_gpu.py` measures fastest. On an H200 (benchmarks/RESULTS.md, 2026-12-04) the Triton kernel computes
# the same values as the PyTorch path but takes 5.7 times as long (geometric mean over 24 cells: bf16 and fp32, three
# layer shapes, nblocks 4 and 16, forward and forward+backward; faster in none), so it stays opt-in
# (`backend="triton"`).
AUTO_BACKENDS: dict[str, str] = {"cuda": "torch"}
_PATH_NAMES = {"torch": "PyTorch multiply (two bmm)", "triton": "Triton kernel"}
_auto_choices_logged: set[str] = set()

InferencePath = Literal["auto", "structured", "dense", "measured"]
_INFERENCE_PATHS = ("auto", "structured", "dense", "measured")
TrainingPath = Literal["auto", "structured", "dense", "measured"]
_TRAINING_PATHS = ("auto", "structured", "dense", "measured")

# What `inference_path="auto"` may spend on one layer's densified weight, the same default as the M2 models' filter
# cache (160 MiB): every layer of a BERT-large-sized model (4096x1024 float32 = 16 MiB) fits many times over.
DEFAULT_DENSE_WEIGHT_MAX_BYTES = 160 * 2**20

# `inference_path="auto"` applies the structured multiply where it saves at least AUTO_MIN_FLOP_SAVING times the FLOPs
# of the dense weight on a call of at least AUTO_MIN_DENSE_FLOPS (2 * rows * in * out), and the densified weight
# elsewhere. A deterministic rule rather than a per-shape timing: a timing taken on a shared machine would pick
# differently from run to run, and a choice between two exact paths should not. From benchmarks/bench_monarch.py on
# CPU (benchmarks/RESULTS.md, 2026-11-28 and 2026-12-03): at 1.6x fewer FLOPs (n->4n, nblocks 2) the structured
# multiply does not beat nn.Linear, because its GEMMs are narrower and its permutations cost memory traffic that the
# FLOP count omits; at 2x (square, nblocks 4) and more it does, on every layer shape of the benchmark at 4096 tokens
# (quiet machine: 1.02x for 768-wide layers at nblocks 4, 1.23-5.1x elsewhere, 27-wide blocks included). On a machine
# loaded several times over its cores, layers under 1024 wide lost (0.35-0.74x): each of the multiply's five
# operations is a parallel region that waits for a descheduled thread. On small calls (256-wide layers,
# 512 tokens: 67 MFLOP) its five operations, each a parallel region, cost more than the one GEMM they save, twice so on
# a loaded machine. Small calls of layers whose dense weight exceeds AUTO_SMALL_CALL_MAX_WEIGHT_BYTES (decoding steps
# of wide layers) stay structured: there reading the weight dominates, and the factors are several times smaller.
# Block-diagonal layers do no permutation, and the same rule holds for them.
#
# On CUDA no FLOP rule predicts the winner, so there "auto" measures, as "measured" does (a GPU timed between
# synchronisations gives the same winner from run to run where the two paths differ by more than a few percent, and
# near a tie either is as fast). On an H200 (benchmarks/bench_gpu.py, 2026-12-04, 16384 tokens) the structured multiply
# beats cuBLAS in float32 on every shape (1.8-8.7x forward), but in bfloat16 only on large layers: 1024->4096 runs at
# 0.60x at nblocks 4 and 0.67x at nblocks 16 (13x fewer FLOPs), 4096->4096 at 1.00x / 1.47x, 4096->16384 at 1.68x /
# 2.62x; converted MiniLM and BERT-base shapes at `mlp` lost 0.60x and 0.81x in bfloat16 inference with the FLOP rule.
AUTO_MEASURED_DEVICE_TYPES = ("cuda",)
AUTO_MIN_FLOP_SAVING = 2.0
AUTO_MIN_DENSE_FLOPS = 2**28
AUTO_SMALL_CALL_MAX_WEIGHT_BYTES = 4 * 2**20

# `inference_path="measured"` times both exact paths on the first inference call of each layer shape, device, dtype
# (and autocast dtype) and call size (row counts grouped by powers of two), and applies the faster from then on, in
# every layer of that shape in the process. Opt-in on CPU, because which path wins on a shared machine can change from
# run to run (the two results differ by float rounding only); what "auto" does on AUTO_MEASURED_DEVICE_TYPES. Never
# during a CUDA graph capture, where synchronising is an error: the structured multiply runs there until measured.
# Each path runs once to warm up, then MEASURED_REPEATS times, interleaved; the minimum counts.
MEASURED_REPEATS = 3
_measured_paths: dict[tuple, str] = {}

# `training_path="measured"` does the same for calls that autograd records: it times a forward and backward through
# the structured multiply against one through the weight densified from the factors in the graph (the factors get
# their gradients through the densification), on detached copies, so that no gradient, hook or random number of the
# real step is touched. On CPU "auto" trains through the structured multiply, which bench_converted.py measured faster
# there (converted MiniLM training steps at 1.24-1.29x / 1.33-1.37x dense, nblocks 4, MLP / every linear layer); on
# AUTO_MEASURED_DEVICE_TYPES it measures: on an H200 in bfloat16, at 16384 tokens, a 1024->4096 layer trained at 0.62x
# nn.Linear through the structured multiply and 0.90x through the densified weight, a 4096->4096 one at 1.25x and
# 0.87x (benchmarks/RESULTS.md, 2026-12-04, run 5).
_measured_training_paths: dict[tuple, str] = {}


def measured_inference_paths() -> dict[tuple, str]:
    """The choices of ``inference_path="measured"`` (and of ``"auto"`` on ``AUTO_MEASURED_DEVICE_TYPES``) so far:
    ``{(layer class, in_features, out_features, nblocks, device type, dtype, autocast dtype or None, rows up to):
    "structured" or "dense"}``."""
    return dict(_measured_paths)


def clear_measured_inference_paths() -> None:
    """Forget the measured choices (the next calls measure again), for example after moving to a quieter machine."""
    _measured_paths.clear()


def measured_training_paths() -> dict[tuple, str]:
    """The choices of ``training_path="measured"`` (and of ``"auto"`` on ``AUTO_MEASURED_DEVICE_TYPES``) so far, keyed
    as ``measured_inference_paths()``: ``"structured"`` or ``"dense"`` (through the weight densified in the graph)."""
    return dict(_measured_training_paths)


def clear_measured_training_paths() -> None:
    """Forget the measured training choices (the next training calls measure again)."""
    _measured_training_paths.clear()


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _fastest(paths: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> str:
    """The name of the fastest of ``paths`` (callables), each warmed up once, then timed ``repeats`` times in turn."""
    best = dict.fromkeys(paths, math.inf)
    for round_ in range(repeats + 1):
        for name, run in paths.items():
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


# --------------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------------


def _check_features(in_features: int, out_features: int) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _check_nblocks(nblocks: int, in_features: int, out_features: int) -> None:
    if isinstance(nblocks, bool) or not isinstance(nblocks, int):
        raise TypeError(f"`nblocks` must be an int, got {type(nblocks).__name__}.")
    limit = min(in_features, out_features)
    if not 1 <= nblocks <= limit:
        raise ValueError(
            f"`nblocks` must be between 1 and min(in_features, out_features) = {limit} for a "
            f"{in_features}->{out_features} layer, got {nblocks}. Use a smaller `nblocks`."
        )


def _check_structure(structure: str) -> None:
    if structure not in _STRUCTURES:
        raise ValueError(f"`structure` must be one of {_STRUCTURES}, got {structure!r}.")


def _check_dense_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"`weight` must be a torch.Tensor, got {type(weight).__name__}.")
    if weight.dim() != 2:
        raise ValueError(
            f"`weight` must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}."
        )
    if not weight.is_floating_point():
        raise ValueError(f"`weight` must be a floating-point tensor, got dtype {weight.dtype}.")
    # A finite sum proves every value finite at a fraction of the cost; the full check runs only otherwise.
    if not torch.isfinite(weight.sum()) and not torch.isfinite(weight).all():
        raise ValueError("`weight` contains NaN or infinite values; a projection of it would be meaningless.")


# --------------------------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def monarch_factor_shapes(
    in_features: int, out_features: int, nblocks: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shapes of ``blkdiag1`` and ``blkdiag2`` of a ``MonarchLinear(in_features, out_features, nblocks)``."""
    _check_features(in_features, out_features)
    _check_nblocks(nblocks, in_features, out_features)
    in_block, out_block = _ceil_div(in_features, nblocks), _ceil_div(out_features, nblocks)
    inner = min(in_block, out_block)
    return (nblocks, inner, in_block), (nblocks, out_block, inner)


def blockdiag_factor_shape(in_features: int, out_features: int, nblocks: int) -> tuple[int, int, int]:
    """Shape of the ``weight`` of a ``BlockdiagLinear(in_features, out_features, nblocks)``."""
    _check_features(in_features, out_features)
    _check_nblocks(nblocks, in_features, out_features)
    return nblocks, _ceil_div(out_features, nblocks), _ceil_div(in_features, nblocks)


# --------------------------------------------------------------------------------------------------------------------
# Multiplies (PyTorch path)
# --------------------------------------------------------------------------------------------------------------------


class _PermuteCopy(torch.autograd.Function):
    """``x.permute(dims).contiguous()`` whose gradient is contiguous too.

    ``bmm`` given a permuted (non-BLAS-strided) gradient clones it one block at a time with strided reads; that
    dominated the backward pass on CPU. Copying once, in the layout the next ``bmm`` wants, is several times cheaper.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return x.permute(dims).contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, dims = inputs
        ctx.dims = dims
        ctx.inverse = tuple(sorted(range(len(dims)), key=dims.__getitem__))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _PermuteCopy.apply(grad, ctx.inverse), None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, _) -> torch.Tensor:
        return tangent.permute(ctx.dims).contiguous()


def _permute_copy(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # Dynamo cannot trace an autograd.Function with a custom jvp, and compiled graphs choose layouts themselves.
        return x.permute(dims).contiguous()
    return _PermuteCopy.apply(x, dims)


def _rows_by_second_block(w1: torch.Tensor, nblocks2: int) -> torch.Tensor:
    """``w1`` with the rows of each block reordered from ``t = t1*l + λ`` to ``(λ, t1)``, for ``l = nblocks2``
    dividing ``q``. Feature ``t`` of block κ goes to column ``κ*(q/l) + t1`` of second-factor block λ, so with this
    order (a copy of the small weight) the activation permutation between the factors moves contiguous runs of
    ``q/l`` features instead of single ones."""
    k, q, p = w1.shape
    return w1.view(k, q // nblocks2, nblocks2, p).transpose(1, 2).reshape(k, q, p)


def _first_factor(x_blocks: torch.Tensor, w1: torch.Tensor, nblocks2: int) -> torch.Tensor:
    """First factor on ``(k, N, p)`` inputs, returned in the second factor's layout ``(l, N, r)``, where
    ``g[λ, n, ρ] = h[n, ρl + λ]`` and ``h[n, κq + t]`` is the first factor's output."""
    k, q, p = w1.shape
    n = x_blocks.shape[1]
    inner2 = k * q // nblocks2
    if q % nblocks2 == 0:
        rank = q // nblocks2
        h = torch.bmm(x_blocks, _rows_by_second_block(w1, nblocks2).transpose(1, 2))
        return _permute_copy(h.view(k, n, nblocks2, rank), (2, 1, 0, 3)).view(nblocks2, n, inner2)
    h = torch.bmm(x_blocks, w1.transpose(1, 2))
    flat = _permute_copy(h, (1, 0, 2)).view(n, inner2, nblocks2)
    return _permute_copy(flat, (2, 0, 1))


def _second_factor_input(x_blocks: torch.Tensor, w1_rows: torch.Tensor, nblocks2: int) -> torch.Tensor:
    """The first factor on the input blocks ``(k, N, p)``, in the second factor's layout ``(l, N, r)``: with ``w1_rows``
    = `_rows_by_second_block` of ``w1``, one copy of contiguous runs of ``q/l`` features."""
    k, n, _ = x_blocks.shape
    q = w1_rows.shape[1]
    h = torch.bmm(x_blocks, w1_rows.transpose(1, 2))  # (k, N, q)
    return h.view(k, n, nblocks2, q // nblocks2).permute(2, 1, 0, 3).reshape(nblocks2, n, k * q // nblocks2)


def _plus_bias(y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``y + bias``, the bias cast to ``y``'s dtype so that autocast decides the output dtype, as for nn.Linear."""
    return y if bias is None else y + bias.to(y.dtype)


def _permuted_with_bias(out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The second factor's output ``out`` (``(l, N, s)``) in feature order ``(N, s*l)``, plus ``bias``: the permutation
    and the bias written in one pass instead of two."""
    l, n, s = out.shape
    y = out.new_empty(n, s, l)
    if bias is None:
        y.copy_(out.permute(1, 2, 0))
    else:
        torch.add(out.permute(1, 2, 0), bias.view(s, l).to(out.dtype), out=y)
    return y.view(n, s * l)


def monarch_multiply(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The Monarch multiply of a 2-D ``x`` ``(N, k*p)`` by ``w1`` ``(k, q, p)`` and ``w2`` ``(l, s, r)``, plus ``bias``
    (``(l*s,)``) if given.

    Returns ``(N, l*s)``. Two ``bmm``, built from PyTorch ops only, so it composes with autograd (including double
    backward), ``torch.func``, ``torch.compile`` and autocast. The activation layouts depend on whether a backward
    pass will follow: see the helpers.
    """
    tensors = (x, w1, w2) if bias is None else (x, w1, w2, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        if _training_product_applies(tensors, w1.shape[1] % w2.shape[0] == 0):
            return _MonarchTrainingProduct.apply(x, _rows_by_second_block(w1, w2.shape[0]), w2, bias)
        return _plus_bias(_monarch_multiply_for_training(x, w1, w2), bias)
    return _monarch_multiply_for_inference(x, w1, w2, bias)


def _training_product_applies(tensors: tuple[torch.Tensor, ...], runs_divide: bool) -> bool:
    """Whether `_MonarchTrainingProduct` may compute the product: its layouts need ``q`` divisible by ``l``, and see
    :func:`hand_written_backward_applies`."""
    return runs_divide and hand_written_backward_applies(tensors)


def hand_written_backward_applies(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether an ``autograd.Function`` with a hand-written backward may replace composed ops on ``tensors``: plain
    eager autograd (:func:`eager_autograd`) in the tensors' own dtype; autocast, which would change the composed ops'
    dtypes, gets the composed ops."""
    return _autocast_dtype(tensors[0].device.type) is None and eager_autograd(tensors)


def eager_autograd(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``tensors`` go through plain eager autograd: torch.compile, functorch transforms and forward-mode AD,
    which trace or transform the ops, need composed ops rather than an ``autograd.Function`` with a hand-written
    backward."""
    if is_traced():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(wrapped(t) or forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def autocast_input(t: torch.Tensor) -> torch.Tensor:
    """``t`` as autocast would cast an input of a lower-precision op (a convolution, a matrix product) on its device:
    floating point other than float64 to the autocast dtype; unchanged outside autocast."""
    cast = _autocast_dtype(t.device.type)
    if cast is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(cast)


class _MonarchTrainingProduct(torch.autograd.Function):
    """``x W^T + bias`` for training, with ``w1_rows`` = `_rows_by_second_block` of ``w1``: the composed ops move
    every activation three times in each direction (`_monarch_multiply_for_training`); here ``bmm`` reads the input's
    block view in place, the output permutation is written together with the bias, and the input gradient block by
    block straight into its layout: one copy between the factors and one for the output's permutation each way. Its
    backward is made of differentiable ops where a graph is built (double backward)."""

    @staticmethod
    def forward(ctx, x, w1_rows, w2, bias):
        n, (k, _, p) = x.shape[0], w1_rows.shape
        x = x.contiguous()
        g = _second_factor_input(x.view(n, k, p).transpose(0, 1), w1_rows, w2.shape[0])
        ctx.save_for_backward(x, w1_rows, w2, g)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _permuted_with_bias(torch.bmm(g, w2.transpose(1, 2)), bias)

    @staticmethod
    def backward(ctx, grad):
        x, w1_rows, w2, g = ctx.saved_tensors
        n, (k, q, p), (l, s, _) = x.shape[0], w1_rows.shape, w2.shape
        x_blocks = x.view(n, k, p).transpose(0, 1)
        if torch.is_grad_enabled():  # double backward: `g` must come from the inputs within the graph
            g = _second_factor_input(x_blocks, w1_rows, l)
        grad_out = grad.reshape(n, s, l).permute(2, 0, 1).contiguous()  # (l, n, s)
        grad_w2 = torch.bmm(grad_out.transpose(1, 2), g) if ctx.needs_input_grad[2] else None
        grad_h = torch.bmm(grad_out, w2).view(l, n, k, q // l).permute(2, 1, 0, 3).reshape(k, n, q)
        grad_w1 = torch.bmm(grad_h.transpose(1, 2), x_blocks) if ctx.needs_input_grad[1] else None
        grad_x = _blocks_times_weights(grad_h, w1_rows) if ctx.needs_input_grad[0] else None
        grad_bias = grad.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
        return grad_x, grad_w1, grad_w2, grad_bias


def _blocks_times_weights(blocks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(n, k*p)``: block ``κ`` of the columns is ``blocks[κ] @ weights[κ]`` (``(k, n, q)`` by ``(k, q, p)``).
    Without a graph each product is written into its columns (no transposed copy); with one, composed of
    differentiable ops."""
    k, n, _ = blocks.shape
    p = weights.shape[-1]
    if torch.is_grad_enabled():
        return torch.bmm(blocks, weights).transpose(0, 1).reshape(n, k * p)
    result = blocks.new_empty(n, k * p)
    for block in range(k):
        torch.mm(blocks[block], weights[block], out=result[:, block * p : (block + 1) * p])
    return result


def _monarch_multiply_for_training(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Every ``bmm`` operand, forward and backward, is contiguous and block-major. This costs explicit copies in the
    forward pass but saves ``bmm``'s block-by-block cloning of permuted gradients in the backward pass."""
    n = x.shape[0]
    k, _, p = w1.shape
    l, s, _ = w2.shape
    g = _first_factor(_permute_copy(x.reshape(n, k, p), (1, 0, 2)), w1, l)
    out = torch.bmm(g, w2.transpose(1, 2))
    return _permute_copy(out, (1, 2, 0)).view(n, s * l)


# Up to this many rows (one-token decoding steps), the factors multiply the activations from the left: ``W x^T``
# streams each weight row once, about twice as fast on CPU as ``x W^T`` for one or two rows.
_FEW_ROWS = 2


def _monarch_multiply_for_inference(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Without a backward pass, ``bmm`` reading the input's block view directly is cheaper than a copy."""
    n = x.shape[0]
    k, q, p = w1.shape
    l, s, r = w2.shape
    x_blocks = x.reshape(n, k, p).transpose(0, 1)
    if n > _FEW_ROWS and q % l == 0:
        # One copy between the factors, of runs of q/l features (see `_rows_by_second_block`): 1.25-1.6x faster on
        # CPU, in an interleaved microbenchmark of the BERT-base shapes, than letting `bmm` gather the single-feature-
        # strided view.
        out = torch.bmm(_second_factor_input(x_blocks, _rows_by_second_block(w1, l), l), w2.transpose(1, 2))
        if is_traced():  # a captured graph takes out-of-place ops
            return _plus_bias(out.permute(1, 2, 0).reshape(n, s * l), bias)
        return _permuted_with_bias(out, bias)
    if n <= _FEW_ROWS:
        h = torch.bmm(w1, x_blocks.transpose(1, 2)).transpose(1, 2)
    else:
        h = torch.bmm(x_blocks, w1.transpose(1, 2))
    g = h.transpose(0, 1).reshape(n, r, l).permute(2, 0, 1)
    if n <= _FEW_ROWS:
        y = torch.bmm(w2, g.transpose(1, 2)).permute(2, 1, 0).reshape(n, s * l)
    else:
        y = torch.bmm(g, w2.transpose(1, 2)).permute(1, 2, 0).reshape(n, s * l)
    return _plus_bias(y, bias)


def blockdiag_multiply(x: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block-diagonal multiply of a 2-D ``x`` ``(N, b*p)`` by ``weight`` ``(b, s, p)``; returns ``(N, b*s)``, written
    into ``out`` if given (only where autograd does not record)."""
    n = x.shape[0]
    b, s, p = weight.shape
    records = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    # A captured graph (torch.compile, torch.export) takes the batched form too: one op instead of a loop of `out=`.
    if records or (out is None and torch.compiler.is_compiling()):
        if out is not None:
            raise ValueError("blockdiag_multiply cannot write into `out` while autograd records the product.")
        product = torch.bmm(x.reshape(n, b, p).transpose(0, 1), weight.transpose(1, 2))
        return product.transpose(0, 1).reshape(n, b * s)
    # Without a backward pass each block's GEMM can read its input columns and write its output columns in place,
    # which skips the two activation transposes of the batched form (about 30% faster for M2-BERT's MLP on CPU).
    x, weight = autocast_input(x), autocast_input(weight)  # `out=` calls bypass autocast: cast as it would
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = x.new_empty(n, b * s, dtype=torch.promote_types(x.dtype, weight.dtype))
    for block in range(b):
        torch.mm(x[:, block * p : (block + 1) * p], weight[block].t(), out=out[:, block * s : (block + 1) * s])
    return out


# --------------------------------------------------------------------------------------------------------------------
# Closed-form projections (Theorem 1 of the Monarch paper, generalised to fly's rectangular layout)
# --------------------------------------------------------------------------------------------------------------------


def _padded(weight: torch.Tensor, nblocks: int, dtype: torch.dtype) -> torch.Tensor:
    out_features, in_features = weight.shape
    pad_in = _ceil_div(in_features, nblocks) * nblocks - in_features
    pad_out = _ceil_div(out_features, nblocks) * nblocks - out_features
    weight = weight.detach().to(dtype)
    return F.pad(weight, (0, pad_in, 0, pad_out)) if pad_in or pad_out else weight


def _monarch_slices(weight: torch.Tensor, nblocks: int, dtype: torch.dtype) -> torch.Tensor:
    """``S[κ, λ, σ, i] = W[σ*b + λ, κ*p + i]``: the block of W that input block κ and second-factor block λ share.

    A Monarch matrix is exactly a matrix whose slice (κ, λ) has rank at most ``_slice_ranks(...)[κ, λ]``, with
    disjoint parameters per slice, so slice-wise truncated SVD is the Frobenius-optimal projection.
    """
    padded = _padded(weight, nblocks, dtype)
    out_ext, in_ext = padded.shape
    return padded.reshape(out_ext // nblocks, nblocks, nblocks, in_ext // nblocks).permute(2, 1, 0, 3)


def _intermediate_routing(nblocks: int, inner: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """For every intermediate feature ``f = κ*q + t``: its second-factor block ``λ``, column ``ρ`` and its rank
    index ``j`` inside slice (κ, λ). Each returned tensor has shape ``(b, q)``, indexed by (κ, t)."""
    kappa = torch.arange(nblocks, device=device).unsqueeze(1).expand(nblocks, inner)
    t = torch.arange(inner, device=device).unsqueeze(0).expand(nblocks, inner)
    f = kappa * inner + t
    # Features of slice (κ, λ) are t ≡ λ - κq (mod b), i.e. t = t0 + j*b with t0 < b, hence j = t // b.
    return kappa, f % nblocks, f // nblocks, t // nblocks


def _slice_ranks(nblocks: int, inner: int, device: torch.device) -> torch.Tensor:
    """``(b, b)`` tensor: how many intermediate features connect input block κ to second-factor block λ."""
    kappa, lam, _, _ = _intermediate_routing(nblocks, inner, device)
    return torch.bincount((kappa * nblocks + lam).reshape(-1), minlength=nblocks * nblocks).view(nblocks, nblocks)


def _leading_singular_triplets(
    matrices: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` largest singular triplets ``(u, s, vh)`` of each matrix of a batch, as ``torch.linalg.svd`` would
    return them truncated, plus every squared singular value (descending), from the eigendecomposition of the smaller
    Gram matrix: about 3x faster than a full SVD on CPU for the slices of an MLP layer. Singular values enter squared,
    so relative accuracy is lost only for values below ~1e-8 of the largest (float64; ~3e-4 in float32): those the
    truncation discards, or whose term is negligible."""
    wide = matrices.shape[-2] < matrices.shape[-1]
    tall = matrices.transpose(-2, -1) if wide else matrices
    eigenvalues, eigenvectors = torch.linalg.eigh(tall.transpose(-2, -1) @ tall)  # ascending
    rank = min(rank, tall.shape[-1])
    squared = eigenvalues.flip(-1).clamp_min(0)
    singular = squared[..., :rank].sqrt()
    right = eigenvectors[..., -rank:].flip(-1)
    scale = torch.where(singular > 0, 1.0 / singular.clamp_min(torch.finfo(singular.dtype).tiny), 0.0)
    left = (tall @ right) * scale.unsqueeze(-2)
    if wide:
        left, right = right, left
    return left, singular, right.transpose(-2, -1), squared


def project_monarch(
    weight: torch.Tensor, nblocks: int = 4, *, dtype: torch.dtype = torch.float64, return_error: bool = False
) -> tuple[torch.Tensor, ...]:
    """Frobenius-optimal Monarch factors ``(blkdiag1, blkdiag2)`` of a dense ``(out, in)`` weight.

    One batched truncated SVD over all ``nblocks²`` slices; computed in ``dtype`` (float64 by default, whatever the weight's
    dtype) and returned in that dtype. Exact (up to rounding) when ``weight`` is already a Monarch matrix with the
    same ``nblocks``. Sizes that ``nblocks`` does not divide are zero-padded: the padding rows and columns never reach
    the output, and truncated SVD of the zero-padded slice is still optimal on the real part. With ``return_error``
    the relative Frobenius error ``‖W − M‖ / ‖W‖`` comes third, from the discarded singular values (no extra work).
    """
    _check_dense_weight(weight)
    out_features, in_features = weight.shape
    shape1, shape2 = monarch_factor_shapes(in_features, out_features, nblocks)
    inner = shape1[1]
    kappa, lam, rho, rank_index = _intermediate_routing(nblocks, inner, weight.device)
    slices = _monarch_slices(weight, nblocks, dtype).contiguous()  # batched products on a strided view copy anyway
    u, sv, vh, squared = _leading_singular_triplets(slices, int(rank_index.max()) + 1)
    scale = sv[kappa, lam, rank_index].sqrt()
    blkdiag1 = vh[kappa, lam, rank_index, :] * scale.unsqueeze(-1)
    # Invert the routing: column ρ of second-factor block λ is intermediate feature f = ρ*b + λ.
    lam2 = torch.arange(nblocks, device=weight.device).unsqueeze(1)
    f = torch.arange(inner, device=weight.device).unsqueeze(0) * nblocks + lam2
    kappa2, t2 = f // inner, f % inner
    columns = u[kappa2, lam2, :, t2 // nblocks] * scale[kappa2, t2].unsqueeze(-1)
    blkdiag2 = columns.transpose(1, 2)
    assert blkdiag1.shape == shape1 and blkdiag2.shape == shape2
    if not return_error:
        return blkdiag1.contiguous(), blkdiag2.contiguous()
    ranks = _slice_ranks(nblocks, inner, weight.device)
    discarded = (squared * (torch.arange(squared.shape[-1], device=weight.device) >= ranks.unsqueeze(-1))).sum()
    total = squared.sum()  # the Gram matrices' traces: ‖W‖²
    error = math.sqrt(discarded.item() / total.item()) if total > 0 else 0.0
    return blkdiag1.contiguous(), blkdiag2.contiguous(), error


def project_blockdiag(weight: torch.Tensor, nblocks: int = 4, *, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Frobenius-optimal block-diagonal ``(b, s, p)`` weight of a dense ``(out, in)`` weight: its diagonal blocks."""
    _check_dense_weight(weight)
    out_features, in_features = weight.shape
    b, s, p = blockdiag_factor_shape(in_features, out_features, nblocks)
    padded = _padded(weight, nblocks, dtype or weight.dtype).reshape(b, s, b, p)
    index = torch.arange(b, device=weight.device)
    return padded[index, :, index, :].contiguous()


def projection_error(
    weight: torch.Tensor, nblocks: int = 4, structure: Structure = "monarch", *, dtype: torch.dtype = torch.float64
) -> float:
    """Relative Frobenius error ``‖W − proj(W)‖ / ‖W‖`` of projecting ``weight`` onto ``structure``.

    Uses singular values only (Monarch) or block norms (block-diagonal): no factors and no layer are built.
    """
    _check_structure(structure)
    _check_dense_weight(weight)
    out_features, in_features = weight.shape
    total = weight.detach().to(dtype).square().sum()
    if total == 0:
        return 0.0
    # Sum what the projection discards rather than subtracting what it keeps: no cancellation for exact members.
    if structure == "blockdiag":
        b = nblocks
        blocks = _padded(weight, b, dtype).reshape(b, _ceil_div(out_features, b), b, _ceil_div(in_features, b))
        off_diagonal = ~torch.eye(b, dtype=torch.bool, device=weight.device).view(b, 1, b, 1)
        discarded = (blocks.square() * off_diagonal).sum()
    else:
        inner = monarch_factor_shapes(in_features, out_features, nblocks)[0][1]
        sv = torch.linalg.svdvals(_monarch_slices(weight, nblocks, dtype))
        ranks = _slice_ranks(nblocks, inner, weight.device)
        beyond_rank = torch.arange(sv.shape[-1], device=weight.device) >= ranks.unsqueeze(-1)
        discarded = (sv.square() * beyond_rank).sum()
    return math.sqrt(discarded.item() / total.item())


# --------------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------------


def dense_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight (out, in), bias)`` of any linear layer this package can project."""
    if isinstance(module, _StructuredLinear):
        return module.dense_weight(), module.bias
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if _is_transformers_conv1d(module):
        return module.weight.t(), module.bias
    raise TypeError(
        f"Expected a linear layer (torch.nn.Linear, transformers' Conv1D, MonarchLinear or BlockdiagLinear), "
        f"got {type(module).__name__}."
    )


def _is_transformers_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the layers themselves do not need it
        return False
    return isinstance(module, Conv1D)


def is_traced() -> bool:
    """Whether this forward is being captured as a graph (``torch.compile``, ``torch.export``, the ONNX exporter,
    TorchScript tracing): such code must not branch on tensor values nor keep tensors between calls."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or exporting() or torch.jit.is_tracing()


def graph_capture_underway(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream (nothing may synchronise then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def records_autograd(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a forward through ``module`` is recorded for backward; when it is not, activations may be updated in
    place, which on CPU saves most of the page faults of allocating fresh buffers at long lengths."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _check_inference_path(value, name: str = "inference_path") -> None:
    if value not in _INFERENCE_PATHS:
        raise ValueError(
            f"`{name}` must be one of {_INFERENCE_PATHS}, got {value!r}: 'auto' picks the exact path that the layer's "
            f"shape predicts faster (timed, on CUDA), 'structured' always runs the structured multiply, 'dense' "
            f"always applies the densified weight outside training and tracing, 'measured' times both on the first "
            f"call of each size."
        )


def _check_training_path(value, name: str = "training_path") -> None:
    if value not in _TRAINING_PATHS:
        raise ValueError(
            f"`{name}` must be one of {_TRAINING_PATHS}, got {value!r}: 'auto' trains through the structured multiply "
            f"on CPU and times both paths on CUDA, 'structured' always trains through the structured multiply, "
            f"'dense' through the weight densified from the factors at each call, 'measured' times both on the "
            f"first training call of each size."
        )


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _check_dense_weight_max_bytes(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(
            f"`dense_weight_max_bytes` must be a number of bytes >= 0 (0: 'auto' never densifies) or None (no "
            f"limit), got {value!r}."
        )


class _DenseWeight(NamedTuple):
    """A densified weight and what it was computed from: the factor tensors themselves (weak references, so that a
    reassigned parameter is told apart even if the new one reuses the old one's memory) and their in-place version,
    storage address, shape, dtype and device."""

    factors: tuple[weakref.ref, ...]
    state: tuple
    weight: torch.Tensor


def _tensor_state(tensors: tuple[torch.Tensor, ...]) -> Optional[tuple]:
    """Which tensors these are and their in-place versions, for reusing what was computed from them; None where one
    was created under `torch.inference_mode()` (it has no version counter, so a change to it could not be seen)."""
    state = []
    for t in tensors:
        if t.is_inference():
            return None
        state.append((t.data_ptr(), t._version, t.shape, t.dtype, t.device))
    return tuple(state)


class _StructuredLinear(nn.Module):
    """What Monarch and block-diagonal layers share: padding, truncation, bias, densification, projection, and the
    choice between the structured multiply and a cached densified weight in inference.

    Subclasses define ``_FACTORS`` (names of the factor parameters), ``_multiply(x, factors, bias=None)``
    (``(N, in_features_padded)`` -> ``(N, out_features_padded)`` by the factor tensors ``factors``, in ``_FACTORS``
    order, plus ``bias`` if given), ``_factor_init_bounds()``
    and the classmethod ``_from_dense(weight, bias, nblocks, projection_dtype, **kwargs)`` returning ``(layer,
    relative projection error)``.
    """

    _FACTORS: tuple[str, ...] = ()
    _training_path = "auto"  # layers pickled before `training_path` existed

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int,
        bias: bool,
        device,
        dtype,
        inference_path: InferencePath = "auto",
        dense_weight_max_bytes: Optional[int] = DEFAULT_DENSE_WEIGHT_MAX_BYTES,
        training_path: TrainingPath = "auto",
    ) -> None:
        super().__init__()
        _check_features(in_features, out_features)
        _check_nblocks(nblocks, in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.nblocks = nblocks
        self.in_features_padded = _ceil_div(in_features, nblocks) * nblocks
        self.out_features_padded = _ceil_div(out_features, nblocks) * nblocks
        self.inference_path = inference_path
        self.training_path = training_path
        self.dense_weight_max_bytes = dense_weight_max_bytes
        self._dense_weight_cache: Optional[_DenseWeight] = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def inference_path(self) -> str:
        return self._inference_path

    @inference_path.setter
    def inference_path(self, value: str) -> None:
        _check_inference_path(value)
        self._inference_path = value

    @property
    def training_path(self) -> str:
        return self._training_path

    @training_path.setter
    def training_path(self, value: str) -> None:
        _check_training_path(value)
        self._training_path = value

    @property
    def dense_weight_max_bytes(self) -> Optional[int]:
        return self._dense_weight_max_bytes

    @dense_weight_max_bytes.setter
    def dense_weight_max_bytes(self, value: Optional[int]) -> None:
        _check_dense_weight_max_bytes(value)
        self._dense_weight_max_bytes = value

    def uniform_init_bounds(self) -> dict[str, float]:
        """``{parameter name: b}`` of the ``U(-b, b)`` initialisation; model `_init_weights` methods use it too."""
        bounds = self._factor_init_bounds()
        if self.bias is not None:
            bounds["bias"] = 1.0 / math.sqrt(self.in_features)  # as nn.Linear (fly uses out_features here)
        return bounds

    def reset_parameters(self) -> None:
        for name, bound in self.uniform_init_bounds().items():
            nn.init.uniform_(getattr(self, name), -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs with {self.in_features} features in the last dimension, "
                f"got shape {tuple(x.shape)}."
            )
        weight = self._training_weight(x) if records_autograd(self, x) else self._inference_weight(x)
        if weight is not None:
            return F.linear(x, weight, self.bias)
        return self._structured_forward(x, self._factors(), self.bias)

    def _factors(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._parameters[name] for name in self._FACTORS)  # not through nn.Module.__getattr__

    def _structured_forward(
        self, x: torch.Tensor, factors: tuple[torch.Tensor, ...], bias: Optional[torch.Tensor]
    ) -> torch.Tensor:
        batch_shape = x.shape[:-1]
        if self.in_features_padded != self.in_features:
            x = F.pad(x, (0, self.in_features_padded - self.in_features))
        padded_output = self.out_features_padded != self.out_features
        # The multiply adds the bias itself where it can; a padded output gets it after the padding is cut off.
        y = self._multiply(x.reshape(-1, self.in_features_padded), factors, None if padded_output else bias)
        y = y.view(*batch_shape, self.out_features_padded)
        if padded_output:
            y = _plus_bias(y[..., : self.out_features], bias)
        return y

    def _densified(self, factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight that ``factors`` make, as a (differentiable) product with the
        identity; a transposed view, which ``F.linear`` reads without a copy."""
        eye = torch.eye(self.in_features_padded, device=factors[0].device, dtype=factors[0].dtype)
        return self._multiply(eye, factors)[: self.in_features, : self.out_features].t()

    # ----------------------------------------------------------------------------------------------------------------
    # Choice of the inference path
    # ----------------------------------------------------------------------------------------------------------------

    def flop_saving(self) -> float:
        """How many times fewer FLOPs per token the structured multiply does than the dense weight."""
        structured = sum(getattr(self, name).numel() for name in self._FACTORS)
        return self.in_features * self.out_features / structured

    def dense_weight_bytes(self) -> int:
        """Memory of this layer's densified weight."""
        return self.in_features * self.out_features * getattr(self, self._FACTORS[0]).element_size()

    def prefers_dense_weight(self, rows: Optional[int] = None) -> Optional[bool]:
        """Whether ``inference_path`` asks for the densified weight in inference on ``rows`` input rows (None: many).
        ``"measured"``: what was measured faster for calls of that size (None: not measured yet, or ``rows`` None).
        ``"auto"``: where the weight takes at most ``dense_weight_max_bytes`` and the structured multiply saves fewer
        than ``AUTO_MIN_FLOP_SAVING`` times the FLOPs, or the call is smaller than ``AUTO_MIN_DENSE_FLOPS`` and the
        weight at most ``AUTO_SMALL_CALL_MAX_WEIGHT_BYTES``."""
        if self._measures(getattr(self, self._FACTORS[0]).device.type):
            choice = None if rows is None else self._measured_paths_for(rows)
            return None if choice is None else choice == "dense"
        if self.inference_path != "auto":
            return self.inference_path == "dense"
        weight_bytes = self.dense_weight_bytes()
        limit = self.dense_weight_max_bytes
        if limit is not None and weight_bytes > limit:
            return False
        small_call = rows is not None and 2 * rows * self.in_features * self.out_features < AUTO_MIN_DENSE_FLOPS
        small_call = small_call and weight_bytes <= AUTO_SMALL_CALL_MAX_WEIGHT_BYTES
        return small_call or self.flop_saving() < AUTO_MIN_FLOP_SAVING

    def inference_dense_weight(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The densified weight to apply to ``x`` in place of the structured multiply, or None.

        Only where nobody can tell the difference: autograd records nothing (the factors get their gradients through
        the structured multiply) and no graph is being captured (a traced graph must compute from the parameters, not
        hold a tensor computed outside it). The weight is computed once and reused until a factor changes.
        """
        return None if records_autograd(self, x) else self._inference_weight(x)

    def _inference_weight(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """`inference_dense_weight` for a call that autograd does not record."""
        # Before the row count: a traced input's may be symbolic, and reading it would specialise the graph.
        if is_traced():
            return None
        rows = x.numel() // self.in_features
        if self._measures(x.device.type):
            return self._measured_dense_weight(x, rows)
        return self._cached_dense_weight() if self.prefers_dense_weight(rows) else None

    def _measures(self, device_type: str) -> bool:
        """Whether the inference path is chosen by timing both paths on ``device_type``."""
        return self.inference_path == "measured" or (
            self.inference_path == "auto" and device_type in AUTO_MEASURED_DEVICE_TYPES
        )

    def _measurement_key(self, rows: int, device: torch.device, dtype: torch.dtype) -> tuple:
        return (type(self).__name__, self.in_features, self.out_features, self.nblocks, device.type, dtype,
                _autocast_dtype(device.type), 1 << max(rows - 1, 0).bit_length())

    def _measured_paths_for(self, rows: int) -> Optional[str]:
        reference = getattr(self, self._FACTORS[0])
        return _measured_paths.get(self._measurement_key(rows, reference.device, reference.dtype))

    def _measured_dense_weight(self, x: torch.Tensor, rows: int) -> Optional[torch.Tensor]:
        """``inference_path="measured"``: the densified weight where it was timed faster on calls of this size."""
        limit = self.dense_weight_max_bytes
        if limit is not None and self.dense_weight_bytes() > limit:
            return None
        key = self._measurement_key(rows, x.device, self._parameters[self._FACTORS[0]].dtype)
        if key not in _measured_paths:
            if graph_capture_underway(x.device):
                return None
            weight = self._cached_dense_weight()
            if weight is None:
                return None
            _measured_paths[key] = _fastest(
                {"structured": lambda: self._structured_forward(x, self._factors(), self.bias),
                 "dense": lambda: F.linear(x, weight, self.bias)},
                x.device, MEASURED_REPEATS,
            )
        if _measured_paths[key] == "dense":
            return self._cached_dense_weight()
        self._dense_weight_cache = None  # computed to be timed; not kept where it lost
        return None

    def _cached_dense_weight(self) -> Optional[torch.Tensor]:
        """The densified weight, computed once and reused until a factor changes; None where a factor's changes
        cannot be seen (created in inference mode)."""
        factors = self._factors()
        state = _tensor_state(factors)
        if state is None:
            return None
        cache = self._dense_weight_cache
        if cache is None or cache.state != state or any(ref() is not t for ref, t in zip(cache.factors, factors)):
            self._dense_weight_cache = None  # free the stale weight before computing the new one
            with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
                weight = self.dense_weight()
            cache = _DenseWeight(tuple(weakref.ref(t) for t in factors), state, weight)
            self._dense_weight_cache = cache
        return cache.weight

    # ----------------------------------------------------------------------------------------------------------------
    # Choice of the training path
    # ----------------------------------------------------------------------------------------------------------------

    def _training_weight(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """For a call that autograd records: the weight densified from the factors within the autograd graph, to
        apply to ``x`` in place of the structured multiply where ``training_path`` asks for it; else None.

        Recomputed at every call (the factors change at every step), under the caller's autocast; the factors get
        their gradients through it. ``"auto"`` and ``"measured"`` never densify a weight over
        ``dense_weight_max_bytes``, nor measure while a graph is being traced or captured (the structured multiply
        runs there)."""
        path = self.training_path
        if path == "auto":
            path = "measured" if x.device.type in AUTO_MEASURED_DEVICE_TYPES else "structured"
        if path == "structured":
            return None
        if path == "measured" and not self._measured_dense_training(x):
            return None
        return self._densified(self._factors())

    def _measured_dense_training(self, x: torch.Tensor) -> bool:
        """``training_path="measured"``: whether training through the densified weight was timed faster on calls of
        this size (timed now if not yet)."""
        limit = self.dense_weight_max_bytes
        if (limit is not None and self.dense_weight_bytes() > limit) or not eager_autograd((x, *self._factors())):
            return False
        key = self._measurement_key(x.numel() // self.in_features, x.device, self._factors()[0].dtype)
        if key not in _measured_training_paths:
            if graph_capture_underway(x.device):
                return False
            _measured_training_paths[key] = self._fastest_training_path(x)
        return _measured_training_paths[key] == "dense"

    def _fastest_training_path(self, x: torch.Tensor) -> str:
        """Times forward and backward of both training paths on detached copies of ``x`` and the parameters."""

        def leaf(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.detach().requires_grad_(t.requires_grad)

        x, bias, factors = leaf(x), leaf(self.bias), tuple(leaf(t) for t in self._factors())
        inputs = [t for t in (x, bias, *factors) if t is not None and t.requires_grad]

        def forward_and_backward(forward: Callable[[], torch.Tensor]) -> Callable[[], object]:
            def run() -> object:
                y = forward()
                return torch.autograd.grad(y, inputs, torch.ones_like(y))

            return run

        # The timing's own graphs keep their tensors as they are: a caller's saved-tensor hooks (non-reentrant
        # activation checkpointing counts and recomputes what the step saves, offloading moves it) are not for them.
        with torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged):
            return _fastest(
                {"structured": forward_and_backward(lambda: self._structured_forward(x, factors, bias)),
                 "dense": forward_and_backward(lambda: F.linear(x, self._densified(factors), bias))},
                x.device, MEASURED_REPEATS,
            )

    def _apply(self, fn, recurse=True):
        # `.to()`, `.half()`, `.cuda()` may swap a parameter's storage under the same tensor object and version.
        self._dense_weight_cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_dense_weight_cache"] = None  # weak references do not pickle; the weight is recomputed on demand
        return state

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The exact ``(out_features, in_features)`` matrix this layer applies (bias excluded)."""
        factors = self._factors()
        with torch.autocast(factors[0].device.type, enabled=False):
            return self._densified(factors).contiguous()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with exactly this layer's weight and bias (reverse sparsification)."""
        weight = self.dense_weight()
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @classmethod
    def _uninitialised(cls, weight: torch.Tensor, nblocks: int, bias: bool, **kwargs) -> "_StructuredLinear":
        """A layer shaped for the dense ``weight``, without the random initialisation that a projection overwrites."""
        out_features, in_features = weight.shape
        return torch.nn.utils.skip_init(
            cls, in_features, out_features, nblocks, bias=bias, device=weight.device, dtype=weight.dtype, **kwargs
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        nblocks: int = 4,
        *,
        projection_dtype: torch.dtype = torch.float64,
        return_error: bool = False,
        **kwargs,
    ):
        """Build the layer from a dense linear layer with the Frobenius-optimal projection.

        Accepts ``nn.Linear``, transformers' GPT-2 ``Conv1D`` (whose weight is stored transposed) and the layers of
        this module. The result has the source's device and dtype; the projection runs in ``projection_dtype``
        (float32 is about 2x faster, with errors of float32 size). With ``return_error``, returns ``(layer, relative
        Frobenius error of the projection)``. Other keyword arguments go to the constructor.
        """
        if not isinstance(linear, nn.Module):
            raise TypeError(f"`linear` must be an nn.Module, got {type(linear).__name__}.")
        weight, bias = dense_weight_and_bias(linear)
        bias = None if bias is None else bias.detach()
        layer, error = cls._from_dense(weight.detach(), bias, nblocks, projection_dtype, **kwargs)
        return (layer, error) if return_error else layer

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}, "
            f"bias={self.bias is not None}"
        )
        for name in ("inference_path", "training_path"):
            if getattr(self, name) != "auto":
                text += f", {name}={getattr(self, name)!r}"
        return text


class MonarchLinear(_StructuredLinear):
    """A linear layer whose weight is a two-factor Monarch matrix (block-diagonal, permutation, block-diagonal).

    Args:
        in_features (`int`): size of each input sample.
        out_features (`int`): size of each output sample.
        nblocks (`int`, defaults to 4): number of blocks of each factor, between 1 and ``min(in, out)``. Sizes it does
            not divide are handled by zero-padding the input and truncating the output.
        bias (`bool`, defaults to `True`): whether to add a learnable bias.
        backend (`str`, defaults to `"auto"`): ``"auto"`` runs the path that ``AUTO_BACKENDS`` names for the
            input's device type: the PyTorch path everywhere, since ``benchmarks/bench_gpu.py`` measured the Triton
            kernel slower on an H200 (a one-time log line says which path runs); ``"torch"`` or ``"triton"`` force a
            path.
        inference_path (`str`, defaults to `"auto"`): how the layer applies itself where autograd records nothing and
            no graph is being captured (``torch.compile``, ``torch.export``, ONNX). ``"structured"``: the structured
            multiply; ``"dense"``: the densified weight, computed once, cached on the layer (not in its state dict)
            and recomputed when a factor changes (in place, by reassignment, by ``load_state_dict`` or ``.to()``);
            ``"auto"``: the densified weight where the structured multiply saves fewer than ``AUTO_MIN_FLOP_SAVING``
            times the FLOPs and the weight fits in ``dense_weight_max_bytes``, else the structured multiply; on
            CUDA (``AUTO_MEASURED_DEVICE_TYPES``), where no FLOP rule predicts the winner, as ``"measured"``. Both
            paths are exact (equal up to floating-point rounding). Training (see ``training_path``) and tracing
            never use the cached weight. ``"measured"``: whichever of the two was faster when timed on the first
            inference call of this shape and size (``MEASURED_REPEATS``; opt-in on CPU, since the winner may differ
            between runs on a busy machine).
            ``set_structured_inference_path`` sets it for a whole model.
        dense_weight_max_bytes (`int` or `None`, defaults to 160 MiB): the most memory ``"auto"`` and ``"measured"``
            may spend on the densified weight (``in_features * out_features`` elements); None for no limit.
            ``"dense"`` ignores it.
        training_path (`str`, defaults to `"auto"`): how the layer applies itself where autograd records the call.
            ``"structured"``: the structured multiply; ``"dense"``: the weight densified from the factors at each
            call, inside the autograd graph (the factors get exactly their gradients through it), then one dense
            GEMM; ``"measured"``: whichever of the two was faster in a forward and backward timed on the first
            training call of this shape and size; ``"auto"``: the structured multiply on CPU, ``"measured"`` on
            CUDA, where in bfloat16 cuBLAS beats the structured multiply on small layers. ``"auto"`` and
            ``"measured"`` keep the structured multiply while a graph is traced or captured and for weights over
            ``dense_weight_max_bytes``. ``set_structured_training_path`` sets it for a whole model.

    Parameters ``blkdiag1`` ``(b, q, p)`` and ``blkdiag2`` ``(b, s, q)`` with ``b = nblocks``, ``p = ⌈in/b⌉``,
    ``s = ⌈out/b⌉``, ``q = min(p, s)``. The layer computes ``y = x Wᵀ + bias`` with

        ``W = P_out · blockdiag(blkdiag2) · P_mid · blockdiag(blkdiag1)``

    where input block κ is features ``[κp, (κ+1)p)``, intermediate feature ``f = κq + t`` goes to column ``f // b``
    of second-factor block ``f mod b``, and row σ of second-factor block λ is output ``σb + λ`` (see the module
    docstring). It uses ``2·(b·q·p + b·s·q)`` FLOPs per token against ``2·in·out`` for ``nn.Linear``.

    Initialisation gives the output variance of an ``nn.Linear`` of the same shape (``Var(x)/3``): the first factor
    preserves the variance (``U(±√(3/p))``) and the second scales it by 1/3 (``U(±1/√q)``).
    """

    _FACTORS = ("blkdiag1", "blkdiag2")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int = 4,
        bias: bool = True,
        device=None,
        dtype=None,
        backend: Backend = "auto",
        inference_path: InferencePath = "auto",
        dense_weight_max_bytes: Optional[int] = DEFAULT_DENSE_WEIGHT_MAX_BYTES,
        training_path: TrainingPath = "auto",
    ) -> None:
        super().__init__(
            in_features, out_features, nblocks, bias, device, dtype, inference_path, dense_weight_max_bytes,
            training_path,
        )
        shape1, shape2 = monarch_factor_shapes(in_features, out_features, nblocks)
        self.blkdiag1 = nn.Parameter(torch.empty(shape1, device=device, dtype=dtype))
        self.blkdiag2 = nn.Parameter(torch.empty(shape2, device=device, dtype=dtype))
        self.backend = backend
        self.reset_parameters()

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in _BACKENDS:
            raise ValueError(f"`backend` must be one of {_BACKENDS}, got {value!r}.")
        self._backend = value

    def _factor_init_bounds(self) -> dict[str, float]:
        _, inner, in_block = self.blkdiag1.shape
        return {"blkdiag1": math.sqrt(3.0 / in_block), "blkdiag2": 1.0 / math.sqrt(inner)}

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend != "auto":
            return self.backend == "triton"
        # The Triton autograd.Function is opaque to torch.compile and torch.func; they get the PyTorch path.
        if torch.compiler.is_compiling():
            return False
        path = AUTO_BACKENDS.get(x.device.type, "torch")
        if path == "triton" and not triton_supported(x):
            path = "torch"
        _log_auto_choice_once(x.device.type, path)
        return path == "triton" and not torch._C._functorch.is_functorch_wrapped_tensor(x)

    def _multiply(
        self, x: torch.Tensor, factors: tuple[torch.Tensor, ...], bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        w1, w2 = factors
        if not self._use_triton(x):
            return monarch_multiply(x, w1, w2, bias)
        x, w1, w2 = (autocast_input(t) for t in (x, w1, w2))  # the kernel is opaque to autocast
        return _plus_bias(monarch_multiply_triton(x, w1, w2), bias)

    @classmethod
    def _from_dense(cls, weight, bias, nblocks, projection_dtype, **kwargs):
        layer = cls._uninitialised(weight, nblocks, bias is not None, **kwargs)
        blkdiag1, blkdiag2, error = project_monarch(weight, nblocks, dtype=projection_dtype, return_error=True)
        with torch.no_grad():
            layer.blkdiag1.copy_(blkdiag1)
            layer.blkdiag2.copy_(blkdiag2)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer, error


class BlockdiagLinear(_StructuredLinear):
    """A linear layer whose weight is block-diagonal: output block k is ``weight[k] @ x_k``.

    Args:
        in_features (`int`): size of each input sample.
        out_features (`int`): size of each output sample.
        nblocks (`int`, defaults to 4): number of diagonal blocks, between 1 and ``min(in, out)``.
        bias (`bool`, defaults to `True`): whether to add a learnable bias.
        inference_path (`str`, defaults to `"auto"`), dense_weight_max_bytes (`int` or `None`, defaults to 160 MiB),
            training_path (`str`, defaults to `"auto"`): the choice between the block-diagonal multiply and the
            densified weight in inference and in training, as for `MonarchLinear`.

    ``weight`` has shape ``(b, ⌈out/b⌉, ⌈in/b⌉)``, exactly as the released M2-BERT checkpoints store it; input block k
    is features ``[k·⌈in/b⌉, (k+1)·⌈in/b⌉)`` and output block k is the next ``⌈out/b⌉`` outputs, so the dense weight
    is ``block_diag(weight[0], …, weight[b-1])`` (truncated to ``out × in``). Initialisation ``U(±1/√⌈in/b⌉)`` gives
    the output variance of an ``nn.Linear`` of the same shape.
    """

    _FACTORS = ("weight",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int = 4,
        bias: bool = True,
        device=None,
        dtype=None,
        inference_path: InferencePath = "auto",
        dense_weight_max_bytes: Optional[int] = DEFAULT_DENSE_WEIGHT_MAX_BYTES,
        training_path: TrainingPath = "auto",
    ) -> None:
        super().__init__(
            in_features, out_features, nblocks, bias, device, dtype, inference_path, dense_weight_max_bytes,
            training_path,
        )
        shape = blockdiag_factor_shape(in_features, out_features, nblocks)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.reset_parameters()

    def _factor_init_bounds(self) -> dict[str, float]:
        return {"weight": 1.0 / math.sqrt(self.weight.shape[-1])}

    def _multiply(
        self, x: torch.Tensor, factors: tuple[torch.Tensor, ...], bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return _plus_bias(blockdiag_multiply(x, factors[0]), bias)

    @classmethod
    def _from_dense(cls, weight, bias, nblocks, projection_dtype, **kwargs):
        layer = cls._uninitialised(weight, nblocks, bias is not None, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(project_blockdiag(weight, nblocks))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer, projection_error(weight, nblocks, "blockdiag", dtype=projection_dtype)


def _log_auto_choice_once(device_type: str, path: str) -> None:
    """Say, once per process and device type, which multiply ``backend="auto"`` runs there (outside torch.compile and
    torch.func, which always get the PyTorch path)."""
    if device_type in _auto_choices_logged:
        return
    _auto_choices_logged.add(device_type)
    message = f"MonarchLinear(backend='auto') runs the {_PATH_NAMES[path]} on {device_type} tensors"
    if device_type == "cuda" and path == "torch":
        if AUTO_BACKENDS.get(device_type) == "triton":
            message += " (Triton is not installed)"
        else:
            message += (
                "; the Triton kernel is opt-in (backend='triton' or m2_hf.set_monarch_backend): "
                "benchmarks/bench_gpu.py measured it slower on an H200"
            )
    logger.info(message + ".")


def structured_layers(model: nn.Module) -> dict[str, "_StructuredLinear"]:
    """The ``MonarchLinear`` and ``BlockdiagLinear`` layers of ``model`` by module name, in ``named_modules`` order
    (after a conversion: the layers it replaced)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, _StructuredLinear)}


def set_monarch_backend(model: nn.Module, backend: Backend) -> int:
    """Set the multiply backend (``"auto"``, ``"torch"`` or ``"triton"``) of every ``MonarchLinear`` in ``model``.

    Returns the number of layers changed.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"`backend` must be one of {_BACKENDS}, got {backend!r}.")
    layers = [module for module in model.modules() if isinstance(module, MonarchLinear)]
    for layer in layers:
        layer.backend = backend
    return len(layers)


_KEEP = object()


def set_structured_inference_path(
    model: nn.Module, inference_path: InferencePath, *, dense_weight_max_bytes: Optional[int] = _KEEP
) -> int:
    """Set ``inference_path`` (``"auto"``, ``"structured"``, ``"dense"``, ``"measured"``) of every ``MonarchLinear``
    and ``BlockdiagLinear`` in ``model``, and their ``dense_weight_max_bytes`` if given (None: no limit).

    Returns the number of layers changed. Cached densified weights of layers that no longer use them are freed.
    """
    _check_inference_path(inference_path)
    if dense_weight_max_bytes is not _KEEP:
        _check_dense_weight_max_bytes(dense_weight_max_bytes)
    layers = list(structured_layers(model).values())
    for layer in layers:
        layer.inference_path = inference_path
        if dense_weight_max_bytes is not _KEEP:
            layer.dense_weight_max_bytes = dense_weight_max_bytes
        unused = layer.inference_path == "structured" or (
            layer.inference_path == "auto" and layer.prefers_dense_weight() is False
        )
        if unused:
            layer._dense_weight_cache = None
    return len(layers)


def set_structured_training_path(model: nn.Module, training_path: TrainingPath) -> int:
    """Set ``training_path`` (``"auto"``, ``"structured"``, ``"dense"``, ``"measured"``) of every ``MonarchLinear``
    and ``BlockdiagLinear`` in ``model``: how they apply themselves where autograd records the call.

    Returns the number of layers changed.
    """
    _check_training_path(training_path)
    layers = list(structured_layers(model).values())
    for layer in layers:
        layer.training_path = training_path
    return len(layers)
