"""`m2-convert monarch --budget F`: ``nblocks`` per layer, chosen to keep a fraction of the targeted layers' size.

Every targeted layer has a few options: stay dense (no error, full cost) or become structured with one of the
``nblocks`` that divide both of its sizes (fewer parameters as ``nblocks`` grows, larger error). ``nblocks=1`` is
never an option: a one-block Monarch layer holds ``min(in, out) * (in + out)`` weights, at least as many as the dense
layer, so staying dense beats it. Each option costs parameters (weights plus the bias, which every option keeps) or
linear FLOPs per token (two per weight), and has an error:

- without calibration text, the relative Frobenius error ``‖W − M‖ / ‖W‖`` of the closed-form projection;
- with calibration text, the relative output error ``√(tr(E C Eᵀ) / tr(W C Wᵀ))``, ``E = W − M``, of the closed-form
  projection on the layer's inputs in the original model (``C = E[x xᵀ]``): the quantity the calibrated method
  lowers further, at a fraction of its cost (one forward pass over the text for all layers).

Choosing one option per layer to minimise the summed error under the cost limit is a multiple-choice knapsack,
solved exactly by dynamic programming over integer costs (in units of their greatest common divisor; coarser, rounded
up, only for models whose total would need more than ``MAX_COST_UNITS`` units, which can then only err on the
cheap side of the limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from m2_hf import dense_weight_and_bias, projection_error
from m2_hf.modeling_monarch_converted import STRUCTURED_CLASSES

from .checkpoints import ConversionError

BUDGET_KINDS = ("parameters", "flops")
# The dynamic programme's table has one row of this many cells per layer.
MAX_COST_UNITS = 200_000


@dataclass
class Option:
    nblocks: Optional[int]  # None: the layer stays dense
    cost: int
    error: float


@dataclass
class LayerChoice:
    name: str
    in_features: int
    out_features: int
    nblocks: Optional[int]
    cost: int
    dense_cost: int
    error: float


def check_budget(fraction, kind: str) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConversionError(f"--budget is the fraction of the targeted layers' size to keep, in (0, 1] (for "
                              f"example 0.4), got {fraction!r}.")
    if kind not in BUDGET_KINDS:
        raise ConversionError(f"--budget-of must be one of {', '.join(BUDGET_KINDS)}, got {kind!r}.")


def candidate_nblocks(in_features: int, out_features: int) -> list[int]:
    """The ``nblocks`` (above 1) that divide both sizes of a layer: no padding, so every weight is a real one."""
    common = math.gcd(in_features, out_features)
    return [b for b in range(2, common + 1) if common % b == 0]


def structured_weights(in_features: int, out_features: int, nblocks: int, structure: str) -> int:
    """How many weights the structured layer holds (zero-padding included), without its bias."""
    layer = STRUCTURED_CLASSES[structure]
    with torch.device("meta"):
        built = layer(in_features, out_features, nblocks, bias=False)
    return sum(p.numel() for p in built.parameters())


def _cost(weights: int, bias: int, kind: str) -> int:
    return weights + bias if kind == "parameters" else 2 * weights


@torch.no_grad()
def input_second_moments(model: nn.Module, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """``E[x xᵀ]`` (float64) of the inputs of each named layer of ``model.base_model`` over the real tokens of
    ``batches``, from one forward pass per batch."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    mask: dict[str, torch.Tensor] = {}

    def recorder(name):
        def record(_module, inputs):
            x = inputs[0]
            x = x[mask["real"]] if x.dim() == 3 and x.shape[:2] == mask["real"].shape else x.reshape(-1, x.shape[-1])
            x = x.float()
            sums[name] = sums.get(name, 0) + (x.t() @ x).double()
            counts[name] += len(x)
        return record

    base = model.base_model
    handles = [base.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in names]
    try:
        for batch in batches:
            mask["real"] = batch["attention_mask"].bool()
            base(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in names if counts[name]}


def option_error(layer: nn.Module, nblocks: int, structure: str, moment: Optional[torch.Tensor]) -> float:
    """The relative error of the closed-form projection: of the weight, or of the outputs on inputs of second moment
    ``moment``."""
    weight = dense_weight_and_bias(layer)[0].detach()
    if moment is None:
        return projection_error(weight, nblocks, structure, dtype=torch.float32)
    projected = STRUCTURED_CLASSES[structure].from_linear(layer, nblocks=nblocks, projection_dtype=torch.float32)
    weight = weight.double()
    difference = projected.dense_weight().detach().double() - weight
    total = ((weight @ moment) * weight).sum()
    return math.sqrt(max(0.0, float(((difference @ moment) * difference).sum()) / float(total))) if total > 0 else 0.0


def layer_options(layer: nn.Module, structure: str, kind: str, moment: Optional[torch.Tensor]) -> list[Option]:
    """Dense, and every candidate ``nblocks`` that makes the layer cheaper than dense."""
    weight, bias = dense_weight_and_bias(layer)
    out_features, in_features = weight.shape
    bias_size = 0 if bias is None else bias.numel()
    dense = _cost(weight.numel(), bias_size, kind)
    options = [Option(None, dense, 0.0)]
    for nblocks in candidate_nblocks(in_features, out_features):
        cost = _cost(structured_weights(in_features, out_features, nblocks, structure), bias_size, kind)
        if cost < dense:
            options.append(Option(nblocks, cost, option_error(layer, nblocks, structure, moment)))
    return options


