#!/usr/bin/env python
"""CPU benchmark: M2-GPT against Transformers' GPT-2 (SDPA attention, KV cache), same width and depth, in one run.

Reproduce (from the repository root, inside the project's virtual environment)::

    python benchmarks/bench_generation.py            # full run: about 35 minutes on 2 cores, 24 GB
    python benchmarks/bench_generation.py --quick    # tiny models, seconds (smoke test)

Models: `M2GPTForCausalLM` with its defaults (hidden 768, 12 layers, Monarch GLU MLP, nblocks 4) and
`GPT2LMHeadModel` of GPT-2 small's shape (hidden 768, 12 layers, 12 heads), both float32 without dropout, the
position table / filters long enough for the longest context.

1. Decode throughput: new tokens per second of greedy one-token steps (`model(next_token, cache=...)`, argmax) after
   a context of 512, 2048 and 8192 tokens, batch 1 and 8. The context is a cache of that length filled with random
   values of the right shapes (GPT-2: keys and values; M2-GPT: `M2GPTCache` convolution inputs): the cost of a step
   does not depend on the values, and prefilling 8 x 8192 tokens would take minutes per model. GPT-2 runs twice: with
   `DynamicCache` (grows by concatenation, Transformers' default) and with `StaticCache` (preallocated to the context
   plus the steps, written in place), and M2-GPT is compared with the faster of the two.
2. Training throughput: tokens per second of forward + backward (causal-LM loss over the 50257-token vocabulary,
   included for both) at sequence lengths 1024, 4096 and 8192, with 4096 tokens per step (batch = 4096 // length, at
   least one sequence). Each model and length runs in a fresh process (a warm-up step, then the measured ones).
   M2-GPT computes its training loss fused with the output layer (`fused_training_loss`, the default). That loss does
   not depend on the architecture, so GPT-2 gets it too (`m2_hf.lm_loss.fused_linear_cross_entropy` on its final
   hidden states and tied output weight): the targets compare the two with the same loss. Two more columns show each
   model with logits materialised and Transformers' loss.

Decode measurements alternate between the models; the tables give medians and the JSON file keeps every sample.
Targets (PASS/MISS, not an exit status), against the fair baseline: training at least 1.5x GPT-2's throughput at 4096
tokens and 2x at 8192 (both with the fused loss); decoding at least 1.3x the faster GPT-2 cache at a context of 8192
(both batch sizes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import available_cores, cpu_model, log, positive_int, write_json  # noqa: E402

TRAINING_TARGETS = {4096: 1.5, 8192: 2.0}
UNFUSED = "m2-gpt-unfused-loss"
GPT2_FUSED = "gpt2-fused-loss"
GPT2_STATIC = "gpt2-static-cache"
DECODE_TARGETS = {8192: 1.3}


def build_models(max_length: int, quick: bool, fused_training_loss: bool = True):
    import transformers

    from m2_hf import M2GPTConfig, M2GPTForCausalLM

    shape = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=256) if quick else {}
    m2_config = M2GPTConfig(max_position_embeddings=max_length, fused_training_loss=fused_training_loss, **shape)
    gpt2_config = transformers.GPT2Config(
        n_positions=max_length, n_embd=m2_config.hidden_size, n_layer=m2_config.num_hidden_layers,
        n_head=max(1, m2_config.hidden_size // 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    m2 = M2GPTForCausalLM(m2_config)
    gpt2 = transformers.GPT2LMHeadModel(gpt2_config)
    return {"m2-gpt": m2, "gpt2": gpt2}


def filled_cache(name: str, model, batch: int, context: int, steps: int):
    """A cache holding ``context`` tokens of random state, shaped as the model's own would be (room for ``steps``
    more where the cache is preallocated)."""
    config = model.config
    if name in ("gpt2", GPT2_STATIC):
        from transformers import DynamicCache, StaticCache

        if name == GPT2_STATIC:
            cache = StaticCache(config=config, max_cache_len=context + steps)
        else:
            cache = DynamicCache(config=config)
        heads = config.n_head
        for layer in range(config.n_layer):
            keys = torch.randn(batch, heads, context, config.n_embd // heads)
            cache.update(keys, torch.randn_like(keys), layer)
        return cache
    from m2_hf import M2GPTCache

    cache = M2GPTCache(config)
    channels = config.hidden_size * (2 if config.residual_long_conv else 1)
    for layer in cache.layers:
        layer.append(torch.randn(3 * config.hidden_size, batch, 2), torch.randn(channels, batch, context))
    return cache


@torch.no_grad()
def decode_seconds_per_step(name: str, model, batch: int, context: int, steps: int) -> float:
    cache = filled_cache(name, model, batch, context, steps + 2)
    token = torch.randint(0, model.config.vocab_size, (batch, 1))
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            start = time.perf_counter()
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - start) / steps


def gpt2_fused_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """GPT-2's causal-LM loss computed as M2-GPT's is: fused with the (tied, bias-free) output layer."""
    from m2_hf.lm_loss import fused_linear_cross_entropy

    hidden = model.transformer(ids, use_cache=False).last_hidden_state
    return fused_linear_cross_entropy(hidden, model.lm_head.weight, ids)


def training_seconds_per_step(name: str, model, batch: int, length: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    if name == GPT2_FUSED:
        loss = gpt2_fused_loss(model, ids)
    else:
        loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    return time.perf_counter() - start


def training_in_fresh_process(name: str, length: int, batch: int, repeats: int, quick: bool) -> list[float]:
    """Seconds of a warm-up and ``repeats`` training steps of one model, in its own process: a long run's freed
    activations stay in this process's heap, and GPT-2 at 4096 tokens then ran out of 24 GB."""
    command = [sys.executable, __file__, "--child-train", name, str(length), str(batch), str(repeats)]
    result = subprocess.run(command + (["--quick"] if quick else []), capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"training {name} at {length} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_train(name: str, length: int, batch: int, repeats: int, quick: bool) -> None:
    if name == UNFUSED:
        model = build_models(length, quick, fused_training_loss=False)["m2-gpt"].train()
    else:
        model = build_models(length, quick)["gpt2" if name == GPT2_FUSED else name].train()
    print(json.dumps([training_seconds_per_step(name, model, batch, length) for _ in range(repeats + 1)][1:]))


def interleaved_samples(measure: dict, repeats: int) -> dict[str, list[float]]:
    """``measure``: {model name: zero-argument callable returning seconds}; one warm-up each, then rounds."""
    samples = {name: [] for name in measure}
    for name, run in measure.items():
        run()
    for _ in range(repeats):
        for name, run in measure.items():
            samples[name].append(run())
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and lengths: a smoke test")
    parser.add_argument("--contexts", nargs="+", type=positive_int, default=[512, 2048, 8192])
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[1, 8])
    parser.add_argument("--decode-steps", type=positive_int, default=8)
    parser.add_argument("--train-lengths", nargs="+", type=positive_int, default=[1024, 4096, 8192])
    parser.add_argument("--train-tokens", type=positive_int, default=4096, help="tokens per training step (at least one sequence)")
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks/out/bench_generation.json")
    parser.add_argument("--child-train", nargs=4, metavar=("MODEL", "LENGTH", "BATCH", "REPEATS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_train:
        name, length, batch, repeats = args.child_train
        return child_train(name, int(length), int(batch), int(repeats), args.quick)
    if args.quick:
        args.contexts, args.train_lengths, args.train_tokens, args.decode_steps = [64, 256], [128, 256], 512, 4
    max_length = max(max(args.contexts) + args.decode_steps + 4, max(args.train_lengths))
    models = build_models(max_length, args.quick)
    parameters = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    log(f"parameters: {parameters}")

    rows, verdicts = [], []
    decoders = {"m2-gpt": models["m2-gpt"], "gpt2": models["gpt2"], GPT2_STATIC: models["gpt2"]}
    print("decode: new tokens/s after a cached context (greedy one-token steps)")
    print(f"{'context':>8} {'batch':>6} {'M2-GPT tok/s':>13} {'GPT-2 dynamic':>14} {'GPT-2 static':>13}"
          f" {'ratio to the faster GPT-2':>26}")
    for model in models.values():
        model.eval()
    for context in args.contexts:
        for batch in args.batches:
            log(f"decode context={context} batch={batch}")
            samples = interleaved_samples(
                {name: (lambda n=name, m=model: decode_seconds_per_step(n, m, batch, context, args.decode_steps))
                 for name, model in decoders.items()},
                args.repeats,
            )
            rate = {name: batch / statistics.median(values) for name, values in samples.items()}
            baseline = max(rate["gpt2"], rate[GPT2_STATIC])
            ratio = rate["m2-gpt"] / baseline
            rows.append({"kind": "decode", "context": context, "batch": batch, "tokens_per_s": rate,
                         "ratio_to_faster_gpt2": ratio, "seconds_per_step_samples": samples})
            print(f"{context:>8} {batch:>6} {rate['m2-gpt']:>13.1f} {rate['gpt2']:>14.1f} {rate[GPT2_STATIC]:>13.1f}"
                  f" {ratio:>25.2f}x", flush=True)
            if context in DECODE_TARGETS and not args.quick:
                verdicts.append({"what": f"decode context {context} batch {batch} (vs the faster GPT-2 cache)",
                                 "ratio": ratio, "target": DECODE_TARGETS[context],
                                 "pass": ratio >= DECODE_TARGETS[context]})

    print(f"\ntraining: forward+backward tokens/s, {args.train_tokens} tokens per step")
    print(f"{'length':>8} {'batch':>6} {'M2-GPT fused':>13} {'GPT-2 fused':>12} {'ratio':>7}"
          f" {'M2-GPT unfused':>15} {'GPT-2 unfused':>14} {'ratio':>7}")
    del models, decoders
    for length in args.train_lengths:
        batch = max(1, args.train_tokens // length)
        log(f"training length={length} batch={batch}")
        samples = {name: training_in_fresh_process(name, length, batch, args.repeats, args.quick)
                   for name in ("m2-gpt", GPT2_FUSED, UNFUSED, "gpt2")}
        rate = {name: batch * length / statistics.median(values) for name, values in samples.items()}
        ratio = rate["m2-gpt"] / rate[GPT2_FUSED]
        unfused_ratio = rate[UNFUSED] / rate["gpt2"]
        rows.append({"kind": "training", "length": length, "batch": batch, "tokens_per_s": rate,
                     "ratio_fused_loss": ratio, "ratio_unfused_loss": unfused_ratio,
                     "seconds_per_step_samples": samples})
        print(f"{length:>8} {batch:>6} {rate['m2-gpt']:>13.1f} {rate[GPT2_FUSED]:>12.1f} {ratio:>6.2f}x"
              f" {rate[UNFUSED]:>15.1f} {rate['gpt2']:>14.1f} {unfused_ratio:>6.2f}x", flush=True)
        if length in TRAINING_TARGETS and not args.quick:
            verdicts.append({"what": f"training length {length} (both with the fused loss)", "ratio": ratio,
                             "target": TRAINING_TARGETS[length], "pass": ratio >= TRAINING_TARGETS[length]})

    print()
    for verdict in verdicts:
        status = "PASS" if verdict["pass"] else "MISS"
        print(f"{status}  {verdict['what']}: {verdict['ratio']:.2f}x (target >= {verdict['target']}x)")
    meta = {
        "date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": available_cores(),
        "torch": torch.__version__, "python": platform.python_version(), "parameters": parameters,
        "arguments": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
    }
    write_json(args.json, meta, rows, verdicts)


if __name__ == "__main__":
    main()
