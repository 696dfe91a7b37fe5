#!/usr/bin/env python
"""CPU benchmark: M2-GPT against Transformers' GPT-2 (SDPA attention, KV cache), same width and depth, in one run.

Reproduce (from the repository root, inside the project's virtual environment)::

    python benchmarks/bench_generation.py            # full run: about 35 minutes on 2 cores, 24 GB
    python benchmarks/bench_generation.py --quick    # tiny models and lengths (smoke test; sizes given win)

Models: `M2GPTForCausalLM` with its defaults (hidden 768, 12 layers, Monarch GLU MLP, nblocks 4) and
`GPT2LMHeadModel` of GPT-2 small's shape (hidden 768, 12 layers, 12 heads), both float32 without dropout, the
position table / filters long enough for the longest context.

1. Decode throughput: new tokens per second of greedy one-token steps (`model(next_token, cache=...)`, argmax) after
   a context of 512, 2048 and 8192 tokens, batch 1 and 8. The context is a cache of that length filled with random
   values of the right shapes (GPT-2: keys and values; M2-GPT: `M2GPTCache` convolution inputs): the cost of a step
   does not depend on the values, and prefilling 8 x 8192 tokens would take minutes per model. GPT-2 runs twice: with
   `DynamicCache` (grows by concatenation, Transformers' default) and with `StaticCache` (preallocated to the context
   plus the steps, written in place).
2. Training throughput: tokens per second of forward + backward (causal-LM loss over the 50257-token vocabulary,
   included for both) at sequence lengths 1024, 4096 and 8192, with 4096 tokens per step (batch = 4096 // length, at
   least one sequence). Each model and length runs in a fresh process: two warm-up steps (`--train-warmup`; a CPU
   process reaches its steady step time from the third step on), then the measured ones; the JSON keeps both.
   M2-GPT computes its training loss fused with the output layer (`fused_training_loss`, the default). That loss does
   not depend on the architecture, so GPT-2 gets it too (`m2_hf.lm_loss.fused_linear_cross_entropy` on its final
   hidden states and tied output weight), as its own column beside GPT-2 with Transformers' loss on materialised
   logits; M2-GPT with that unfused loss is shown too.

Before timing, the run checks the two baselines it adds: GPT-2 with `StaticCache` decodes the same greedy tokens as
with `DynamicCache`, and GPT-2's fused loss equals Transformers' loss (value and output-layer gradient); the JSON file
records both checks. Decode measurements alternate between the models; the tables give medians and the JSON file keeps
every sample (every decode step's seconds, every training step's seconds).

Targets (PASS/MISS, not an exit status) read the fair columns: M2-GPT against the faster GPT-2 variant of each table.
Training at least 1.5x at 4096 tokens and 2x at 8192; decoding at least 1.3x at a context of 8192 (both batch sizes).
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
from typing import Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_common import available_cores, cpu_model, log, positive_int, write_json  # noqa: E402

TRAINING_TARGETS = {4096: 1.5, 8192: 2.0}
DECODE_TARGETS = {8192: 1.3}
UNFUSED = "m2-gpt-unfused-loss"
GPT2_FUSED = "gpt2-fused-loss"
GPT2_STATIC = "gpt2-static-cache"
GPT2_DECODERS = ("gpt2", GPT2_STATIC)  # DynamicCache, StaticCache
GPT2_TRAINERS = (GPT2_FUSED, "gpt2")  # fused loss, Transformers' loss on materialised logits
PARTS = ("decode", "training")
# Sizes of a full run and of --quick (tiny models, a smoke test); options given on the command line win.
PRESETS = {
    "full": dict(contexts=[512, 2048, 8192], train_lengths=[1024, 4096, 8192], train_tokens=4096, decode_steps=8),
    "quick": dict(contexts=[64, 256], train_lengths=[128, 256], train_tokens=512, decode_steps=4),
}


def build_models(max_length: int, quick: bool, fused_training_loss: bool = True, names=("m2-gpt", "gpt2")):
    """The models ``names`` (``"m2-gpt"``, ``"gpt2"``) of the same width and depth, each from seed 0."""
    import transformers

    from m2_hf import M2GPTConfig, M2GPTForCausalLM

    shape = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=256) if quick else {}
    m2_config = M2GPTConfig(max_position_embeddings=max_length, fused_training_loss=fused_training_loss, **shape)
    gpt2_config = transformers.GPT2Config(
        n_positions=max_length, n_embd=m2_config.hidden_size, n_layer=m2_config.num_hidden_layers,
        n_head=max(1, m2_config.hidden_size // 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    builders = {"m2-gpt": lambda: M2GPTForCausalLM(m2_config),
                "gpt2": lambda: transformers.GPT2LMHeadModel(gpt2_config)}
    models = {}
    for name in names:
        torch.manual_seed(0)
        models[name] = builders[name]()
    return models


def empty_gpt2_cache(name: str, config, max_length: int):
    """GPT-2's cache for decoder ``name``: `DynamicCache` (grows by concatenation, Transformers' default) or
    `StaticCache` preallocated to ``max_length`` tokens and written in place."""
    from transformers import DynamicCache, StaticCache

    if name == GPT2_STATIC:
        return StaticCache(config=config, max_cache_len=max_length)
    return DynamicCache(config=config)


def filled_cache(name: str, model, batch: int, context: int, steps: int):
    """A cache holding ``context`` tokens of random state, shaped as the model's own would be (room for ``steps``
    more where the cache is preallocated)."""
    config = model.config
    if name in GPT2_DECODERS:
        cache = empty_gpt2_cache(name, config, context + steps)
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
def decode_step_seconds(name: str, model, batch: int, context: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` greedy one-token steps after ``context`` cached tokens (two warm-up steps first)."""
    cache = filled_cache(name, model, batch, context, steps + 2)
    token = torch.randint(0, model.config.vocab_size, (batch, 1))
    seconds = []
    for step in range(steps + 2):
        start = time.perf_counter()
        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        if step >= 2:
            seconds.append(time.perf_counter() - start)
    return seconds


