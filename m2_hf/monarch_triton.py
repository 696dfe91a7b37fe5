"""Triton implementation of the Monarch multiply built from one strided batched matmul.

The Monarch multiply (HazyResearch/fly convention) maps ``x`` of shape
``(N, k*p)`` through two block-diagonal factors ``w1`` ``(k, q, p)`` and
``w2`` ``(l, s, r)`` (with ``k*q == l*r``) to ``y`` of shape ``(N, l*s)``::

    h[n, κ*q + t] = Σ_i w1[κ, t, i] * x[n, κ*p + i]
    g[λ, n, ρ]    = h[n, ρ*l + λ]                       # a permutation of h
    y[n, σ*l + λ] = Σ_ρ w2[λ, σ, ρ] * g[λ, n, ρ]

A straightforward PyTorch version spends much of its time materialising
``transpose``/``permute``/``reshape`` copies of the activations between the
two ``bmm`` calls.  Every one of those permutations is, however, just a
different set of strides over the same memory.  So this module has a single
Triton kernel, a batched matmul ``C[β, m, n] = Σ_k A[β, m, k] B[β, k, n]`` in
which A, B and C each take arbitrary (batch, row, col) strides, and expresses
each step of the forward pass (2 launches) and backward pass (4 launches:
``dh``, ``dx``, ``dw1``, ``dw2``) as that kernel applied to strided views of
``x``, ``h``, ``dy``, the weights and the outputs.  No activation is ever
copied; the only extra buffers are ``h`` / ``dh`` themselves.

Triton is an optional dependency (the ``[triton]`` extra).  This module always
imports; :data:`TRITON_AVAILABLE` says whether the kernels can be used and
:func:`triton_supported` tells a caller whether to route a given tensor here.
To run on CPU through Triton's interpreter, set ``TRITON_INTERPRET=1`` *before*
this module is imported: Triton decides at decoration time whether a kernel is
compiled or interpreted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only without the extra
    triton = None
    tl = None
    TRITON_AVAILABLE = False

__all__ = ["TRITON_AVAILABLE", "monarch_multiply_triton", "triton_supported"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Weight gradients reduce over all N tokens into a handful of small tiles; without
# splitting that reduction only ``batch`` programs would run on the whole GPU.
_SPLIT_K_MIN_PROGRAMS = 128
_SPLIT_K_MIN_CHUNK = 1024


def _interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_supported(x: torch.Tensor) -> bool:
    """Whether :func:`monarch_multiply_triton` can run on ``x``'s device."""
    return TRITON_AVAILABLE and (x.is_cuda or _interpreter_enabled())


def _require_triton(x: torch.Tensor) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError(
            "monarch_multiply_triton needs Triton; install it with `pip install m2-hf[triton]`."
        )
    if not triton_supported(x):
        raise RuntimeError(
            f"monarch_multiply_triton needs CUDA tensors (got device {x.device}); "
            "set TRITON_INTERPRET=1 before importing triton to run on CPU."
        )


if TRITON_AVAILABLE:

    @triton.jit
    def _strided_bmm_kernel(
        a_ptr, b_ptr, c_ptr,
        M, N, K, k_per_split, num_splits,
        stride_ab, stride_am, stride_ak,
        stride_bb, stride_bk, stride_bn,
        stride_cs, stride_cb, stride_cm, stride_cn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        INPUT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    ):
        # m-tiles go on grid axis 0 because only that axis may exceed 65535
        # programs, and the token dimension can be huge.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_batch_split = tl.program_id(2)
        batch = pid_batch_split // num_splits
        split = pid_batch_split % num_splits
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)

        # 64-bit offsets: row strides times token counts overflow int32 for large N.
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        a_batch = a_ptr + batch.to(tl.int64) * stride_ab
        b_batch = b_ptr + batch.to(tl.int64) * stride_bb
        mask_m = offs_m[:, None] < M
        mask_n = offs_n[None, :] < N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + offs_k
            a = tl.load(
                a_batch + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                mask=mask_m & (ks[None, :] < k_end),
                other=0.0,
            )
            b = tl.load(
                b_batch + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                mask=(ks[:, None] < k_end) & mask_n,
                other=0.0,
            )
            if UPCAST_OPERANDS:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

        c = (
            c_ptr
            + split.to(tl.int64) * stride_cs
            + batch.to(tl.int64) * stride_cb
            + offs_m[:, None] * stride_cm
            + offs_n[None, :] * stride_cn
        )
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m & mask_n)


@dataclass(frozen=True)
class _StridedOperand:
    """A tensor's storage seen as a (batch, rows, cols) operand via explicit strides."""

    tensor: torch.Tensor
    batch_stride: int
    row_stride: int
    col_stride: int


def _next_pow2_clamped(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(n, 1))))


def _tile_sizes(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int]:
    # tl.dot needs every tile dim >= 16; half precision tiles are half the bytes,
    # so they can afford a deeper K step for the same shared memory.
    max_block_k = 32 if dtype == torch.float32 else 64
    return (
        _next_pow2_clamped(m, 16, 64),
        _next_pow2_clamped(n, 16, 64),
        _next_pow2_clamped(k, 16, max_block_k),
    )


