"""The Monarch primitive: layers, closed-form projection, densification, numerics and errors."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from m2_hf import (
    BlockdiagLinear,
    MonarchLinear,
    monarch_factor_shapes,
    monarch_multiply,
    project_blockdiag,
    project_monarch,
    projection_error,
    set_monarch_backend,
)

SHAPES = [  # (in, out, nblocks): square, rectangular both ways, GPT-2 c_attn, sizes nblocks does not divide
    (48, 48, 4),
    (32, 128, 4),
    (128, 32, 4),
    (48, 144, 4),
    (10, 14, 4),
    (37, 23, 3),
    (30, 30, 7),
    (64, 64, 8),
    (9, 9, 9),
]


def relative_error(approx: torch.Tensor, target: torch.Tensor) -> float:
    return ((approx - target).norm() / target.norm()).item()


def random_monarch(in_features, out_features, nblocks, dtype=torch.float64, seed=0) -> MonarchLinear:
    torch.manual_seed(seed)
    layer = MonarchLinear(in_features, out_features, nblocks, dtype=dtype)
    with torch.no_grad():  # break the uniform init's symmetry so recovery is tested on generic members
        layer.blkdiag1.normal_()
        layer.blkdiag2.normal_()
    return layer


def dense_of_factors(w1, w2, in_features, out_features):
    eye = torch.eye(w1.shape[0] * w1.shape[2], dtype=w1.dtype)
    return monarch_multiply(eye, w1, w2)[:in_features, :out_features].t()


# --------------------------------------------------------------------------------------------------------------------
# Shapes and the layer's action
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "in_features,out_features,shape1,shape2",
    [
        (768, 768, (4, 192, 192), (4, 192, 192)),
        (768, 3072, (4, 192, 192), (4, 768, 192)),
        (3072, 768, (4, 192, 768), (4, 192, 192)),
        (768, 2304, (4, 192, 192), (4, 576, 192)),
        (1024, 4096, (4, 256, 256), (4, 1024, 256)),
    ],
)
def test_factor_shapes_follow_fly(in_features, out_features, shape1, shape2):
    assert monarch_factor_shapes(in_features, out_features, 4) == (shape1, shape2)
    layer = MonarchLinear(in_features, out_features, 4, device="meta")
    assert layer.blkdiag1.shape == shape1 and layer.blkdiag2.shape == shape2
    assert set(layer.state_dict()) == {"blkdiag1", "blkdiag2", "bias"}


@pytest.mark.parametrize("in_features,out_features,nblocks", SHAPES)
@pytest.mark.parametrize("cls", [MonarchLinear, BlockdiagLinear])
def test_dense_weight_is_the_layers_action(cls, in_features, out_features, nblocks):
    torch.manual_seed(0)
    layer = cls(in_features, out_features, nblocks, dtype=torch.float64)
    x = torch.randn(3, 5, in_features, dtype=torch.float64)
    expected = x @ layer.dense_weight().t() + layer.bias
    assert layer(x).shape == (3, 5, out_features)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    identity = torch.eye(in_features, dtype=torch.float64)
    torch.testing.assert_close((layer(identity) - layer.bias).t(), layer.dense_weight(), rtol=1e-12, atol=1e-12)


def test_dense_formula_with_explicit_permutations():
    """W = P_out · blockdiag(w2) · P_mid · blockdiag(w1), as documented."""
    b, n = 4, 32
    layer = random_monarch(n, n, b)
    w1, w2 = layer.blkdiag1.detach(), layer.blkdiag2.detach()
    q, s = w1.shape[1], w2.shape[1]
    p_mid = torch.zeros(b * q, b * q, dtype=torch.float64)
    for f in range(b * q):
        p_mid[(f % b) * q + f // b, f] = 1.0
    p_out = torch.zeros(b * s, b * s, dtype=torch.float64)
    for lam in range(b):
        for sigma in range(s):
            p_out[sigma * b + lam, lam * s + sigma] = 1.0
    expected = p_out @ torch.block_diag(*w2) @ p_mid @ torch.block_diag(*w1)
    torch.testing.assert_close(layer.dense_weight(), expected, rtol=1e-12, atol=1e-12)


def test_blockdiag_layout_matches_m2_checkpoints():
    torch.manual_seed(0)
    layer = BlockdiagLinear(768, 3072, nblocks=4)
    assert layer.weight.shape == (4, 768, 192)
    assert list(layer.state_dict()) == ["bias", "weight"]  # M2-BERT stores the bias first
    torch.testing.assert_close(layer.dense_weight(), torch.block_diag(*layer.weight.detach()))


def test_padding_and_truncation_for_indivisible_sizes():
    layer = random_monarch(10, 14, 4)
    assert layer.in_features_padded == 12 and layer.out_features_padded == 16
    assert layer.dense_weight().shape == (14, 10)
    assert layer(torch.randn(2, 10, dtype=torch.float64)).shape == (2, 14)


# --------------------------------------------------------------------------------------------------------------------
# Closed-form projection
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_features,out_features,nblocks", SHAPES)
def test_projection_recovers_monarch_matrices_exactly(in_features, out_features, nblocks):
    source = random_monarch(in_features, out_features, nblocks)
    rebuilt = MonarchLinear.from_linear(source.to_linear(), nblocks)
    assert relative_error(rebuilt.dense_weight(), source.dense_weight()) < 1e-10
    assert projection_error(source.dense_weight(), nblocks) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_runs_in_float64_whatever_the_dtype(dtype):
    source = random_monarch(96, 96, 4).to(dtype)
    rebuilt = MonarchLinear.from_linear(source.to_linear(), 4)
    assert rebuilt.blkdiag1.dtype == dtype
    target = source.dense_weight().double()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert relative_error(rebuilt.dense_weight().double(), target) < tolerance


@pytest.mark.parametrize("in_features,out_features,nblocks", SHAPES)
def test_projection_is_locally_optimal(in_features, out_features, nblocks):
    """No random perturbation of the projected factors lowers the Frobenius error."""
    torch.manual_seed(1)
    weight = torch.randn(out_features, in_features, dtype=torch.float64)
    w1, w2 = project_monarch(weight, nblocks)
    best = (dense_of_factors(w1, w2, in_features, out_features) - weight).norm()
    for _ in range(20):
        for eps in (1e-2, 1e-4):
            d1, d2 = torch.randn_like(w1), torch.randn_like(w2)
            perturbed = dense_of_factors(w1 + eps * d1, w2 + eps * d2, in_features, out_features)
            assert (perturbed - weight).norm() >= best - 1e-12


@pytest.mark.parametrize("in_features,out_features,nblocks", SHAPES)
@pytest.mark.parametrize("structure", ["monarch", "blockdiag"])
def test_projection_error_matches_the_built_layer(structure, in_features, out_features, nblocks):
    torch.manual_seed(2)
    linear = nn.Linear(in_features, out_features, dtype=torch.float64)
    cls = MonarchLinear if structure == "monarch" else BlockdiagLinear
    built = cls.from_linear(linear, nblocks)
    actual = relative_error(built.dense_weight(), linear.weight.detach())
    assert projection_error(linear.weight, nblocks, structure) == pytest.approx(actual, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(2, 40), data=st.data())
def test_square_monarch_never_worse_than_blockdiag(size, data):
    nblocks = data.draw(st.integers(1, size))
    seed = data.draw(st.integers(0, 2**16))
    weight = torch.randn(size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    blockdiag = BlockdiagLinear(size, size, nblocks, bias=False, dtype=torch.float64)
    with torch.no_grad():
        blockdiag.weight.copy_(project_blockdiag(weight, nblocks))
    assert projection_error(weight, nblocks, "monarch") <= projection_error(weight, nblocks, "blockdiag") + 1e-12
    # The block-diagonal family sits inside the Monarch family: a block-diagonal matrix is recovered exactly.
    assert projection_error(blockdiag.dense_weight(), nblocks, "monarch") < 1e-10


def test_projection_beats_low_rank_of_equal_budget_on_gaussian():
    """Sanity figure from the reference notes: 768x768 Gaussian at nblocks=4 leaves ~0.613 relative error."""
    weight = torch.randn(768, 768, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    error = projection_error(weight, 4)
    singular = torch.linalg.svdvals(weight)
    low_rank = math.sqrt(singular[192:].square().sum() / singular.square().sum())  # 2*768*192 = Monarch budget
    assert 0.58 < error < 0.64
    assert error <= low_rank + 1e-3


@pytest.mark.parametrize("cls", [MonarchLinear, BlockdiagLinear])
@pytest.mark.parametrize("in_features,out_features", [(24, 24), (16, 40), (40, 16)])
def test_nblocks_one_reproduces_the_dense_layer(cls, in_features, out_features):
    torch.manual_seed(3)
    linear = nn.Linear(in_features, out_features, dtype=torch.float64)
    layer = cls.from_linear(linear, nblocks=1)
    torch.testing.assert_close(layer.dense_weight(), linear.weight.detach(), rtol=1e-12, atol=1e-12)
    x = torch.randn(4, in_features, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [MonarchLinear, BlockdiagLinear])
@pytest.mark.parametrize("in_features,out_features,nblocks", SHAPES)
def test_round_trip_to_linear_and_back(cls, in_features, out_features, nblocks):
    torch.manual_seed(4)
    layer = cls(in_features, out_features, nblocks, dtype=torch.float64)
    linear = layer.to_linear()
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (out_features, in_features)
    x = torch.randn(6, in_features, dtype=torch.float64)
    torch.testing.assert_close(linear(x), layer(x), rtol=1e-12, atol=1e-12)
    again = cls.from_linear(linear, nblocks)
    torch.testing.assert_close(again(x), layer(x), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(again.bias, layer.bias)


def test_from_linear_accepts_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(5)
    conv = Conv1D(nf=96, nx=32).double()  # weight stored (in, out)
    with torch.no_grad():
        conv.bias.normal_()
    linear = nn.Linear(32, 96, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    from_conv, from_linear = MonarchLinear.from_linear(conv, 4), MonarchLinear.from_linear(linear, 4)
    torch.testing.assert_close(from_conv.dense_weight(), from_linear.dense_weight())
    torch.testing.assert_close(from_conv.bias, conv.bias)
    x = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(MonarchLinear.from_linear(conv, 1)(x), conv(x), rtol=1e-12, atol=1e-12)


def test_from_linear_keeps_device_dtype_and_bias_absence():
    linear = nn.Linear(32, 32, bias=False, dtype=torch.float16)
    layer = MonarchLinear.from_linear(linear, 4)
    assert layer.bias is None and layer.blkdiag1.dtype == torch.float16 and layer.blkdiag1.device == linear.weight.device
    assert not linear.weight.grad_fn  # the source is untouched
    projected = BlockdiagLinear.from_linear(layer, 4)  # layers of this module are accepted as sources too
    assert projected.weight.shape == (4, 8, 8)


# --------------------------------------------------------------------------------------------------------------------
# Property tests over shapes and nblocks
# --------------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(in_features=st.integers(1, 48), out_features=st.integers(1, 48), data=st.data())
def test_properties_over_shapes(in_features, out_features, data):
    nblocks = data.draw(st.integers(1, min(in_features, out_features)))
    batch = data.draw(st.lists(st.integers(0, 3), max_size=2))
    layer = random_monarch(in_features, out_features, nblocks, seed=data.draw(st.integers(0, 1000)))
    x = torch.randn(*batch, in_features, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*batch, out_features)
    torch.testing.assert_close(y, x @ layer.dense_weight().t() + layer.bias, rtol=1e-10, atol=1e-10)
    rebuilt = MonarchLinear.from_linear(layer, nblocks)
    assert relative_error(rebuilt.dense_weight(), layer.dense_weight()) < 1e-9
    parameters = sum(p.numel() for p in (layer.blkdiag1, layer.blkdiag2))
    assert parameters <= 2 * layer.in_features_padded * layer.out_features_padded


# --------------------------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MonarchLinear, BlockdiagLinear])
@pytest.mark.parametrize("in_features,out_features,nblocks", [(768, 768, 4), (768, 3072, 4), (3072, 768, 4), (1024, 1024, 16)])
def test_init_matches_nn_linear_output_variance(cls, in_features, out_features, nblocks):
    torch.manual_seed(6)
    x = torch.randn(2048, in_features)
    variances = []
    for make in (lambda: nn.Linear(in_features, out_features, bias=False), lambda: cls(in_features, out_features, nblocks, bias=False)):
        variances.append(torch.stack([make()(x).var() for _ in range(4)]).mean().item())
    dense_variance, structured_variance = variances
    assert dense_variance == pytest.approx(1 / 3, rel=0.1)
    assert structured_variance == pytest.approx(dense_variance, rel=0.1)


def test_bias_init_uses_in_features_like_nn_linear():
    torch.manual_seed(7)
    layer = MonarchLinear(4096, 16, nblocks=4)
    assert layer.bias.abs().max() <= 1 / math.sqrt(4096)
    assert layer.bias.abs().max() > 0.5 / math.sqrt(4096)


# --------------------------------------------------------------------------------------------------------------------
# Autograd, autocast, torch.compile, torch.func
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MonarchLinear, BlockdiagLinear])
@pytest.mark.parametrize("in_features,out_features,nblocks", [(12, 12, 3), (8, 20, 4), (10, 7, 3), (16, 24, 4)])
def test_gradcheck_float64(cls, in_features, out_features, nblocks):
    torch.manual_seed(8)
    layer = cls(in_features, out_features, nblocks, dtype=torch.float64)
    x = torch.randn(3, in_features, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())

    def function(x, *parameters):
        return torch.func.functional_call(layer, dict(zip([n for n, _ in layer.named_parameters()], parameters)), (x,))

    assert torch.autograd.gradcheck(function, (x, *params))
    assert torch.autograd.gradgradcheck(function, (x, *params))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_features,out_features,nblocks", [(48, 48, 4), (32, 128, 4), (64, 32, 4), (10, 7, 3)])
def test_training_product_equals_the_composed_ops(monkeypatch, in_features, out_features, nblocks, bias):
    """The training multiply's own autograd function against the same product composed of autograd ops: outputs and
    every gradient, with and without a bias, and with a padded output (whose bias is added after the cut)."""
    import m2_hf.monarch as monarch

    torch.manual_seed(15)
    layer = MonarchLinear(in_features, out_features, nblocks, bias=bias)
    x = torch.randn(2, 9, in_features, requires_grad=True)
    upstream = torch.randn(2, 9, out_features)
    applied = []
    product = monarch._MonarchTrainingProduct.apply
    monkeypatch.setattr(monarch._MonarchTrainingProduct, "apply", lambda *a: applied.append(1) or product(*a))
    results = {}
    for name, fused in (("fused", True), ("composed", False)):
        monkeypatch.setattr(monarch, "_training_product_applies", lambda tensors, runs_divide, f=fused: f)
        y = layer(x)
        results[name] = (y, *torch.autograd.grad(y, (x, *layer.parameters()), upstream))
    assert len(applied) == 1
    for fused, composed in zip(results["fused"], results["composed"]):
        torch.testing.assert_close(fused, composed, rtol=1e-5, atol=1e-5)


def test_training_product_is_used_only_where_it_applies():
    import m2_hf.monarch as monarch

    layer = MonarchLinear(48, 48, 4)
    x = torch.randn(5, 48, requires_grad=True)
    w1, w2 = layer.blkdiag1, layer.blkdiag2
    assert monarch._training_product_applies((x, w1, w2), True)
    assert not monarch._training_product_applies((x, w1, w2), False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not monarch._training_product_applies((x, w1, w2), True)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.randn_like(x))
        assert not monarch._training_product_applies((dual, w1, w2), True)
    forward_gradient = torch.func.jvp(lambda v: layer(v), (x.detach(),), (torch.ones_like(x),))[1]
    torch.testing.assert_close(forward_gradient, torch.ones(5, 48) @ layer.dense_weight().t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [MonarchLinear, BlockdiagLinear])
def test_autocast_picks_the_dtype_like_nn_linear(cls, dtype):
    torch.manual_seed(9)
    layer, linear = cls(64, 96, 4), nn.Linear(64, 96)
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=dtype):
        y, y_linear = layer(x), linear(x)
    assert y.dtype == y_linear.dtype == dtype
    assert all(parameter.dtype == torch.float32 for parameter in layer.parameters())
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("cls", [MonarchLinear, BlockdiagLinear])
def test_float64_layers_stay_float64_under_autocast_like_nn_linear(cls, grad):
    torch.manual_seed(9)
    layer, linear = cls(64, 96, 4, inference_path="structured").double(), nn.Linear(64, 96).double()
    x = torch.randn(5, 64, dtype=torch.float64)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_linear = layer(x), linear(x)
    assert y.dtype == y_linear.dtype == torch.float64
    torch.testing.assert_close(y, x @ layer.dense_weight().t() + layer.bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters(dtype):
    torch.manual_seed(10)
    reference = MonarchLinear(32, 48, 4)
    layer = MonarchLinear(32, 48, 4, dtype=dtype)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(3, 32)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), reference(x), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(backend):
    torch.manual_seed(11)
    layer = MonarchLinear(40, 56, 4)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(2, 7, 40, requires_grad=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    (gx_compiled,) = torch.autograd.grad(compiled(x).square().sum(), x)
    (gx_eager,) = torch.autograd.grad(layer(x).square().sum(), x)
    torch.testing.assert_close(gx_compiled, gx_eager, rtol=1e-5, atol=1e-5)


def test_torch_func_jacobian_and_vmap():
    torch.manual_seed(12)
    layer = MonarchLinear(12, 20, 4, dtype=torch.float64)
    params = dict(layer.named_parameters())
    x = torch.randn(12, dtype=torch.float64)
    jacobian = torch.func.jacrev(lambda v: torch.func.functional_call(layer, params, (v,)))(x)
    torch.testing.assert_close(jacobian, layer.dense_weight())
    forward_jacobian = torch.func.jacfwd(lambda v: torch.func.functional_call(layer, params, (v,)))(x)
    torch.testing.assert_close(forward_jacobian, layer.dense_weight())
    xs = torch.randn(5, 3, 12, dtype=torch.float64)
    batched = torch.func.vmap(lambda v: torch.func.functional_call(layer, params, (v,)))(xs)
    torch.testing.assert_close(batched, layer(xs))
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (xs,)).sum())(params)
    assert set(grads) == {"blkdiag1", "blkdiag2", "bias"}


# --------------------------------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------------------------------


def test_backend_switch_routes_to_triton_and_matches_torch():
    pytest.importorskip("triton")
    torch.manual_seed(13)
    layer = MonarchLinear(20, 36, 4)
    x = torch.randn(5, 20, requires_grad=True)
    expected = layer(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    assert set_monarch_backend(nn.Sequential(layer, nn.ReLU()), "triton") == 1
    actual = layer(x)
    (actual_grad,) = torch.autograd.grad(actual.sum(), x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-4, atol=1e-4)
    layer.backend = "torch"
    assert layer.backend == "torch"


def test_auto_backend_uses_torch_on_cpu(monkeypatch):
    import m2_hf.monarch as monarch

    def fail(*args):
        raise AssertionError("the Triton path must not run for CPU tensors under backend='auto'")

    monkeypatch.setattr(monarch, "monarch_multiply_triton", fail)
    MonarchLinear(16, 16, 4)(torch.randn(2, 16))


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MonarchLinear, BlockdiagLinear])
@pytest.mark.parametrize(
    "args,error,match",
    [
        ((16, 16, 0), ValueError, "`nblocks` must be between 1 and"),
        ((16, 16, -2), ValueError, "`nblocks` must be between 1 and"),
        ((16, 8, 9), ValueError, r"min\(in_features, out_features\) = 8"),
        ((16, 16, 2.0), TypeError, "`nblocks` must be an int"),
        ((16, 16, True), TypeError, "`nblocks` must be an int"),
        ((0, 16, 1), ValueError, "`in_features` must be a positive integer"),
        ((16, -1, 1), ValueError, "`out_features` must be a positive integer"),
    ],
)
def test_bad_constructor_arguments(cls, args, error, match):
    with pytest.raises(error, match=match):
        cls(*args)


@pytest.mark.parametrize("function", [project_monarch, project_blockdiag, projection_error])
@pytest.mark.parametrize(
    "weight,match",
    [
        (torch.randn(16), "must be 2-D"),
        (torch.randn(2, 16, 16), "must be 2-D"),
        (torch.full((16, 16), float("nan")), "NaN or infinite"),
        (torch.full((16, 16), float("inf")), "NaN or infinite"),
        (torch.ones(16, 16, dtype=torch.long), "floating-point"),
    ],
)
def test_bad_weights(function, weight, match):
    with pytest.raises(ValueError, match=match):
        function(weight, 4)


def test_bad_modules_and_options():
    with pytest.raises(TypeError, match="Expected a linear layer"):
        MonarchLinear.from_linear(nn.Conv2d(3, 3, 1), 4)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        MonarchLinear.from_linear(torch.randn(4, 4), 2)
    with pytest.raises(ValueError, match="`nblocks` must be between 1 and"):
        MonarchLinear.from_linear(nn.Linear(8, 8), 16)
    with pytest.raises(ValueError, match="`structure` must be one of"):
        projection_error(torch.randn(8, 8), 2, "lowrank")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        MonarchLinear(8, 8, 2, backend="cuda")
    with pytest.raises(ValueError, match="expects inputs with 8 features"):
        MonarchLinear(8, 8, 2)(torch.randn(3, 9))


@pytest.mark.parametrize("cls", [MonarchLinear, BlockdiagLinear])
def test_training_and_inference_layouts_agree(cls):
    torch.manual_seed(14)
    for in_features, out_features, nblocks in [(48, 48, 4), (30, 30, 7), (32, 128, 4), (128, 32, 8)]:
        layer = cls(in_features, out_features, nblocks, inference_path="structured")  # the multiply, not densified
        x = torch.randn(9, in_features)
        with torch.no_grad():
            inference = layer(x)
            # One or two rows (decoding steps) take the weight-from-the-left path.
            few_rows = torch.cat([layer(x[:1]), layer(x[1:3]), layer(x[3:])])
        training = layer(x.requires_grad_())
        assert training.requires_grad
        torch.testing.assert_close(training, inference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(few_rows, inference, rtol=1e-5, atol=1e-6)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            half = layer(x)
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), inference, rtol=5e-2, atol=5e-2)