@torch.no_grad()
def greedy_decode(model, prompt: torch.Tensor, steps: int, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation of ``prompt`` through ``cache``, one token per step: the tokens ``[batch, steps]`` and the
    logits that chose them ``[batch, steps, vocab]``."""
    logits = model(prompt, cache=cache, use_cache=True).logits[:, -1]
    tokens, chosen_by = [], []
    for step in range(steps):
        tokens.append(logits.argmax(-1, keepdim=True))
        chosen_by.append(logits)
        if step + 1 < steps:
            logits = model(tokens[-1], cache=cache, use_cache=True).logits[:, -1]
    return torch.cat(tokens, 1), torch.stack(chosen_by, 1)


def check_static_cache(model, batch: int = 2, prompt_length: int = 16, steps: int = 8) -> dict:
    """GPT-2 decoding with the preallocated cache against `DynamicCache` on the same prompt: the same greedy tokens
    (else the baseline would be measuring something else)."""
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_length), generator=generator)
    decoded = {name: greedy_decode(model, prompt, steps, empty_gpt2_cache(name, model.config, prompt_length + steps))
               for name in GPT2_DECODERS}
    (dynamic_tokens, dynamic_logits), (static_tokens, static_logits) = decoded["gpt2"], decoded[GPT2_STATIC]
    return {"prompt_tokens": prompt_length, "steps": steps, "batch": batch,
            "same_tokens": bool(torch.equal(dynamic_tokens, static_tokens)),
            "max_logit_difference": float((dynamic_logits - static_logits).abs().max()),
            "tokens": dynamic_tokens.tolist()}


def gpt2_fused_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """GPT-2's causal-LM loss computed as M2-GPT's is: fused with the (tied, bias-free) output layer."""
    from m2_hf.lm_loss import fused_linear_cross_entropy

    hidden = model.transformer(ids, use_cache=False).last_hidden_state
    return fused_linear_cross_entropy(hidden, model.lm_head.weight, ids)


def check_fused_loss(model, batch: int = 2, length: int = 32) -> dict:
    """GPT-2's fused loss against Transformers' loss on the same batch: the same value and output-layer gradient."""
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    losses, gradients = {}, {}
    for name, loss_of in (("plain", lambda: model(ids, labels=ids, use_cache=False).loss),
                          ("fused", lambda: gpt2_fused_loss(model, ids))):
        model.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        losses[name], gradients[name] = loss.item(), model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    scale = gradients["plain"].abs().max().item()
    return {"plain_loss": losses["plain"], "fused_loss": losses["fused"],
            "loss_difference": abs(losses["plain"] - losses["fused"]),
            "max_relative_gradient_difference": (gradients["plain"] - gradients["fused"]).abs().max().item() / scale}


def check_baselines(gpt2) -> dict:
    """Both correctness checks of the fair GPT-2 baselines; stops the run when either fails."""
    checks = {"static_cache": check_static_cache(gpt2), "fused_loss": check_fused_loss(gpt2)}
    if not checks["static_cache"]["same_tokens"]:
        raise SystemExit(f"GPT-2 with StaticCache decodes other tokens than with DynamicCache: {checks}")
    fused = checks["fused_loss"]
    if fused["loss_difference"] > 1e-4 * abs(fused["plain_loss"]) or fused["max_relative_gradient_difference"] > 1e-3:
        raise SystemExit(f"GPT-2's fused loss differs from Transformers' loss: {fused}")
    return checks


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


def training_in_fresh_process(
    name: str, length: int, batch: int, repeats: int, quick: bool, warmup: int
) -> dict[str, list[float]]:
    """Seconds of ``warmup`` and then ``repeats`` training steps of one model (``{"warmup": [...], "steps": [...]}``),
    in its own process: a long run's freed activations stay in this process's heap, and GPT-2 at 4096 tokens then ran
    out of 24 GB."""
    command = [sys.executable, __file__, "--child-train", name, str(length), str(batch), str(repeats), str(warmup)]
    result = subprocess.run(command + (["--quick"] if quick else []), capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"training {name} at {length} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_train(name: str, length: int, batch: int, repeats: int, quick: bool, warmup: int) -> None:
    architecture = {UNFUSED: "m2-gpt", GPT2_FUSED: "gpt2"}.get(name, name)
    model = build_models(length, quick, fused_training_loss=name != UNFUSED, names=[architecture])[architecture]
    model.train()
    seconds = [training_seconds_per_step(name, model, batch, length) for _ in range(warmup + repeats)]
    print(json.dumps({"warmup": seconds[:warmup], "steps": seconds[warmup:]}))


def fair_ratio(rate: dict[str, float], baselines: tuple[str, ...]) -> float:
    """M2-GPT's rate over the fastest of the GPT-2 ``baselines``: the comparison the targets read."""
    return rate["m2-gpt"] / max(rate[name] for name in baselines)


def verdict(what: str, ratio: float, target: float) -> dict:
    return {"what": what, "ratio": ratio, "target": target, "pass": ratio >= target}


def interleaved_samples(measure: dict, repeats: int) -> dict[str, list[float]]:
    """``measure``: {model name: zero-argument callable returning seconds}; one warm-up each, then rounds."""
    samples = {name: [] for name in measure}
    for name, run in measure.items():
        run()
    for _ in range(repeats):
        for name, run in measure.items():
            samples[name].append(run())
    return samples


def parse_arguments(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and lengths: a smoke test")
    parser.add_argument("--contexts", nargs="+", type=positive_int, help="decode contexts (default 512 2048 8192)")
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[1, 8])
    parser.add_argument("--decode-steps", type=positive_int, help="measured steps per decode sample (default 8)")
    parser.add_argument("--train-lengths", nargs="+", type=positive_int, help="default 1024 4096 8192")
    parser.add_argument("--train-tokens", type=positive_int, help="tokens per training step (default 4096; at least "
                                                                    "one sequence)")
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--train-warmup", type=positive_int, default=2,
                        help="unmeasured training steps first (default 2: a CPU process reaches its steady step time "
                             "at the third step, when the allocator reuses the first steps' freed memory)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what to measure (default: both; e.g. decoding again after a change to it)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks/out/bench_generation.json")
    parser.add_argument("--child-train", nargs=5, metavar=("MODEL", "LENGTH", "BATCH", "REPEATS", "WARMUP"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    return args


def decode_rows(models: dict, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    decoders = {"m2-gpt": models["m2-gpt"], "gpt2": models["gpt2"], GPT2_STATIC: models["gpt2"]}
    rows, verdicts = [], []
    print("decode: new tokens/s after a cached context (greedy one-token steps)")
    print(f"{'context':>8} {'batch':>6} {'M2-GPT tok/s':>13} {'GPT-2 dynamic':>14} {'GPT-2 static':>13}"
          f" {'ratio to the faster GPT-2':>26}")
    for context in args.contexts:
        for batch in args.batches:
            log(f"decode context={context} batch={batch}")
            samples = interleaved_samples(
                {name: (lambda n=name, m=model: decode_step_seconds(n, m, batch, context, args.decode_steps))
                 for name, model in decoders.items()},
                args.repeats,
            )
            # A round's figure is its mean step; the table reads the median round.
            rate = {name: batch / statistics.median(statistics.fmean(steps) for steps in rounds)
                    for name, rounds in samples.items()}
            ratio = fair_ratio(rate, GPT2_DECODERS)
            rows.append({"kind": "decode", "context": context, "batch": batch, "tokens_per_s": rate,
                         "ratio_to_faster_gpt2": ratio, "seconds_per_step_samples": samples})
            print(f"{context:>8} {batch:>6} {rate['m2-gpt']:>13.1f} {rate['gpt2']:>14.1f} {rate[GPT2_STATIC]:>13.1f}"
                  f" {ratio:>25.2f}x", flush=True)
            if context in DECODE_TARGETS and not args.quick:
                verdicts.append(verdict(f"decode context {context} batch {batch} (vs the faster GPT-2 cache)",
                                        ratio, DECODE_TARGETS[context]))
    return rows, verdicts


def training_rows(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    rows, verdicts = [], []
    print(f"\ntraining: forward+backward tokens/s, {args.train_tokens} tokens per step")
    print(f"{'length':>8} {'batch':>6} {'M2-GPT':>9} {'GPT-2 fused':>12} {'GPT-2':>9} {'ratio to the faster GPT-2':>26}"
          f" {'M2-GPT unfused':>15} {'ratio unfused':>14}")
    for length in args.train_lengths:
        batch = max(1, args.train_tokens // length)
        log(f"training length={length} batch={batch}")
        runs = {name: training_in_fresh_process(name, length, batch, args.repeats, args.quick, args.train_warmup)
                for name in ("m2-gpt", GPT2_FUSED, UNFUSED, "gpt2")}
        samples = {name: run["steps"] for name, run in runs.items()}
        rate = {name: batch * length / statistics.median(values) for name, values in samples.items()}
        ratio = fair_ratio(rate, GPT2_TRAINERS)
        unfused_ratio = rate[UNFUSED] / rate["gpt2"]
        rows.append({"kind": "training", "length": length, "batch": batch, "tokens_per_s": rate,
                     "ratio_to_faster_gpt2": ratio, "ratio_fused_loss": rate["m2-gpt"] / rate[GPT2_FUSED],
                     "ratio_unfused_loss": unfused_ratio, "seconds_per_step_samples": samples,
                     "warmup_seconds": {name: run["warmup"] for name, run in runs.items()}})
        print(f"{length:>8} {batch:>6} {rate['m2-gpt']:>9.1f} {rate[GPT2_FUSED]:>12.1f} {rate['gpt2']:>9.1f}"
              f" {ratio:>25.2f}x {rate[UNFUSED]:>15.1f} {unfused_ratio:>13.2f}x", flush=True)
        if length in TRAINING_TARGETS and not args.quick:
            verdicts.append(verdict(f"training length {length} (vs the faster GPT-2: fused loss or Transformers')",
                                    ratio, TRAINING_TARGETS[length]))
    return rows, verdicts


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_arguments(argv)
    if args.child_train:
        name, length, batch, repeats, warmup = args.child_train
        return child_train(name, int(length), int(batch), int(repeats), args.quick, int(warmup))
    max_length = max(max(args.contexts) + args.decode_steps + 4, max(args.train_lengths))
    models = build_models(max_length, args.quick)
    parameters = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    log(f"parameters: {parameters}")
    for model in models.values():
        model.eval()
    checks = check_baselines(models["gpt2"])
    log(f"baseline checks: {json.dumps(checks['fused_loss'])}; static cache same tokens "
        f"{checks['static_cache']['same_tokens']} (max logit difference "
        f"{checks['static_cache']['max_logit_difference']:.1e})")
    rows, verdicts = decode_rows(models, args) if "decode" in args.parts else ([], [])
    del models
    if "training" in args.parts:
        training, training_verdicts = training_rows(args)
        rows, verdicts = rows + training, verdicts + training_verdicts

    print()
    for entry in verdicts:
        status = "PASS" if entry["pass"] else "MISS"
        print(f"{status}  {entry['what']}: {entry['ratio']:.2f}x (target >= {entry['target']}x)")
    meta = {
        "date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": available_cores(),
        "torch": torch.__version__, "python": platform.python_version(), "parameters": parameters,
        "baseline_checks": checks,
        "arguments": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
    }
    write_json(args.json, meta, rows, verdicts)


if __name__ == "__main__":
    main()
