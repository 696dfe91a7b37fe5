#!/usr/bin/env python
"""CPU benchmark: converted (Monarch) models against their dense originals, inference and a training step.

Shapes: all-MiniLM-L6-v2 (hidden 384, 6 layers, MLP 1536) and BERT-base (hidden 768, 12 layers, MLP 3072), as
Transformers' BERT with random weights from a config. The converted variants are built with the converter's own
functions: ``conversion.monarch.resolve_targets`` picks the layers of a target preset (``mlp``: the two MLP layers of
each block; ``all``: every linear layer of the blocks) and ``m2_hf.structure_linear_layers`` replaces them by
``MonarchLinear`` layers (what a converted checkpoint loads into). Weights are random: speed does not depend on them.

Measured, side by side in interleaved rounds (dense, mlp, all, dense, ...), every sample kept:

- inference: ``BertModel`` forward under ``torch.inference_mode``, batch 32 x 128 tokens, float32;
- training step: ``BertForSequenceClassification`` forward, backward and a fused AdamW step, the optimizer `Trainer`
  takes by default (``adamw_torch_fused``) (batch 8 x 128 by default; the dense-to-sparse runs' shape is
  ``--train-batch 32 --length 56``).

Reproduce (from the repository root, inside the project's virtual environment)::

    python benchmarks/bench_converted.py --json benchmarks/results/bench_converted_cpu_<date>.json
    python benchmarks/bench_converted.py --quick     # smoke test, seconds

Ratios are dense time / converted time from medians of the same run. Verdict lines check the issue-19 targets.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # lets `python benchmarks/bench_converted.py` work without an installed package
    sys.path.insert(0, str(REPO_ROOT))
if str(REPO_ROOT / "benchmarks") not in sys.path:  # bench_common, when the script is loaded from elsewhere (tests)
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from conversion.monarch import resolve_targets  # noqa: E402
from m2_hf import (  # noqa: E402
    MonarchLinear,
    measured_inference_paths,
    measured_training_paths,
    set_structured_inference_path,
    set_structured_training_path,
    structure_linear_layers,
)
from m2_hf.monarch import _INFERENCE_PATHS, _TRAINING_PATHS  # noqa: E402
from bench_common import available_cores, cpu_model, load_average, log, positive_int, write_json  # noqa: E402

SHAPES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
VARIANTS = ("dense", "mlp", "all")
# Issue 19: (shape, variant) -> least inference (training step) speed-up over the dense original.
INFERENCE_TARGETS = {("bert-base", "mlp"): 1.5, ("minilm", "mlp"): 1.2}
TRAINING_TARGETS = {("minilm", "mlp"): 1.3}
NEVER_SLOWER = 1.0
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "out" / "bench_converted.json"


def build(shape: str, variant: str, cls, nblocks: int, inference_path: str = "auto",
          training_path: str = "auto") -> torch.nn.Module:
    config = BertConfig(**SHAPES[shape], num_labels=2, attn_implementation="sdpa")
    model = cls(config)
    if variant != "dense":
        layers = resolve_targets(model.base_model, [variant], {"*": nblocks})
        structure_linear_layers(model.base_model, layers, "monarch")
        set_structured_inference_path(model, inference_path)
        set_structured_training_path(model, training_path)
    return model


def inference_call(model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.inference_mode():
            model(**batch)

    return run


def training_call(model: torch.nn.Module, batch: dict,
                  autocast_dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    """Forward, backward and an AdamW step; under autocast to ``autocast_dtype`` if given (`Trainer(bf16=True)`). The
    optimizer is fused, as `Trainer`'s default: on CPU the unfused AdamW loops over the parameters one by one."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    device_type = next(model.parameters()).device.type

    def run() -> None:
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    run.optimizer = optimizer
    return run


