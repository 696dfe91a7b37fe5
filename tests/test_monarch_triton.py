"""Tests for the strided-Triton Monarch multiply, run on CPU through Triton's interpreter."""

import os
import subprocess
import sys

# Triton decides at kernel-decoration time whether to interpret, so this must
# precede the first import of m2_hf.monarch_triton.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton")

import m2_hf.monarch_triton as monarch_triton  # noqa: E402
from m2_hf.monarch import monarch_multiply  # noqa: E402
from m2_hf.monarch_triton import (  # noqa: E402
    TRITON_AVAILABLE,
    monarch_multiply_triton,
    triton_supported,
)


reference = monarch_multiply


def make_inputs(n, w1_shape, w2_shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k, _, p = w1_shape
    x = torch.randn(n, k * p, generator=gen, dtype=dtype)
    w1 = torch.randn(*w1_shape, generator=gen, dtype=dtype) / w1_shape[2] ** 0.5
    w2 = torch.randn(*w2_shape, generator=gen, dtype=dtype) / w2_shape[2] ** 0.5
    return x, w1, w2


def values_and_grads(fn, x, w1, w2, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w1, w2)]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


def assert_matches_reference(x, w1, w2, rtol, atol, seed=1):
    l, s, _ = w2.shape
    dy = torch.randn(x.shape[0], l * s, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    y, grads = values_and_grads(monarch_multiply_triton, x, w1, w2, dy)
    y_ref, grads_ref = values_and_grads(reference, x, w1, w2, dy)
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    for name, g, g_ref in zip(("x", "w1", "w2"), grads, grads_ref):
        assert g is not None, f"missing gradient for {name}"
        torch.testing.assert_close(g, g_ref, rtol=rtol, atol=atol, msg=lambda m: f"d{name}: {m}")


SHAPES = {
    "square": (32, (4, 16, 16), (4, 16, 16)),
    "wide_out": (24, (4, 16, 16), (4, 48, 16)),
    "wide_in": (24, (4, 16, 48), (4, 16, 16)),
    "ragged": (37, (3, 12, 20), (3, 20, 12)),
    "k_ne_l": (19, (2, 24, 10), (3, 20, 16)),
    "tiny_blocks": (5, (8, 2, 3), (4, 7, 4)),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_reference_fp32(name):
    n, w1_shape, w2_shape = SHAPES[name]
    assert_matches_reference(*make_inputs(n, w1_shape, w2_shape), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["ragged", "k_ne_l"])
def test_fp32_gradients_against_float64_reference(name):
    # The float64 reference is (to fp32 rounding) the exact answer, so this checks
    # the kernel's fp32 accumulation rather than agreement between two fp32 paths.
    n, w1_shape, w2_shape = SHAPES[name]
    x, w1, w2 = make_inputs(n, w1_shape, w2_shape)
    dy = torch.randn(n, w2_shape[0] * w2_shape[1], generator=torch.Generator().manual_seed(3))
    y, grads = values_and_grads(monarch_multiply_triton, x, w1, w2, dy)
    y64, grads64 = values_and_grads(reference, x.double(), w1.double(), w2.double(), dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-5, atol=1e-5)


def test_finite_difference_gradcheck():
    # Directional finite differences of the (float32) Triton function, to validate
    # backward independently of the reference's autograd.
    x, w1, w2 = make_inputs(6, (2, 16, 4), (2, 8, 16))
    dy = torch.randn(6, 16, generator=torch.Generator().manual_seed(5))
    _, grads = values_and_grads(monarch_multiply_triton, x, w1, w2, dy)
    eps = 1e-2
    for i, g in enumerate(grads):
        direction = torch.randn(g.shape, generator=torch.Generator().manual_seed(10 + i))
        args_plus = [x, w1, w2]
        args_minus = [x, w1, w2]
        args_plus[i] = args_plus[i] + eps * direction
        args_minus[i] = args_minus[i] - eps * direction
        # The function is bilinear, so central differences are exact up to rounding.
        numeric = ((monarch_multiply_triton(*args_plus) - monarch_multiply_triton(*args_minus)) * dy).sum() / (2 * eps)
        analytic = (g * direction).sum()
        torch.testing.assert_close(numeric, analytic, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_values_and_grads(dtype):
    x, w1, w2 = make_inputs(20, (4, 16, 16), (4, 16, 16))
    dy = torch.randn(20, 64, generator=torch.Generator().manual_seed(4))
    low = [t.to(dtype) for t in (x, w1, w2, dy)]
    y, grads = values_and_grads(monarch_multiply_triton, *low)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    # Compare against fp32 maths on the same (rounded) inputs; the tolerance covers
    # rounding of h and of the outputs to the half-precision dtype.
    y_ref, grads_ref = values_and_grads(reference, *[t.float() for t in low])
    torch.testing.assert_close(y.float(), y_ref, rtol=3e-2, atol=3e-2)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.float(), g_ref, rtol=3e-2, atol=1e-1)


def test_non_contiguous_rows():
    x_wide, w1, w2 = make_inputs(21, (3, 12, 40), (3, 20, 12))
    x = x_wide[:, :60]  # (21, 60) with row stride 120
    assert not x.is_contiguous() and x.stride(-1) == 1
    assert_matches_reference(x, w1[:, :, :20].contiguous(), w2, rtol=1e-4, atol=1e-4)


def test_transposed_x_and_strided_weights():
    x, w1, w2 = make_inputs(17, (2, 16, 16), (2, 16, 16))
    x_t = x.t().contiguous().t()  # last stride != 1: falls back to a copy
    w1_t = w1.transpose(1, 2).contiguous().transpose(1, 2)  # arbitrary weight strides
    assert x_t.stride(-1) != 1
    assert_matches_reference(x_t, w1_t, w2, rtol=1e-4, atol=1e-4)


def test_needs_input_grad_respected():
    x, w1, w2 = make_inputs(9, (2, 16, 16), (2, 16, 16))
    w2 = w2.clone().requires_grad_(True)
    monarch_multiply_triton(x, w1, w2).sum().backward()
    assert w2.grad is not None
    torch.testing.assert_close(
        w2.grad, torch.autograd.grad(reference(x, w1, w2).sum(), w2)[0], rtol=1e-4, atol=1e-4
    )


def test_split_k_weight_gradients(monkeypatch):
    # Force the split-reduction path used for weight gradients at large N.
    monkeypatch.setattr(monarch_triton, "_SPLIT_K_MIN_CHUNK", 16)
    assert_matches_reference(*make_inputs(100, (2, 16, 16), (2, 16, 16)), rtol=1e-4, atol=1e-4)


def test_empty_batch():
    x, w1, w2 = make_inputs(0, (2, 16, 16), (2, 16, 16))
    assert monarch_multiply_triton(x, w1, w2).shape == (0, 32)


@pytest.mark.parametrize(
    "x_shape, w1_shape, w2_shape, match",
    [
        ((4, 30), (2, 16, 16), (2, 16, 16), "features"),
        ((4, 32), (2, 16, 16), (3, 16, 16), "inner sizes"),
        ((4, 2, 16), (2, 16, 16), (2, 16, 16), "2-D"),
        ((4, 32), (2, 16, 16, 1), (2, 16, 16), "3-D"),
    ],
)
def test_shape_mismatch_raises(x_shape, w1_shape, w2_shape, match):
    with pytest.raises(ValueError, match=match):
        monarch_multiply_triton(torch.randn(x_shape), torch.randn(w1_shape), torch.randn(w2_shape))


def test_dtype_mismatch_raises():
    x, w1, w2 = make_inputs(4, (2, 16, 16), (2, 16, 16))
    with pytest.raises(ValueError, match="dtypes"):
        monarch_multiply_triton(x, w1.double(), w2)


def test_module_imports_without_triton():
    # Blocking the import simulates an install without the [triton] extra.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from m2_hf.monarch_triton import TRITON_AVAILABLE, monarch_multiply_triton, triton_supported\n"
        "assert not TRITON_AVAILABLE and not triton_supported(torch.zeros(1))\n"
        "try:\n"
        "    monarch_multiply_triton(torch.zeros(2, 32), torch.zeros(2, 16, 16), torch.zeros(2, 16, 16))\n"
        "except RuntimeError as err:\n"
        "    assert '[triton]' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('expected RuntimeError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_triton_supported_under_interpreter():
    assert TRITON_AVAILABLE
    assert triton_supported(torch.zeros(1))


def test_the_triton_backend_takes_autocasts_casts():
    """The kernel is opaque to autocast: the layer casts its inputs as autocast would cast a matrix product's."""
    from m2_hf import MonarchLinear

    torch.manual_seed(0)
    layer = MonarchLinear(32, 48, 4, backend="triton", inference_path="structured")
    reference = MonarchLinear(32, 48, 4, backend="torch", inference_path="structured")
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(6, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = layer(x), reference(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
