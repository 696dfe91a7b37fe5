#!/usr/bin/env python
"""Where an M2-BERT-base inference forward spends its time on CPU: seconds per forward and per layer, minor page
faults per forward, and the operators that take the most time (PyTorch profiler).

    python benchmarks/profile_m2_bert_inference.py                       # 16384 tokens, 12 layers, ~2 minutes
    python benchmarks/profile_m2_bert_inference.py --length 4096 --batch 4 --json PATH   # also every sample as JSON

Page faults count fresh memory that the allocator maps in; `benchmarks/RESULTS.md` explains why they matter here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # lets `python benchmarks/...` work without an installed package
    sys.path.insert(0, str(REPO_ROOT))

from m2_hf import M2BertConfig, M2BertModel  # noqa: E402
from bench_common import available_cores, cpu_model, positive_int  # noqa: E402  (the script's folder is on sys.path)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def build(length: int, layers: int) -> M2BertModel:
    torch.manual_seed(0)
    config = M2BertConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
        max_position_embeddings=length, long_conv_l_max=length,
    )
    return M2BertModel(config).eval()


def time_layers(model: M2BertModel) -> list[float]:
    """Registers hooks that append each layer's seconds to the returned list."""
    seconds: list[float] = []
    for layer in model.encoder.layer:
        layer.register_forward_pre_hook(lambda module, args: setattr(module, "_started", time.perf_counter()))
        layer.register_forward_hook(lambda module, args, out: seconds.append(time.perf_counter() - module._started))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=positive_int, default=16384)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--layers", type=positive_int, default=12)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--top", type=positive_int, default=12, help="operators to list")
    parser.add_argument("--json", type=Path, default=None, help="write every forward's and layer's seconds here")
    args = parser.parse_args()
    forwards = []

    model = build(args.length, args.layers)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length))
    layer_seconds = time_layers(model)
    with torch.no_grad():
        model(ids)  # computes and caches the filters
        for repeat in range(args.repeats):
            layer_seconds.clear()
            faults, started = minor_faults(), time.perf_counter()
            model(ids)
            total = time.perf_counter() - started
            forwards.append({"seconds": total, "tokens_per_s": args.batch * args.length / total,
                             "minor_page_faults": minor_faults() - faults, "layer_seconds": list(layer_seconds)})
            print(
                f"forward {repeat + 1}: {total:.2f} s, {args.batch * args.length / total:.0f} tokens/s, "
                f"{minor_faults() - faults} minor page faults; per layer {min(layer_seconds):.2f}-"
                f"{max(layer_seconds):.2f} s (median {statistics.median(layer_seconds):.2f})"
            )
        with torch.profiler.profile() as profiler:
            model(ids)
    print(f"\noperators, self time per layer (one profiled forward of {args.layers} layers):")
    operators = []
    for event in sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]:
        per_layer_ms = event.self_cpu_time_total / 1000 / args.layers
        operators.append({"operator": event.key, "self_ms_per_layer": per_layer_ms,
                          "calls_per_layer": event.count / args.layers})
        print(f"  {event.key:<28} {per_layer_ms:8.1f} ms  {event.count / args.layers:6.1f} calls")
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": available_cores(),
                "torch": torch.__version__, "python": platform.python_version(),
                "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"metadata": meta, "forwards": forwards, "operators": operators}, indent=1))


if __name__ == "__main__":
    main()
