"""`--method calibrated`: structured layers fitted to what the layer computes on real text, not to its weights.

The closed-form projection minimises ‖W − M‖_F, which weighs every input direction alike. A layer only ever sees
inputs from a narrow distribution, so what matters is the error of its outputs on those inputs. Layers are fitted in
model order; for each, with x the layer's input in the model converted so far and x₀ its input in the original model,
the calibrated method minimises

    E‖M x − W x₀‖² = tr(M C Mᵀ) − 2 tr(M D Wᵀ) + const,   C = E[x xᵀ],  D = E[x x₀ᵀ],

so each layer also corrects the drift that its converted predecessors introduced (as GPTQ does for quantisation).
The objective is quadratic in each factor with the other fixed. Starting from the closed-form projection, the fit
alternates the exact optimum of the second block-diagonal factor (one small least-squares solve per block) with
preconditioned conjugate-gradient steps on the first, whose normal equations couple its blocks; a block-diagonal layer
is solved exactly at once. C is damped by a small multiple of its mean diagonal, so that directions never seen keep a
little weight.

Cost: one forward pass of the converted and of the original model over the calibration text per layer, each stopped
at that layer, plus a fit whose size depends on the layer's width only (not on the amount of text); the original model
is kept in memory alongside the converted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from m2_hf import BlockdiagLinear

from .monarch import layer_root

DAMPING = 1e-3
ALTERNATIONS = 10
FIRST_FACTOR_STEPS = 10


class _StopForward(Exception):
    """Raised by the recording hook: nothing after the layer is needed."""


def _layer_inputs(model: nn.Module, layer_name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inputs of ``model``'s layer ``layer_name`` (named relative to its base model, or to the head model for a
    head's layer) at the real tokens of ``batch``, in float32."""
    captured = []

    def record(_module, inputs):
        captured.append(inputs[0])
        raise _StopForward

    root = layer_root(model, layer_name)
    handle = root.get_submodule(layer_name).register_forward_pre_hook(record)
    try:
        root(**batch)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"The calibration text never reached {layer_name}.")
    x = captured[0]
    return (x[batch["attention_mask"].bool()] if x.dim() == 3 else x.reshape(-1, x.shape[-1])).float()


@dataclass
class LayerStatistics:
    """Moments of a layer's input x (converted model) and x₀ (original model) over the calibration tokens."""

    second: torch.Tensor  # E[x xᵀ]
    cross: torch.Tensor  # E[x x₀ᵀ]
    mean: torch.Tensor  # E[x]
    mean_original: torch.Tensor  # E[x₀]


@torch.no_grad()
def input_statistics(
    model: nn.Module, original: nn.Module, layer_name: str, batches: list[dict[str, torch.Tensor]]
) -> LayerStatistics:
    """The moments of the inputs of ``layer_name`` (relative to the base model) over the real tokens of ``batches``."""
    second = cross = total = total_original = 0.0
    count = 0
    for batch in batches:
        x = _layer_inputs(model, layer_name, batch)
        x0 = x if original is model else _layer_inputs(original, layer_name, batch)
        # Per-batch products in float32 (a few hundred tokens each), accumulated in float64.
        second, cross = second + (x.t() @ x).double(), cross + (x.t() @ x0).double()
        total, total_original = total + x.double().sum(0), total_original + x0.double().sum(0)
        count += len(x)
    return LayerStatistics(second / count, cross / count, total / count, total_original / count)


@dataclass
class _Objective:
    """``tr(M C Mᵀ) − 2 tr(M Tᵀ)`` over structured weights ``M`` (in the layer's padded sizes): the expected output
    error ``E‖M x − W x₀‖²`` up to a constant, with ``C = E[x xᵀ] + λI`` and ``T = W (E[x₀ xᵀ] + λI)``."""

    second: torch.Tensor  # C, (in_padded, in_padded)
    target: torch.Tensor  # T, (out_padded, in_padded)

    def value(self, weight: torch.Tensor) -> float:
        return float(((weight @ self.second) * weight).sum() - 2 * (weight * self.target).sum())