def measured_path_choices(mode: str = "inference") -> list[dict]:
    """`m2_hf.measured_inference_paths()` (or `measured_training_paths()`, ``mode="training"``) as records, one per
    layer shape, dtype and call size."""
    table = measured_inference_paths() if mode == "inference" else measured_training_paths()
    return [
        {"layer": key[0], "in_features": key[1], "out_features": key[2], "nblocks": key[3], "device": key[4],
         "dtype": str(key[5]), "autocast_dtype": str(key[6]), "rows_up_to": key[7], "path": path}
        for key, path in table.items()
    ]


def batch_of(config: BertConfig, batch: int, length: int, labels: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, config.vocab_size, (batch, length), generator=generator),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
    }
    if labels:
        inputs["labels"] = torch.randint(0, 2, (batch,), generator=generator)
    return inputs


def time_rounds(calls: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[dict]]:
    """One warm-up call each, then ``rounds`` rounds that time every call once, in turn."""
    for call in calls.values():
        call()
    samples: dict[str, list[dict]] = {name: [] for name in calls}
    for index in range(rounds):
        for name, call in calls.items():
            gc.collect()
            start = time.perf_counter()
            call()
            samples[name].append({"seconds": time.perf_counter() - start, "load_average_1m": load_average()})
        log(f"  round {index + 1}/{rounds}: " + ", ".join(f"{n} {s[-1]['seconds']:.2f}s" for n, s in samples.items()))
    return samples


def measure(shape: str, mode: str, args: argparse.Namespace) -> list[dict]:
    cls, batch_size, labels = (
        (BertModel, args.batch, False) if mode == "inference" else (BertForSequenceClassification, args.train_batch, True)
    )
    models = {variant: build(shape, variant, cls, args.nblocks, args.inference_path, args.training_path)
              for variant in VARIANTS}
    batch = batch_of(models["dense"].config, batch_size, args.length, labels)
    make_call = inference_call if mode == "inference" else training_call
    log(f"{shape} {mode}: batch {batch_size} x {args.length}")
    samples = time_rounds({variant: make_call(model, batch) for variant, model in models.items()}, args.rounds)
    dense = statistics.median(s["seconds"] for s in samples["dense"])
    rows = []
    for variant, model in models.items():
        median = statistics.median(s["seconds"] for s in samples[variant])
        structured = [m for m in model.modules() if isinstance(m, MonarchLinear)]
        rows.append(
            {
                "shape": shape,
                "mode": mode,
                "variant": variant,
                "nblocks": None if variant == "dense" else args.nblocks,
                "batch": batch_size,
                "length": args.length,
                "monarch_layers": len(structured),
                "parameters": sum(p.numel() for p in model.parameters()),
                "median_seconds": median,
                "speedup_vs_dense": dense / median,
                "samples": samples[variant],
            }
        )
    del models
    gc.collect()
    return rows


def evaluate_targets(rows: list[dict]) -> list[dict]:
    verdicts = []
    for row in rows:
        if row["variant"] == "dense":
            continue
        label = f"{row['shape']} {row['variant']} nblocks={row['nblocks']} {row['mode']} {row['batch']}x{row['length']}"
        value = row["speedup_vs_dense"]
        targets = INFERENCE_TARGETS if row["mode"] == "inference" else TRAINING_TARGETS
        threshold = targets.get((row["shape"], row["variant"]))
        checks = [(f"speed-up >= {threshold}x (issue 19)", threshold)] if threshold else []
        if row["mode"] == "inference":
            checks.append((f"never slower than dense (>= {NEVER_SLOWER}x)", NEVER_SLOWER))
        for target, minimum in checks:
            verdicts.append(
                {"layer": label, "target": target, "value": value, "detail": f"{value:.2f}x",
                 "verdict": "PASS" if value >= minimum else "MISS"}
            )
    return verdicts


