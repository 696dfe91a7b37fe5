"""`m2-convert monarch --budget F`: nblocks chosen per layer within a fraction of the targeted layers' size."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from torch import nn
from transformers import AutoModel

from conversion.budget import Option, allocate, candidate_nblocks, option_error, plan_budget
from conversion.cli import main
from conversion.monarch import MonarchSettings, convert_to_monarch, linear_flops_per_token, resolve_targets
from m2_hf import MonarchLinear, projection_error
from test_conversion_monarch import inputs_for, write_calibration, write_source


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder, model = write_source(tmp_path_factory.mktemp("budget"), "bert", "BertModel")
    return folder, model


def _targeted_size(base: nn.Module, names, kind: str) -> int:
    """Parameters, or linear FLOPs per token, of the named layers as they are now (dense or structured)."""
    if kind == "parameters":
        return sum(p.numel() for name in names for p in base.get_submodule(name).parameters())
    wrapper = nn.ModuleList(base.get_submodule(name) for name in names)
    return linear_flops_per_token(wrapper)


@pytest.mark.parametrize("kind", ["parameters", "flops"])
@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_the_converted_model_keeps_at_most_the_budget(source, kind, fraction):
    folder, model = source
    names = list(resolve_targets(model.base_model, ["all"], {"*": 4}))
    dense = _targeted_size(model.base_model, names, kind)
    report = convert_to_monarch(folder, folder.parent / "unused", MonarchSettings(
        targets=["all"], budget=fraction, budget_of=kind), dry_run=True, progress=False)
    budget = report["budget"]
    # The dry run's model is not returned: rebuild the same layers and measure them.
    converted = convert_layers(model, budget["layers"])
    kept = _targeted_size(converted.base_model, names, kind)
    assert kept == budget["cost"] <= fraction * dense
    assert budget["dense_cost"] == dense
    assert budget["achieved_fraction"] == pytest.approx(kept / dense)
    # The budget is used: no single layer could be made denser within it.
    assert budget["cost"] > fraction * dense * 0.5


def convert_layers(model: nn.Module, rows: list[dict]) -> nn.Module:
    import copy

    converted = copy.deepcopy(model)
    for row in rows:
        if row["nblocks"] is not None:
            layer = converted.base_model.get_submodule(row["name"])
            converted.base_model.set_submodule(row["name"], MonarchLinear.from_linear(layer, nblocks=row["nblocks"]))
    return converted


def test_the_allocation_is_the_best_one_and_no_worse_than_uniform_nblocks(source):
    _, model = source
    names = list(resolve_targets(model.base_model, ["all"], {"*": 4}))
    for uniform_nblocks in (4, 8):
        uniform = convert_layers(model, [{"name": name, "nblocks": uniform_nblocks} for name in names])
        fraction = _targeted_size(uniform.base_model, names, "parameters") / _targeted_size(
            model.base_model, names, "parameters")
        report = plan_budget(model.base_model, names, "monarch", fraction)["report"]
        uniform_error = sum(projection_error(model.base_model.get_submodule(name).weight, uniform_nblocks)
                            for name in names)
        assert report["uniform"]["nblocks"] == uniform_nblocks
        assert report["uniform"]["objective"] == pytest.approx(uniform_error, rel=1e-4)
        assert report["objective"] <= uniform_error + 1e-6
    assert report["objective"] < uniform_error - 0.1  # mixing nblocks helps here, not just ties


def test_dynamic_programme_matches_exhaustive_search():
    rng = random.Random(0)
    for _ in range(30):
        layers = [[Option(None, rng.choice([48, 64]), 0.0)]
                  + [Option(b, rng.randint(1, 40), rng.random()) for b in range(2, rng.randint(3, 5))]
                  for _ in range(rng.randint(1, 4))]
        smallest = sum(min(o.cost for o in layer) for layer in layers)
        limit = rng.randint(smallest, sum(layer[0].cost for layer in layers))
        best = min((sum(o.error for o in combo), combo) for combo in itertools.product(*layers)
                   if sum(o.cost for o in combo) <= limit)[0]
        chosen = [layer[i] for layer, i in zip(layers, allocate(layers, limit))]
        assert sum(o.cost for o in chosen) <= limit
        assert sum(o.error for o in chosen) == pytest.approx(best)


class TwoLayers(nn.Module):
    def __init__(self, first: torch.Tensor, second: torch.Tensor):
        super().__init__()
        self.first, self.second = nn.Linear(16, 16), nn.Linear(16, 16)
        with torch.no_grad():
            self.first.weight.copy_(first)
            self.second.weight.copy_(second)


def test_structured_and_zero_layers_get_more_blocks_than_a_random_one():
    torch.manual_seed(0)
    random_weight = torch.randn(16, 16)
    monarch_weight = MonarchLinear(16, 16, nblocks=4).dense_weight().detach()
    assert candidate_nblocks(16, 16) == [2, 4, 8, 16]
    # Dense 272 each; Monarch 4 blocks 144: the structured layer takes 4 blocks for free, the random one stays dense.
    plan = plan_budget(TwoLayers(monarch_weight, random_weight), ["first", "second"], "monarch", (272 + 144) / 544)
    assert plan["choices"] == {"first": 4, "second": None}
    assert plan["report"]["objective"] < 1e-3
    # A zero layer is exact at any nblocks: it takes the most blocks, leaving the rest to the random layer.
    plan = plan_budget(TwoLayers(torch.zeros(16, 16), random_weight), ["second", "first"], "monarch", 0.4)
    assert plan["choices"] == {"second": 4, "first": 16}
    # Among allocations of equal error, the cheapest: zero layers take the most blocks even when the budget allows more.
    plan = plan_budget(TwoLayers(torch.zeros(16, 16), torch.zeros(16, 16)), ["first", "second"], "monarch", 0.9)
    assert plan["choices"] == {"first": 16, "second": 16}


def test_output_error_weighs_the_directions_inputs_take():
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    weight_error = option_error(layer, 4, "monarch", None)
    assert option_error(layer, 4, "monarch", torch.eye(16, dtype=torch.float64)) == pytest.approx(weight_error, 1e-4)
    # Inputs confined to one direction: the output error is that of one column, not of the whole weight.
    one_direction = torch.zeros(16, 16, dtype=torch.float64)
    one_direction[3, 3] = 1.0
    projected = MonarchLinear.from_linear(layer, nblocks=4).dense_weight().detach()
    column = layer.weight.detach()[:, 3]
    column_error = float((projected[:, 3] - column).norm() / column.norm())
    assert option_error(layer, 4, "monarch", one_direction) == pytest.approx(column_error, rel=1e-4)


def test_cli_writes_mixed_nblocks_that_load_and_go_back_to_dense(source, tmp_path, capsys):
    folder, original = source
    out, back = tmp_path / "monarch", tmp_path / "dense"
    calibration = write_calibration(tmp_path)
    assert main(["monarch", str(folder), str(out), "--targets", "all", "--budget", "0.5",
                 "--calibration-file", str(calibration)]) == 0
    err = capsys.readouterr().err
    assert "choice" in err and "budget           0.5 of" in err and "summed output error" in err
    report = json.loads((out / "conversion_report.json").read_text())
    budget = report["budget"]
    assert budget["error"] == "output" and budget["of"] == "parameters" and budget["achieved_fraction"] <= 0.5
    targeted = list(resolve_targets(original.base_model, ["all"], {"*": 4}))
    assert [row["name"] for row in budget["layers"]] == targeted
    structured = {row["name"]: row["nblocks"] for row in budget["layers"] if row["nblocks"] is not None}
    config = json.loads((out / "config.json").read_text())
    assert config["monarch_layers"] == structured
    assert len(set(structured.values())) > 1 or len(structured) < len(targeted)  # a real per-layer choice
    assert sum(report["settings"][k] is not None for k in ("budget", "budget_of")) == 2

    converted = AutoModel.from_pretrained(out).eval()
    for name, nblocks in structured.items():
        assert converted.base_model.get_submodule(name).nblocks == nblocks
    assert main(["dense", str(out), str(back)]) == 0
    dense = AutoModel.from_pretrained(back).eval()
    assert type(dense) is type(original)
    inputs = inputs_for("bert", "BertModel")
    with torch.no_grad():
        torch.testing.assert_close(dense(**inputs).last_hidden_state, converted(**inputs).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)


def test_dry_run_shows_the_plan_and_writes_nothing(source, tmp_path, capsys):
    folder, _ = source
    out = tmp_path / "monarch"
    assert main(["monarch", str(folder), str(out), "--budget", "0.4", "--budget-of", "flops", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert not out.exists()
    report = json.loads(captured.out)
    assert report["budget"]["of"] == "flops" and report["budget"]["error"] == "weight"
    assert "of dense" in captured.err and "flops: kept" in captured.err


def test_second_moments_of_all_layers_in_one_pass_match_the_per_layer_statistics(source, tmp_path):
    from conversion.budget import input_second_moments
    from conversion.calibration import input_statistics
    from conversion.monarch import calibration_data, load_tokenizer, read_calibration_text

    folder, model = source
    lines = read_calibration_text(write_calibration(tmp_path))
    # Batches of different lengths, so that padding is present and must be left out.
    batches = calibration_data(load_tokenizer(folder), lines).batches
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    moments = input_second_moments(model, names, batches)
    for name in names:
        expected = input_statistics(model, model, name, batches).second
        torch.testing.assert_close(moments[name], expected, rtol=1e-5, atol=1e-7)