def _objective(structured: nn.Module, weight: torch.Tensor, statistics: LayerStatistics, damping: float) -> _Objective:
    """The damping λ is ``damping`` times the mean input power: it pulls M towards W in directions the text never
    reached. Padded input features get λ alone, so the factors' weights on them go to zero."""
    out_features, in_features = weight.shape
    second = statistics.second.double()
    strength = damping * float(second.diagonal().mean())
    padded_second = torch.zeros(structured.in_features_padded, structured.in_features_padded, dtype=torch.float64)
    padded_second[:in_features, :in_features] = second
    padded_second.diagonal().add_(strength)
    cross = statistics.cross.double() + strength * torch.eye(in_features, dtype=torch.float64)
    target = torch.zeros(structured.out_features_padded, structured.in_features_padded, dtype=torch.float64)
    target[:out_features, :in_features] = weight.double() @ cross.t()
    return _Objective(padded_second, target)


def _diagonal_blocks(matrix: torch.Tensor, nblocks: int) -> torch.Tensor:
    """``(nblocks, rows / nblocks, columns / nblocks)``: the blocks on the diagonal of ``matrix``."""
    rows, columns = matrix.shape[0] // nblocks, matrix.shape[1] // nblocks
    index = torch.arange(nblocks)
    return matrix.view(nblocks, rows, nblocks, columns)[index, :, index]


def _interleaved_blocks(matrix: torch.Tensor, nblocks: int) -> torch.Tensor:
    """``(nblocks, rows / nblocks, columns / nblocks)``: block λ holds the rows and columns ≡ λ (mod nblocks), which
    is where the second Monarch factor's block λ sits in the layer's weight."""
    rows, columns = matrix.shape[0] // nblocks, matrix.shape[1] // nblocks
    index = torch.arange(nblocks)
    return matrix.view(rows, nblocks, columns, nblocks)[:, index, :, index]


def _second_factor_matrix(blkdiag2: torch.Tensor) -> torch.Tensor:
    """``P_out · blockdiag(blkdiag2) · P_mid`` as a dense ``(out_padded, nblocks · inner)`` matrix."""
    nblocks, out_block, inner = blkdiag2.shape
    matrix = blkdiag2.new_zeros(out_block, nblocks, inner, nblocks)
    index = torch.arange(nblocks)
    matrix[:, index, :, index] = blkdiag2
    return matrix.view(out_block * nblocks, inner * nblocks)


