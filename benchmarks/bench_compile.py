"""`torch.compile(fullgraph=True)` against eager PyTorch for the M2 models: inference and a training step.

For each model, the eager and the compiled (inductor) model run alternately on the same inputs, several rounds, so that
a loaded machine slows both alike; every raw time is kept in the JSON file, and the table reports medians and their
ratio (eager time / compiled time: above 1, compiling is faster). Eager inference on CPU takes the in-place fast path;
compiled code runs the reference forward, which inductor fuses.

    python benchmarks/bench_compile.py                      # M2-BERT, M2-GPT, M2-ViT, small configurations
    python benchmarks/bench_compile.py --models m2_bert --length 1024 --rounds 7
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import available_cores, cpu_model, load_average, log, positive_int, write_json  # noqa: E402

from m2_hf import (  # noqa: E402
    M2BertConfig,
    M2BertForMaskedLM,
    M2GPTConfig,
    M2GPTForCausalLM,
    M2ViTConfig,
    M2ViTForImageClassification,
)


def build(name: str, length: int, layers: int, hidden: int):
    """A model of ``layers`` layers and width ``hidden``, its inputs, and its training labels."""
    torch.manual_seed(0)
    if name == "m2_bert":
        config = M2BertConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              max_position_embeddings=length, long_conv_l_max=length, hyena_filter_order=64)
        model, ids = M2BertForMaskedLM(config), torch.randint(5, config.vocab_size, (2, length))
        mask = torch.ones_like(ids)
        mask[1, : length // 4] = 0  # padding: the mask is applied as in real batches
        return model, {"input_ids": ids, "attention_mask": mask}, ids
    if name == "m2_gpt":
        config = M2GPTConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                             max_position_embeddings=length, hyena_filter_order=64)
        ids = torch.randint(0, config.vocab_size, (2, length))
        return M2GPTForCausalLM(config), {"input_ids": ids, "use_cache": False}, ids
    config = M2ViTConfig(image_size=224, patch_size=16, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, hyena_filter_order=64, num_labels=10)
    return M2ViTForImageClassification(config), {"pixel_values": torch.randn(8, 3, 224, 224)}, torch.arange(8) % 10


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, args) -> list[dict]:
    model, inputs, labels = build(name, args.length, args.layers, args.hidden)
    compiled = torch.compile(model, fullgraph=True)

    def infer(m):
        model.eval()
        with torch.no_grad():
            m(**inputs)

    def train(m):
        model.train()
        m(**inputs, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)

    rows = []
    for mode, step in (("inference", infer), ("training step", train)):
        compile_seconds = timed(lambda: step(compiled))  # the first call compiles
        step(model)
        samples = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            samples["eager"].append(timed(lambda: step(model)))
            samples["compiled"].append(timed(lambda: step(compiled)))
        eager, fast = statistics.median(samples["eager"]), statistics.median(samples["compiled"])
        rows.append({"model": name, "mode": mode, "eager_median_s": eager, "compiled_median_s": fast,
                     "speedup": eager / fast, "first_compiled_call_s": compile_seconds,
                     "eager_samples_s": samples["eager"], "compiled_samples_s": samples["compiled"]})
        log(f"{name:8} {mode:14} eager {eager * 1e3:8.1f} ms  compiled {fast * 1e3:8.1f} ms  "
            f"speedup {eager / fast:5.2f}x  (first compiled call {compile_seconds:.0f} s)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["m2_bert", "m2_gpt", "m2_vit"],
                        choices=["m2_bert", "m2_gpt", "m2_vit"], help="models to measure")
    parser.add_argument("--length", type=positive_int, default=512, help="text length in tokens (default 512)")
    parser.add_argument("--layers", type=positive_int, default=2, help="layers per model (default 2)")
    parser.add_argument("--hidden", type=positive_int, default=256, help="hidden size (default 256)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed eager/compiled pairs (default 5)")
    parser.add_argument("--output", type=Path,
                        help="JSON file (default benchmarks/results/bench_compile_cpu_DATE.json)")
    args = parser.parse_args()
    date = datetime.date.today().isoformat()
    meta = {"date": date, "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
            "cpu": cpu_model(), "cores": available_cores(), "threads": torch.get_num_threads(),
            "load_average_before": load_average(), "python": platform.python_version(), **vars(args)}
    meta["output"] = str(meta["output"]) if meta["output"] else None
    rows = [row for name in args.models for row in measure(name, args)]
    meta["load_average_after"] = load_average()
    output = args.output or ROOT / "benchmarks" / "results" / f"bench_compile_cpu_{date}.json"
    write_json(output, meta, rows, [])


if __name__ == "__main__":
    main()