def allocate(options: list[list[Option]], limit: int) -> list[int]:
    """The index of one option per layer minimising the summed error with summed cost at most ``limit`` (multiple-
    choice knapsack, exact dynamic programme over integer cost units)."""
    costs = [option.cost for layer in options for option in layer]
    total = sum(max(option.cost for option in layer) for layer in options)
    unit = math.gcd(*costs)
    if total // unit > MAX_COST_UNITS:
        unit = -(-total // MAX_COST_UNITS)
    capacity = limit // unit
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    picks = []
    for layer in options:
        candidates = np.full((len(layer), capacity + 1), np.inf)
        for index, option in enumerate(layer):
            width = -(-option.cost // unit)
            if width <= capacity:
                candidates[index, width:] = best[: capacity + 1 - width] + option.error
        pick = candidates.argmin(0)
        picks.append(pick.astype(np.int16))
        best = candidates[pick, np.arange(capacity + 1)]
    if not np.isfinite(best).any():
        raise ValueError("no allocation fits the limit")
    # The least error; among equal errors, the cheapest.
    cell = int(np.flatnonzero(best == best.min())[0])
    chosen = []
    for layer, pick in zip(reversed(options), reversed(picks)):
        index = int(pick[cell])
        chosen.append(index)
        cell -= -(-layer[index].cost // unit)
    return chosen[::-1]


def plan_budget(
    base: nn.Module, names: list[str], structure: str, fraction: float, kind: str = "parameters",
    moments: Optional[dict[str, torch.Tensor]] = None,
) -> dict:
    """``{"choices": {layer: nblocks or None (dense)}, "report": ...}`` for the targeted layers ``names``."""
    check_budget(fraction, kind)
    moments = moments or {}
    layers = {name: base.get_submodule(name) for name in names}
    from .monarch import _map_on_all_cores  # the converter's own parallel map (it imports this module)

    options = list(_map_on_all_cores(
        lambda item: layer_options(item[1], structure, kind, moments.get(item[0])), list(layers.items())
    ))
    dense_total = sum(layer[0].cost for layer in options)
    limit = math.floor(fraction * dense_total + 1e-6)  # a fraction computed from a cost keeps that cost
    smallest = sum(min(option.cost for option in layer) for layer in options)
    if limit < smallest:
        raise ConversionError(
            f"--budget {fraction} keeps {limit:,} of the targeted layers' {dense_total:,} {kind}, below the smallest "
            f"reachable size {smallest:,} (every layer at its largest nblocks): pass --budget "
            f"{math.ceil(smallest / dense_total * 1000) / 1000} or more, or target more layers."
        )
    chosen = [layer[index] for layer, index in zip(options, allocate(options, limit))]
    if all(option.nblocks is None for option in chosen):
        raise ConversionError(f"--budget {fraction} keeps every targeted layer dense: nothing to convert. Pass a "
                              "smaller --budget.")
    rows = []
    for (name, layer), option, options_of_layer in zip(layers.items(), chosen, options):
        out_features, in_features = dense_weight_and_bias(layer)[0].shape
        rows.append(LayerChoice(name, in_features, out_features, option.nblocks, option.cost, options_of_layer[0].cost,
                                option.error))
    achieved = sum(row.cost for row in rows)
    report = {
        "fraction": fraction, "of": kind, "error": "output" if moments else "weight",
        "dense_cost": dense_total, "limit": limit, "cost": achieved, "achieved_fraction": achieved / dense_total,
        "objective": sum(row.error for row in rows),
        "uniform": best_uniform(options, limit, dense_total),
        "layers": [row.__dict__ for row in rows],
    }
    return {"choices": {row.name: row.nblocks for row in rows}, "report": report}


def best_uniform(options: list[list[Option]], limit: int, dense_total: int) -> Optional[dict]:
    """The one ``nblocks`` for every layer with the least summed error within the limit (None if none fits): what
    the budget's allocation is compared with."""
    shared = set.intersection(*({option.nblocks for option in layer[1:]} for layer in options))
    fitting = []
    for nblocks in shared:
        picked = [next(option for option in layer if option.nblocks == nblocks) for layer in options]
        cost = sum(option.cost for option in picked)
        if cost <= limit:
            fitting.append({"nblocks": nblocks, "cost": cost, "achieved_fraction": cost / dense_total,
                            "objective": sum(option.error for option in picked)})
    return min(fitting, key=lambda row: row["objective"], default=None)


def format_budget_table(report: dict) -> str:
    header = f"{'layer':58} {'shape':>12} {'choice':>7} {'error':>8} {'cost':>12} {'of dense':>8}"
    lines = [header, "-" * len(header)]
    for row in report["layers"]:
        choice = "dense" if row["nblocks"] is None else str(row["nblocks"])
        shape = f"{row['in_features']}->{row['out_features']}"
        lines.append(f"{row['name']:58} {shape:>12} {choice:>7} "
                     f"{row['error']:>8.4f} {row['cost']:>12,} {row['cost'] / row['dense_cost']:>8.3f}")
    uniform = report["uniform"]
    lines.append(f"budget           {report['fraction']} of {report['dense_cost']:,} {report['of']}: kept "
                 f"{report['cost']:,} ({report['achieved_fraction']:.3f}), summed {report['error']} error "
                 f"{report['objective']:.4f}")
    if uniform:
        lines.append(f"uniform nblocks  {uniform['nblocks']} at this budget: {uniform['achieved_fraction']:.3f}, "
                     f"summed error {uniform['objective']:.4f}")
    return "\n".join(lines)
