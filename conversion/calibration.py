"""`--method calibrated`: structured layers fitted to what the layer computes on real text, not to its weights.

The closed-form projection minimises ‖W − M‖_F, which weighs every input direction alike. A layer only ever sees
inputs from a narrow distribution, so what matters is the error of its outputs on those inputs. Layers are fitted in
model order; for each, with x the layer's input in the model converted so far and x₀ its input in the original model,
the calibrated method minimises

    E‖M x − W x₀‖² = tr(M C Mᵀ) − 2 tr(M D Wᵀ) + const,   C = E[x xᵀ],  D = E[x x₀ᵀ],

so each layer also corrects the drift that its converted predecessors introduced (as GPTQ does for quantisation).
With C = L Lᵀ this is ‖Lᵀ Mᵀ − L⁻¹ D Wᵀ‖²_F: starting from the closed-form projection, L-BFGS minimises it over the
structured factors (C is damped by a small multiple of its mean diagonal, so that directions never seen keep a little
weight).

Cost: one forward pass of the converted and of the original model over the calibration text per layer, each stopped
at that layer, plus a small L-BFGS problem whose size depends on the layer's width only (not on the amount of text);
the original model is kept in memory alongside the converted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DAMPING = 1e-3
LBFGS_STEPS = 300


class _StopForward(Exception):
    """Raised by the recording hook: nothing after the layer is needed."""


def _layer_inputs(model: nn.Module, layer_name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inputs of ``model.base_model``'s layer ``layer_name`` at the real tokens of ``batch``, in float32."""
    captured = []

    def record(_module, inputs):
        captured.append(inputs[0])
        raise _StopForward

    handle = model.base_model.get_submodule(layer_name).register_forward_pre_hook(record)
    try:
        model.base_model(**batch)
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


def fit_to_statistics(structured: nn.Module, weight: torch.Tensor, statistics: LayerStatistics) -> nn.Module:
    """Fit the factors of ``structured`` (modified in place and returned, in float64) so that ``M x`` reproduces
    ``W x₀``; then shift the bias by the mean output difference."""
    second = statistics.second.double()
    damping = DAMPING * second.diagonal().mean() * torch.eye(len(second), dtype=torch.float64)
    root = torch.linalg.cholesky(second + damping)
    weight = weight.detach().double()
    # The loss tr(M (C + λI) Mᵀ) − 2 tr(M (D + λI) Wᵀ) is ‖Lᵀ Mᵀ − L⁻¹ (D + λI) Wᵀ‖²_F plus a constant, with
    # C + λI = L Lᵀ; the damping λ pulls M towards W in directions the text never reached.
    target = torch.linalg.solve_triangular(root, (statistics.cross.double() + damping) @ weight.t(), upper=False)
    root_t = root.t()
    work = structured.to(torch.float64)
    bias = work.bias
    if bias is not None:
        work.bias = None
    optimizer = torch.optim.LBFGS(list(work.parameters()), lr=1.0, max_iter=LBFGS_STEPS, history_size=20,
                                  tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")
    scale = target.square().sum()

    def closure():
        optimizer.zero_grad()
        loss = (work(root_t) - target).square().sum() / scale
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    if bias is not None:
        with torch.no_grad():
            bias += weight @ statistics.mean_original.double() - work.dense_weight() @ statistics.mean.double()
        work.bias = bias
    return work