def print_report(meta: dict, rows: list[dict], verdicts: list[dict]) -> None:
    print("Converted (Monarch) models vs their dense originals (float32, CPU, random weights)")
    print(f"  date {meta['date']}   torch {meta['torch']}   cpu {meta['cpu']}, torch threads {meta['threads']}")
    print(f"  rounds {meta['rounds']} (median), load average at start {meta['load_average_start']}, "
          f"at end {meta['load_average_end']}")
    print(f"  converted layers' inference_path: {meta['inference_path']}, training_path: "
          f"{meta.get('training_path', 'auto')}")
    for mode in ("inference", "training"):
        for choice in meta.get(f"measured_{mode}_paths", []):
            shape = f"{choice['in_features']}->{choice['out_features']} nblocks {choice['nblocks']}"
            print(f"    measured ({mode}) {shape}, calls of up to {choice['rows_up_to']} rows: {choice['path']}")
    print()
    print(f"{'shape':10} {'mode':9} {'variant':7} {'batch':>9} {'params M':>8} {'median s':>9} {'speed-up':>8} "
          f"{'spread':>7}")
    for row in rows:
        seconds = [s["seconds"] for s in row["samples"]]
        spread = (max(seconds) - min(seconds)) / row["median_seconds"]
        print(f"{row['shape']:10} {row['mode']:9} {row['variant']:7} {row['batch']:>4} x {row['length']:<3} "
              f"{row['parameters'] / 1e6:8.1f} {row['median_seconds']:9.3f} {row['speedup_vs_dense']:7.2f}x "
              f"{spread:6.0%}")
    print()
    print("speed-up = dense median / converted median, timed in the same interleaved rounds; spread = (max - min) / "
          "median")
    print()
    print("Targets (measured in this run)")
    for item in verdicts:
        print(f"  {item['verdict']:<4}  {item['layer']:<40}  {item['target']} ({item['detail']})")
    counts = {v: sum(item["verdict"] == v for item in verdicts) for v in ("PASS", "MISS")}
    print(f"Summary: {counts['PASS']} PASS, {counts['MISS']} MISS of {len(verdicts)} checks", flush=True)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--modes", nargs="+", choices=("inference", "training"), default=["inference", "training"])
    parser.add_argument("--nblocks", type=positive_int, default=4)
    parser.add_argument("--inference-path", choices=_INFERENCE_PATHS, default="auto",
                        help="the converted models' `inference_path` (default: %(default)s; `measured` times both "
                             "exact paths per layer shape in the warm-up call)")
    parser.add_argument("--training-path", choices=_TRAINING_PATHS, default="auto",
                        help="the converted models' `training_path` (default: %(default)s: the structured multiply on "
                             "CPU)")
    parser.add_argument("--batch", type=positive_int, default=32, help="inference batch (default: %(default)s)")
    parser.add_argument("--train-batch", type=positive_int, default=8, help="training batch (default: %(default)s)")
    parser.add_argument("--length", type=positive_int, default=128, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed rounds (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: all available cores)")
    parser.add_argument("--json", type=Path, default=DEFAULT_OUT, help="raw results (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke test: MiniLM, batch 2 x 16, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.batch, args.train_batch, args.length, args.rounds = ["minilm"], 2, 2, 16, 2
        if args.json == DEFAULT_OUT:
            args.json = DEFAULT_OUT.with_name("bench_converted_quick.json")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or available_cores())
    torch.manual_seed(0)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": available_cores(),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "nblocks": args.nblocks,
        "inference_path": args.inference_path,
        "training_path": args.training_path,
        "load_average_start": load_average(),
    }
    rows = [row for shape in args.shapes for mode in args.modes for row in measure(shape, mode, args)]
    meta["load_average_end"] = load_average()
    if args.inference_path == "measured":  # what the warm-up calls measured faster, per layer shape and call size
        meta["measured_inference_paths"] = measured_path_choices()
    if args.training_path == "measured":
        meta["measured_training_paths"] = measured_path_choices("training")
    verdicts = evaluate_targets(rows)
    print_report(meta, rows, verdicts)
    write_json(args.json, meta, rows, verdicts)
    return 0  # targets are reported, not enforced: a busy machine must not fail the run


if __name__ == "__main__":
    sys.exit(main())
