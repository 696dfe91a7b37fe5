#!/usr/bin/env python
"""Where a training step of M2-GPT and of GPT-2 (both with the fused causal-LM loss) spends its time on CPU: the
share of the output layer and its loss, of the matrix products and of everything else, from the PyTorch profiler.

    python benchmarks/profile_m2_gpt_training.py                          # 4096 tokens, both models, ~4 minutes
    python benchmarks/profile_m2_gpt_training.py --length 8192 --json PATH  # also the operator table as JSON

Models as in `bench_generation.py` (hidden 768, 12 layers, GPT-2's 50257-token vocabulary, float32). A warm-up
step, then one profiled step per model; the profiler adds overhead, so read the shares, not the seconds (the
throughput figures are `bench_generation.py --parts training`'s). "Matrix products" are `mm`, `bmm`, `addmm` and
`addmm_` outside the loss; the loss's own products are in its share.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import available_cores, cpu_model, log, positive_int, write_json  # noqa: E402
from benchmarks.bench_generation import GPT2_FUSED, build_models, training_seconds_per_step  # noqa: E402

MATRIX_PRODUCTS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_")
LOSS_EVENT = "_FusedLinearCrossEntropy"


def operator_table(prof, rows: int) -> list[dict]:
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [{"name": e.key, "self_s": e.self_cpu_time_total / 1e6, "total_s": e.cpu_time_total / 1e6,
             "calls": e.count} for e in events[:rows]]


def loss_operators(prof) -> dict[str, float]:
    """Self seconds per operator inside the fused loss's forward (which also forms its gradients)."""
    loss_events = [e for e in prof.events() if e.name == LOSS_EVENT]
    inside: dict[str, float] = {}
    for loss_event in loss_events:
        stack = list(loss_event.cpu_children)
        while stack:
            event = stack.pop()
            inside[event.name] = inside.get(event.name, 0.0) + event.self_cpu_time_total / 1e6
            stack.extend(event.cpu_children)
    return inside


def shares(prof) -> dict[str, float]:
    averages = {e.key: e for e in prof.key_averages()}
    total = sum(e.self_cpu_time_total for e in averages.values()) / 1e6
    loss = averages[LOSS_EVENT].cpu_time_total / 1e6 if LOSS_EVENT in averages else 0.0
    in_loss = loss_operators(prof)
    products = sum(averages[name].self_cpu_time_total / 1e6 - in_loss.get(name, 0.0)
                   for name in MATRIX_PRODUCTS if name in averages)
    return {"profiled_step_s": total, "loss_and_output_layer": loss / total, "matrix_products": products / total,
            "everything_else": (total - loss - products) / total}


def profile_model(name: str, length: int, batch: int, rows: int, quick: bool = False) -> dict:
    model = build_models(length, quick=quick, names=[name])[name].train()
    loss_name = GPT2_FUSED if name == "gpt2" else name  # both with the fused loss
    warm_up = training_seconds_per_step(loss_name, model, batch, length)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        training_seconds_per_step(loss_name, model, batch, length)
    return {"model": name, "warm_up_step_s": warm_up, **shares(prof), "operators": operator_table(prof, rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=positive_int, default=4096)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--models", nargs="+", choices=["m2-gpt", "gpt2"], default=["m2-gpt", "gpt2"])
    parser.add_argument("--rows", type=positive_int, default=15, help="operators to print per model")
    parser.add_argument("--json", type=Path, help="write the shares and operator tables here")
    parser.add_argument("--quick", action="store_true", help="tiny models (hidden 64, 2 layers): a smoke test")
    args = parser.parse_args()

    results = []
    for name in args.models:
        log(f"profiling a training step of {name} at {args.batch} x {args.length} tokens")
        result = profile_model(name, args.length, args.batch, args.rows, args.quick)
        results.append(result)
        print(f"\n{name}: warm-up step {result['warm_up_step_s']:.1f} s, profiled step {result['profiled_step_s']:.1f} s;"
              f" loss and output layer {result['loss_and_output_layer']:.0%}, matrix products (outside the loss)"
              f" {result['matrix_products']:.0%}, everything else {result['everything_else']:.0%}")
        for row in result["operators"]:
            print(f"  {row['name'][:44]:44s} {row['self_s']:8.2f} s self {row['calls']:6d} calls")
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "cpu": cpu_model(),
                "cores": available_cores(), "torch": torch.__version__, "length": args.length, "batch": args.batch}
        write_json(args.json, meta, results, [])


if __name__ == "__main__":
    main()