def _dot_input_precision(dtype: torch.dtype) -> str:
    # Follow torch's fp32 matmul policy so results agree with the eager reference.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _needs_operand_upcast(dtype: torch.dtype) -> bool:
    # Triton's interpreter keeps bf16 as raw uint16 bits and feeds them straight to
    # np.matmul, so bf16 tl.dot is garbage there; compiled kernels are unaffected.
    return dtype == torch.bfloat16 and _interpreter_enabled()


def _choose_split_k(output_programs: int, k: int, block_k: int) -> int:
    if output_programs >= _SPLIT_K_MIN_PROGRAMS:
        return 1
    wanted = triton.cdiv(_SPLIT_K_MIN_PROGRAMS, output_programs)
    affordable = max(1, k // max(_SPLIT_K_MIN_CHUNK, block_k))
    return min(wanted, affordable)


def _launch_strided_bmm(
    a: _StridedOperand,
    b: _StridedOperand,
    c: _StridedOperand,
    batch: int,
    m: int,
    n: int,
    k: int,
    split_k: int | None = None,
) -> None:
    """``c[β] = a[β] @ b[β]`` for β < batch, written in place into ``c.tensor``.

    ``split_k`` > 1 divides the reduction across programs, accumulating the partial
    products in an fp32 workspace of c's (small) size; ``None`` picks it heuristically.
    """
    if batch == 0 or m == 0 or n == 0:
        return
    block_m, block_n, block_k = _tile_sizes(m, n, k, a.tensor.dtype)
    m_tiles, n_tiles = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    if split_k is None:
        split_k = _choose_split_k(batch * m_tiles * n_tiles, k, block_k)
    # Keep each split's range a whole number of K tiles so only the last is ragged.
    k_per_split = triton.cdiv(triton.cdiv(max(k, 1), split_k), block_k) * block_k
    split_k = max(1, triton.cdiv(k, k_per_split))

    if split_k == 1:
        out, split_stride = c, 0
    else:
        workspace = torch.empty(split_k, batch, m, n, device=c.tensor.device, dtype=torch.float32)
        ws = workspace.stride()
        out, split_stride = _StridedOperand(workspace, ws[1], ws[2], ws[3]), ws[0]

    grid = (m_tiles, n_tiles, batch * split_k)
    with _device_guard(c.tensor):
        _strided_bmm_kernel[grid](
            a.tensor, b.tensor, out.tensor,
            m, n, k, k_per_split, split_k,
            a.batch_stride, a.row_stride, a.col_stride,
            b.batch_stride, b.row_stride, b.col_stride,
            split_stride, out.batch_stride, out.row_stride, out.col_stride,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            INPUT_PRECISION=_dot_input_precision(a.tensor.dtype),
            UPCAST_OPERANDS=_needs_operand_upcast(a.tensor.dtype),
            num_warps=4,
        )
    if split_k > 1:
        c_view = torch.as_strided(
            c.tensor, (batch, m, n), (c.batch_stride, c.row_stride, c.col_stride),
            c.tensor.storage_offset(),
        )
        c_view.copy_(workspace.sum(dim=0))


def _device_guard(t: torch.Tensor):
    # Triton launches on the *current* CUDA device, which may differ from t's.
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return _NullContext()


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _validate_inputs(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, k*p), got shape {tuple(x.shape)}")
    if w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"w1 and w2 must be 3-D, got w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)}"
        )
    k, q, p = w1.shape
    l, s, r = w2.shape
    if x.shape[1] != k * p:
        raise ValueError(
            f"x has {x.shape[1]} features but w1 {tuple(w1.shape)} expects k*p = {k * p}"
        )
    if k * q != l * r:
        raise ValueError(
            f"inner sizes disagree: w1 {tuple(w1.shape)} gives k*q = {k * q} but "
            f"w2 {tuple(w2.shape)} gives l*r = {l * r}"
        )
    if not (x.dtype == w1.dtype == w2.dtype):
        raise ValueError(f"dtypes must match, got x {x.dtype}, w1 {w1.dtype}, w2 {w2.dtype}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {x.dtype}; expected one of {_SUPPORTED_DTYPES}")
    if not (x.device == w1.device == w2.device):
        raise ValueError(
            f"devices must match, got x {x.device}, w1 {w1.device}, w2 {w2.device}"
        )


def _with_unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # Any row stride is fine for the kernel; a unit column stride keeps loads coalesced.
    return t if t.stride(-1) == 1 else t.contiguous()


# Each helper below is one launch; the comments give the index equation it computes.


def _first_factor(x, w1, h):
    # h[n, κ*q + t] = Σ_i x[n, κ*p + i] w1[κ, t, i]
    k, q, p = w1.shape
    xs0, xs1 = x.stride()
    _launch_strided_bmm(
        _StridedOperand(x, p * xs1, xs0, xs1),
        _StridedOperand(w1, w1.stride(0), w1.stride(2), w1.stride(1)),
        _StridedOperand(h, q * h.stride(1), h.stride(0), h.stride(1)),
        batch=k, m=x.shape[0], n=q, k=p,
    )


