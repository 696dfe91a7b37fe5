"""`benchmarks/profile_m2_gpt_training.py`: the shares it reports add up and keep the loss's own matrix products out
of the model's. Tiny models (hidden 64, 2 layers)."""

from __future__ import annotations


import pytest

from benchmark_scripts import load_benchmark_script


profiler = load_benchmark_script("profile_m2_gpt_training")


@pytest.mark.parametrize("name", ["m2-gpt", "gpt2"])
def test_shares_add_up_and_the_loss_products_are_counted_once(name):
    result = profiler.profile_model(name, length=64, batch=2, rows=8, quick=True)
    parts = [result["loss_and_output_layer"], result["matrix_products"], result["everything_else"]]
    assert all(0 < part < 1 for part in parts)
    assert abs(sum(parts) - 1) < 1e-9
    assert len(result["operators"]) == 8 and result["profiled_step_s"] > 0


def test_loss_operators_are_found_inside_the_fused_loss():
    import torch
    from torch.profiler import profile

    from m2_hf.lm_loss import fused_linear_cross_entropy

    hidden = torch.randn(1, 16, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    with profile() as prof:
        fused_linear_cross_entropy(hidden, weight, torch.randint(0, 50, (1, 16))).backward()
        torch.mm(hidden[0], hidden[0].t())  # outside the loss
    inside = profiler.loss_operators(prof)
    mm_everywhere = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::mm") / 1e6
    assert 0 < inside["aten::mm"] < mm_everywhere
    assert "aten::addmm_" in inside