def _solve_symmetric(matrix: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``right · matrix⁻¹`` for a batch of symmetric positive (semi)definite ``matrix``, with a tiny ridge so that a
    rank-deficient factor never makes it singular."""
    ridge = 1e-10 * matrix.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)[:, None, None]
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype)
    return torch.linalg.solve(matrix + ridge * eye, right.transpose(1, 2)).transpose(1, 2)


def _fit_blockdiag(objective: _Objective, nblocks: int) -> torch.Tensor:
    """The exact optimum: each output block depends on its own input block only."""
    return _solve_symmetric(_diagonal_blocks(objective.second, nblocks), _diagonal_blocks(objective.target, nblocks))


def _times_block_diagonal_transposed(matrix: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``matrix · blockdiag(blocks)ᵀ`` without forming the block-diagonal matrix: ``(rows, b·p)`` by ``(b, q, p)``
    gives ``(rows, b·q)``."""
    nblocks, inner, width = blocks.shape
    rows = matrix.shape[0]
    products = matrix.view(rows, nblocks, width).transpose(0, 1) @ blocks.transpose(1, 2)
    return products.transpose(0, 1).reshape(rows, nblocks * inner)


def _first_factor_times_second(blkdiag1: torch.Tensor, objective: _Objective) -> torch.Tensor:
    """``blockdiag(blkdiag1) · C`` (C is symmetric)."""
    return _times_block_diagonal_transposed(objective.second, blkdiag1).t()


def _best_second_factor(blkdiag1: torch.Tensor, objective: _Objective) -> torch.Tensor:
    """The optimal ``blkdiag2`` for a fixed ``blkdiag1``: a least-squares problem per block of the second factor, on
    the second moment of the intermediate features ``h = blockdiag(blkdiag1) x``."""
    nblocks = len(blkdiag1)
    intermediate_second = _times_block_diagonal_transposed(_first_factor_times_second(blkdiag1, objective), blkdiag1)
    intermediate_target = _times_block_diagonal_transposed(objective.target, blkdiag1)
    return _solve_symmetric(_interleaved_blocks(intermediate_second, nblocks),
                            _interleaved_blocks(intermediate_target, nblocks))


def _best_first_factor(blkdiag1: torch.Tensor, blkdiag2: torch.Tensor, objective: _Objective, steps: int):
    """``blkdiag1`` improved by ``steps`` of preconditioned conjugate gradients on the objective with ``blkdiag2``
    fixed (a quadratic in ``blkdiag1``). With ``S = P_out · blockdiag(blkdiag2) · P_mid`` the normal equations are
    ``diag-blocks(SᵀS X C) = diag-blocks(Sᵀ T)``; they couple the blocks of X through ``SᵀS`` and ``C``, so each step
    applies them whole and preconditions with their block-diagonal part, ``X_κ ↦ (SᵀS)_κκ⁻¹ X_κ C_κκ⁻¹``."""
    nblocks = len(blkdiag1)
    second_factor = _second_factor_matrix(blkdiag2)
    gram = second_factor.t() @ second_factor
    right = _diagonal_blocks(second_factor.t() @ objective.target, nblocks)
    gram_blocks, second_blocks = _diagonal_blocks(gram, nblocks), _diagonal_blocks(objective.second, nblocks)
    eye_inner = torch.eye(gram_blocks.shape[-1], dtype=gram.dtype)
    ridge = 1e-10 * gram_blocks.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)[:, None, None]
    gram_inverse = torch.linalg.inv(gram_blocks + ridge * eye_inner)
    second_inverse = torch.linalg.inv(second_blocks)

    inner, width = blkdiag1.shape[1:]
    gram_rows = gram.view(nblocks, inner, nblocks * inner)

    def normal_operator(x):
        # Only the diagonal blocks of SᵀS X C are needed: block κ is the κ-th rows of SᵀS times the κ-th columns of X C.
        x_second = _first_factor_times_second(x, objective)
        return gram_rows @ x_second.view(nblocks * inner, nblocks, width).transpose(0, 1)

    def precondition(residual):
        return gram_inverse @ residual @ second_inverse

    x = blkdiag1.clone()
    residual = right - normal_operator(x)
    preconditioned = precondition(residual)
    direction = preconditioned
    product = (residual * preconditioned).sum()
    for _ in range(steps):
        applied = normal_operator(direction)
        curvature = (direction * applied).sum()
        if curvature <= 0:
            break
        step = product / curvature
        x = x + step * direction
        residual = residual - step * applied
        preconditioned = precondition(residual)
        new_product = (residual * preconditioned).sum()
        direction = preconditioned + (new_product / product) * direction
        product = new_product
    return x


def fit_to_statistics(
    structured: nn.Module, weight: torch.Tensor, statistics: LayerStatistics, damping: float = DAMPING,
    alternations: int = ALTERNATIONS, first_factor_steps: int = FIRST_FACTOR_STEPS,
) -> nn.Module:
    """Fit the factors of ``structured`` (modified in place and returned, in float64) so that ``M x`` reproduces
    ``W x₀``; then shift the bias by the mean output difference. A block-diagonal layer is solved exactly; a Monarch
    layer alternates, from its current factors, the exact optimum of the second factor with ``first_factor_steps``
    conjugate-gradient steps on the first, ``alternations`` times (each never raises the objective)."""
    work = structured.to(torch.float64)
    objective = _objective(work, weight.detach(), statistics, damping)
    with torch.no_grad():
        if isinstance(work, BlockdiagLinear):
            work.weight.copy_(_fit_blockdiag(objective, work.nblocks))
        else:
            blkdiag1 = work.blkdiag1.detach().clone()
            for _ in range(alternations):
                blkdiag2 = _best_second_factor(blkdiag1, objective)
                blkdiag1 = _best_first_factor(blkdiag1, blkdiag2, objective, first_factor_steps)
            work.blkdiag1.copy_(blkdiag1)
            work.blkdiag2.copy_(_best_second_factor(blkdiag1, objective))
        if work.bias is not None:
            work.bias += weight.double() @ statistics.mean_original.double() - work.dense_weight() @ statistics.mean.double()
    return work