def _second_factor(h, w2, y):
    # y[n, σ*l + λ] = Σ_ρ h[n, ρ*l + λ] w2[λ, σ, ρ]
    l, s, r = w2.shape
    hs0, hs1 = h.stride()
    ys0, ys1 = y.stride()
    _launch_strided_bmm(
        _StridedOperand(h, hs1, hs0, l * hs1),
        _StridedOperand(w2, w2.stride(0), w2.stride(2), w2.stride(1)),
        _StridedOperand(y, ys1, ys0, l * ys1),
        batch=l, m=h.shape[0], n=s, k=r,
    )


def _grad_h(dy, w2, dh):
    # dh[n, ρ*l + λ] = Σ_σ dy[n, σ*l + λ] w2[λ, σ, ρ]
    l, s, r = w2.shape
    ds0, ds1 = dy.stride()
    hs0, hs1 = dh.stride()
    _launch_strided_bmm(
        _StridedOperand(dy, ds1, ds0, l * ds1),
        _StridedOperand(w2, w2.stride(0), w2.stride(1), w2.stride(2)),
        _StridedOperand(dh, hs1, hs0, l * hs1),
        batch=l, m=dy.shape[0], n=r, k=s,
    )


def _grad_x(dh, w1, dx):
    # dx[n, κ*p + i] = Σ_t dh[n, κ*q + t] w1[κ, t, i]
    k, q, p = w1.shape
    hs0, hs1 = dh.stride()
    xs0, xs1 = dx.stride()
    _launch_strided_bmm(
        _StridedOperand(dh, q * hs1, hs0, hs1),
        _StridedOperand(w1, w1.stride(0), w1.stride(1), w1.stride(2)),
        _StridedOperand(dx, p * xs1, xs0, xs1),
        batch=k, m=dh.shape[0], n=p, k=q,
    )


def _grad_w1(dh, x, dw1):
    # dw1[κ, t, i] = Σ_n dh[n, κ*q + t] x[n, κ*p + i]
    k, q, p = dw1.shape
    hs0, hs1 = dh.stride()
    xs0, xs1 = x.stride()
    _launch_strided_bmm(
        _StridedOperand(dh, q * hs1, hs1, hs0),
        _StridedOperand(x, p * xs1, xs0, xs1),
        _StridedOperand(dw1, *dw1.stride()),
        batch=k, m=q, n=p, k=x.shape[0],
    )


def _grad_w2(dy, h, dw2):
    # dw2[λ, σ, ρ] = Σ_n dy[n, σ*l + λ] h[n, ρ*l + λ]
    l, s, r = dw2.shape
    ds0, ds1 = dy.stride()
    hs0, hs1 = h.stride()
    _launch_strided_bmm(
        _StridedOperand(dy, ds1, l * ds1, ds0),
        _StridedOperand(h, hs1, hs0, l * hs1),
        _StridedOperand(dw2, *dw2.stride()),
        batch=l, m=s, n=r, k=dy.shape[0],
    )


class _MonarchMultiply(torch.autograd.Function):
    """Autograd wrapper; ``h`` is returned as a second output only so it can be saved."""

    @staticmethod
    def forward(x, w1, w2):
        n = x.shape[0]
        k, q, _ = w1.shape
        l, s, _ = w2.shape
        h = torch.empty(n, k * q, device=x.device, dtype=x.dtype)
        y = torch.empty(n, l * s, device=x.device, dtype=x.dtype)
        _first_factor(x, w1, h)
        _second_factor(h, w2, y)
        return y, h

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w1, w2 = inputs
        _, h = output
        ctx.mark_non_differentiable(h)
        ctx.save_for_backward(x, w1, w2, h)

    @staticmethod
    @once_differentiable  # the kernels are opaque to autograd: fail loudly on double backward
    def backward(ctx, dy, _unused_dh):
        x, w1, w2, h = ctx.saved_tensors
        need_x, need_w1, need_w2 = ctx.needs_input_grad
        dx = dw1 = dw2 = None
        if need_w2:
            dw2 = torch.empty(w2.shape, device=w2.device, dtype=w2.dtype)
            _grad_w2(dy, h, dw2)
        if need_x or need_w1:
            dh = torch.empty_like(h)
            _grad_h(dy, w2, dh)
            if need_x:
                dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
                _grad_x(dh, w1, dx)
            if need_w1:
                dw1 = torch.empty(w1.shape, device=w1.device, dtype=w1.dtype)
                _grad_w1(dh, x, dw1)
        return dx, dw1, dw2


def monarch_multiply_triton(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Monarch multiply ``y = M(w1, w2) x`` with Triton kernels, differentiable in all inputs.

    Args:
        x: ``(N, k*p)``; any row stride is accepted.
        w1: first block-diagonal factor ``(k, q, p)``.
        w2: second block-diagonal factor ``(l, s, r)`` with ``l*r == k*q``.

    Returns:
        ``(N, l*s)`` tensor in ``x``'s dtype.
    """
    _validate_inputs(x, w1, w2)
    _require_triton(x)
    y, _ = _MonarchMultiply.apply(_with_unit_last_stride(x), w1, w2)
    return y
