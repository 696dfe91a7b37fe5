#!/usr/bin/env python
"""The sequence mixer's training step (forward and backward) with its hand-written autograd functions (the long
convolution and the short filter) against the composed PyTorch ops they replace, side by side in one process.

    python benchmarks/bench_mixer_training.py                                 # M2-GPT's mixer at 4096 and 8192 tokens
    python benchmarks/bench_mixer_training.py --lengths 8192 --rounds 5 --json PATH

M2-GPT's sequence mixer (hidden 768, float32, batch 1 unless ``--batch``) unless ``--bidirectional`` (M2-BERT's). Each round times
``--steps`` steps of each variant, alternating the variants between rounds; the composed variant is the same module
with the functions switched off (as under ``torch.compile`` or autocast). The ratio is composed seconds over
function seconds, both medians of all their steps; every step's seconds are kept in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import m2_hf.m2_mixer as mixer_module  # noqa: E402
from benchmarks.bench_common import available_cores, cpu_model, load_average, log, positive_int, write_json  # noqa: E402
from m2_hf import M2BertConfig, M2GPTConfig  # noqa: E402

VARIANTS = ("functions", "composed")


def build_mixer(length: int, hidden: int, bidirectional: bool) -> mixer_module.M2SequenceMixer:
    config_class = M2BertConfig if bidirectional else M2GPTConfig
    config = config_class(hidden_size=hidden, max_position_embeddings=length)
    return mixer_module.M2SequenceMixer(config).train()


def variant(name: str):
    """The context a step of ``name`` runs in: the composed variant takes the mixer's fallback for inputs that the
    hand-written backwards do not serve."""
    if name == "composed":
        return mock.patch.object(mixer_module, "hand_written_backward_applies", lambda tensors: False)
    return contextlib.nullcontext()


def step_seconds(mixer, u: torch.Tensor) -> float:
    start = time.perf_counter()
    mixer(u).square().sum().backward()
    return time.perf_counter() - start


def measure(length: int, hidden: int, bidirectional: bool, rounds: int, steps: int, batch: int = 1) -> dict:
    torch.manual_seed(0)
    mixer = build_mixer(length, hidden, bidirectional)
    u = torch.randn(batch, length, hidden, requires_grad=True)
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for name in VARIANTS:  # one warm-up step each
        with variant(name):
            step_seconds(mixer, u)
    for round_index in range(rounds):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for name in order:
            with variant(name):
                samples[name] += [step_seconds(mixer, u) for _ in range(steps)]
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {"length": length, "batch": batch, "hidden": hidden, "bidirectional": bidirectional, "median_s": medians,
            "ratio": medians["composed"] / medians["functions"], "samples_s": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", type=positive_int, default=[4096, 8192])
    parser.add_argument("--hidden", type=positive_int, default=768)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--bidirectional", action="store_true", help="M2-BERT's mixer instead of M2-GPT's")
    parser.add_argument("--rounds", type=positive_int, default=4)
    parser.add_argument("--steps", type=positive_int, default=3, help="steps per variant and round")
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args()

    rows = []
    for length in args.lengths:
        log(f"mixer training step at {args.batch} x {length} tokens, hidden {args.hidden}")
        row = measure(length, args.hidden, args.bidirectional, args.rounds, args.steps, args.batch)
        rows.append(row)
        print(f"length {length:6d}: composed {row['median_s']['composed']:.3f} s, functions"
              f" {row['median_s']['functions']:.3f} s per step: {row['ratio']:.2f}x")
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "machine": platform.machine(), "cpu": cpu_model(),
                "cores": available_cores(), "torch": torch.__version__, "load_average": load_average(),
                "command": " ".join(sys.argv)}
        write_json(args.json, meta, rows, [])


if __name__ == "__main__":
    main()
