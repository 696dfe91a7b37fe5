#!/usr/bin/env python
"""CPU benchmark: M2-BERT-base against Transformers' BERT-base (SDPA attention) at long sequence lengths.

Reproduce (from the repository root, inside the project's virtual environment)::

    python benchmarks/bench_long_context.py                    # full default run: ~30 min on 2 cores; quiet machine
    python benchmarks/bench_long_context.py --quick            # smoke test with tiny models, seconds
    python benchmarks/bench_long_context.py --lengths 512 4096 --no-memory   # a subset, timing only

Both models have the width and depth of BERT-base (hidden 768, 12 layers, intermediate 3072; BERT with 12 heads,
M2 with its default block-diagonal GLU MLP). One pair of models is built per sequence length, because
``max_position_embeddings`` must cover it. Every length processes the same number of tokens per call (``--tokens``,
batch = tokens // length), so FLOPs per token, and hence tokens/s, would be length-independent for M2 and fall
linearly for BERT if the hardware followed the FLOP count.

Per length:

1. Peak memory (``--memory``, the default): each model runs one forward in a fresh subprocess, which reports the peak
   RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after building, or a polled ``VmRSS`` where that is not
   possible) minus the RSS after building the model and its inputs. The call is cold, so M2's peak includes the
   filter spectra it computes and caches (up to the config's ``filter_cache_bytes``) - memory that a user pays too.
2. Throughput: both models in this process, one warm-up call each (it also fills M2's filter cache; the filters
   depend only on the length; spectra beyond the cache's budget are computed in every call), then ``--repeats``
   interleaved rounds (M2, BERT, M2, BERT, ...) and the median. ``benchmarks/bench_filter_cache.py`` compares
   budgets and commits side by side.

A model that would take longer than ``--max-seconds-per-call`` per forward (estimated from its last measured length,
scaled by the FLOP model) or that runs out of memory is recorded as skipped, with the reason, and the run goes on.

Outputs: a table on stdout, a targets check (PASS/MISS, never a failing exit status), a JSON file with every sample
and the run's metadata, and a PNG (throughput and peak memory against the length). Progress goes to stderr.

Cost: every measured length takes ``1 memory probe + 1 warm-up + repeats`` forwards of each model. On a 2-core AMD
EPYC (AVX512) one base-size forward of 16384 tokens takes roughly 13-14 s for M2 (25-30 s cold, when it computes
its filters) and 20 s (length 512) to ~90 s (length 16384, attention-bound) for BERT, so the default run takes about
30 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # lets `python benchmarks/bench_long_context.py` work without an installed package
    sys.path.insert(0, str(REPO_ROOT))

import transformers  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

from m2_hf import M2BertConfig, M2BertModel  # noqa: E402
from m2_hf.m2_mixer import HyenaFilter  # noqa: E402
from m2_hf.monarch import BlockdiagLinear, MonarchLinear  # noqa: E402
from bench_common import (  # noqa: E402  (the script's folder is on sys.path)
    available_cores,
    cpu_model,
    format_table_line,
    load_average,
    log,
    positive_int,
    seconds_per_call,
    write_json,
)

MODELS = ("m2", "bert")
MODEL_TITLES = {"m2": "M2-BERT", "bert": "BERT (sdpa)"}
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_TOKENS = 16384
DEFAULT_REPEATS = 3
DEFAULT_MAX_SECONDS_PER_CALL = 600.0
DEFAULT_SEED = 0
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "out"


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 768
    layers: int = 12
    intermediate: int = 3072
    heads: int = 12


BASE_SHAPE = ModelShape()
QUICK_SHAPE = ModelShape(hidden=64, layers=2, intermediate=128, heads=2)
QUICK_SETTINGS = {"lengths": [128, 256], "tokens": 512, "repeats": 1}

# Minimum M2 throughput as a multiple of BERT's, per length.
TARGET_RATIO_AT_LENGTH = {4096: 2.5, 8192: 3.5, 16384: 6.0}
# The issue's back-of-the-envelope figures, printed next to the counted ones (MFLOP per token and layer).
ISSUE_M2_MFLOP = 10.0
ISSUE_BERT_MFLOP = 14.0

# Real-valued FLOPs of a radix-2 real FFT of size n is about 2.5 n log2(n) (half of the classic 5 n log2 n of a
# complex FFT); the same constant is used for the inverse.
REAL_FFT_FLOP_CONSTANT = 2.5
# One complex multiply: 4 multiplications and 2 additions.
COMPLEX_MULTIPLY_FLOPS = 6
# Short calls (only in --quick and tiny custom runs) are looped, else timer resolution dominates a sample.
MIN_SAMPLE_SECONDS = 0.05
# A warm-up slower than this is its own calibration: a second untimed call would only add minutes at long lengths.
SKIP_CALIBRATION_SECONDS = 0.5
# A timed process needs headroom beyond the peak its memory probe measured (the other model stays resident).
MEMORY_SAFETY_FACTOR = 0.9
# Samples spreading more than this around their median mean the machine was busy.
NOISY_SPREAD = 0.25
# A memory probe runs one cold call plus the build; allow it this multiple of the per-call limit.
PROBE_TIMEOUT_FACTOR = 2.0
PROBE_TIMEOUT_MARGIN_SECONDS = 120.0
RSS_POLL_SECONDS = 0.002


# --------------------------------------------------------------------------------------------------------------------
# Models and inputs
# --------------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def model_seed(base_seed: int, model: str, length: int) -> int:
    # Distinct per (model, length), identical between the timing process and the memory probes.
    return base_seed * 1_000_003 + MODELS.index(model) * 100_000 + length


def batch_for(tokens: int, length: int) -> int:
    return max(1, tokens // length)


def build_m2(shape: ModelShape, length: int) -> M2BertModel:
    config = M2BertConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        max_position_embeddings=length,
    )
    return M2BertModel(config, add_pooling_layer=False).eval()


def build_bert(shape: ModelShape, length: int) -> BertModel:
    config = BertConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=length,
        attn_implementation="sdpa",
    )
    return BertModel(config, add_pooling_layer=False).eval()


def build_model(model: str, shape: ModelShape, length: int, base_seed: int) -> nn.Module:
    seed_everything(model_seed(base_seed, model, length))
    with torch.device("cpu"):
        return build_m2(shape, length) if model == "m2" else build_bert(shape, length)


def make_input_ids(batch: int, length: int, base_seed: int) -> torch.Tensor:
    # Ids below both vocabularies (BERT 30522, M2 30528) and above the padding id, so both models read the same text.
    generator = torch.Generator().manual_seed(base_seed * 7919 + length)
    return torch.randint(1, 30522, (batch, length), generator=generator)


def forward_call(model: nn.Module, input_ids: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(input_ids=input_ids)

    return run


# --------------------------------------------------------------------------------------------------------------------
# FLOP model, counted from the modules of one layer
# --------------------------------------------------------------------------------------------------------------------


def tokenwise_flops_per_token(module: nn.Module) -> int:
    """2 x multiply-adds per token of every token-wise weight layer under ``module``.

    M2's implicit filter MLPs are not descended into: their output depends on the length only (cached within the
    filter cache's budget).
    """
    if isinstance(module, HyenaFilter):
        return 0
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        # A Conv1d's weight holds out x in/groups x kernel multiply-adds per output position.
        return 2 * module.weight.numel()
    if isinstance(module, (BlockdiagLinear, MonarchLinear)):
        return 2 * sum(p.numel() for name, p in module.named_parameters(recurse=False) if name != "bias")
    return sum(tokenwise_flops_per_token(child) for child in module.children())


def real_fft_flops(size: int) -> float:
    return REAL_FFT_FLOP_CONSTANT * size * math.log2(size)


def m2_layer_flops_per_token(layer: nn.Module, length: int, batch: int) -> dict[str, float]:
    """FLOPs per token of one M2 layer, by part. Elementwise activations and norms are left out (for BERT too)."""
    mixer = layer.attention
    filters = [module for module in mixer.modules() if isinstance(module, HyenaFilter)]
    channels = filters[0].bias.numel()
    fft_size = 2 * length
    bins = fft_size // 2 + 1
    # Per channel and sequence: rfft of the input and irfft of the product; the pointwise product over the bins;
    # the D ("bias") skip term. The kernel's rfft runs once per call and channel, shared by the whole batch.
    per_sequence = 2 * real_fft_flops(fft_size) + COMPLEX_MULTIPLY_FLOPS * bins + 2 * length
    per_call = real_fft_flops(fft_size)
    fft_per_token = len(filters) * channels * (per_sequence / length + per_call / (batch * length))
    # v * x1 and the gate * x2, plus the residual convolution's addition.
    gating_per_token = 2 * channels + (channels if len(filters) > 1 else 0)
    parts = {
        "mixer_projections_and_short_conv": float(tokenwise_flops_per_token(mixer)),
        "long_convolutions_fft": fft_per_token,
        "gating": float(gating_per_token),
        "mlp": float(tokenwise_flops_per_token(layer.mlp)),
    }
    parts["total"] = sum(parts.values())
    return parts


def bert_layer_flops_per_token(layer: nn.Module, length: int) -> dict[str, float]:
    """FLOPs per token of one BERT layer: the dense projections and MLP, and the attention scores + weighted sum."""
    attention_width = sum(m.all_head_size for m in layer.modules() if hasattr(m, "all_head_size"))
    linear = float(tokenwise_flops_per_token(layer))
    mlp = float(tokenwise_flops_per_token(layer.intermediate) + tokenwise_flops_per_token(layer.output))
    parts = {
        "attention_projections": linear - mlp,
        # Q K^T and softmax(.) V: 2 x length x width multiply-adds each, per query token.
        "attention_scores_and_sum": 4.0 * length * attention_width,
        "mlp": mlp,
    }
    parts["total"] = sum(parts.values())
    return parts


def layer_flops_per_token(model_name: str, model: nn.Module, length: int, batch: int) -> dict[str, float]:
    layer = model.encoder.layer[0]
    if model_name == "m2":
        return m2_layer_flops_per_token(layer, length, batch)
    return bert_layer_flops_per_token(layer, length)


def flops_per_call(per_layer_per_token: float, layers: int, batch: int, length: int) -> float:
    return per_layer_per_token * layers * batch * length


# --------------------------------------------------------------------------------------------------------------------
# Peak memory, in a fresh subprocess per (model, length)
# --------------------------------------------------------------------------------------------------------------------


def proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel or sandbox does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    hwm, rss = proc_status_kb("VmHWM"), proc_status_kb("VmRSS")
    # Allow for pages touched between the reset and the reads.
    return hwm is not None and rss is not None and hwm <= rss + 1024


class RssPoller:
    """Fallback peak tracker: polls VmRSS from a thread (misses peaks shorter than the polling period)."""

    def __init__(self) -> None:
        self.peak_kb = proc_status_kb("VmRSS") or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(RSS_POLL_SECONDS):
            self.peak_kb = max(self.peak_kb, proc_status_kb("VmRSS") or 0)

    def __enter__(self) -> "RssPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, proc_status_kb("VmRSS") or 0)


def measure_memory_here(model_name: str, shape: ModelShape, length: int, batch: int, base_seed: int) -> dict:
    """Peak RSS increase of one cold forward over the RSS after building the model and inputs (run in a child)."""
    model = build_model(model_name, shape, length, base_seed)
    input_ids = make_input_ids(batch, length, base_seed)
    run = forward_call(model, input_ids)
    gc.collect()
    baseline_kb = proc_status_kb("VmRSS")
    if baseline_kb is None:
        raise RuntimeError("/proc/self/status is not readable: no RSS to measure")
    start = time.perf_counter()
    if reset_peak_rss():
        method = "VmHWM reset through /proc/self/clear_refs"
        run()
        peak_kb = proc_status_kb("VmHWM")
    else:
        method = f"VmRSS polled every {RSS_POLL_SECONDS * 1000:g} ms"
        with RssPoller() as poller:
            run()
        peak_kb = poller.peak_kb
    seconds = time.perf_counter() - start
    return {
        "status": "ok",
        "method": method,
        "baseline_rss_mb": baseline_kb / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "peak_increase_mb": (peak_kb - baseline_kb) / 1024,
        "cold_call_seconds": seconds,
    }


def probe_memory(model_name: str, args: argparse.Namespace, length: int, batch: int) -> dict:
    """Run ``measure_memory_here`` in a fresh interpreter, whose peak RSS nothing earlier has raised."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--memory-child", model_name, str(length), str(batch),
        "--hidden", str(args.hidden), "--layers", str(args.layers), "--intermediate", str(args.intermediate),
        "--heads", str(args.heads), "--seed", str(args.seed), "--threads", str(args.threads),
    ]
    timeout = PROBE_TIMEOUT_FACTOR * args.max_seconds_per_call + PROBE_TIMEOUT_MARGIN_SECONDS
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"memory probe timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        # SIGKILL without a Python traceback is what the kernel's OOM killer leaves behind.
        if done.returncode == -9:
            reason = "memory probe killed (SIGKILL: out of memory?)"
        else:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            reason = f"memory probe failed (exit {done.returncode}): {tail}"
        return {"status": "failed", "reason": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_child_main(args: argparse.Namespace) -> int:
    model_name, length, batch = args.memory_child[0], int(args.memory_child[1]), int(args.memory_child[2])
    torch.set_num_threads(args.threads)
    shape = ModelShape(args.hidden, args.layers, args.intermediate, args.heads)
    try:
        result = measure_memory_here(model_name, shape, length, batch, args.seed)
    except (RuntimeError, MemoryError) as error:
        result = {"status": "failed", "reason": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    print(json.dumps(result))
    return 0


def available_memory_mb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------


def calls_per_sample_for(estimate_seconds: float) -> int:
    return max(1, math.ceil(MIN_SAMPLE_SECONDS / max(estimate_seconds, 1e-9)))


def short_error(error: BaseException) -> str:
    first_line = (str(error).splitlines() or [""])[0]
    kind = "out of memory" if isinstance(error, MemoryError) or "alloc" in first_line.lower() else "error"
    return f"{kind}: {type(error).__name__}: {first_line[:200]}"


class LengthRun:
    """Everything measured for one sequence length; becomes one JSON row."""

    def __init__(self, length: int, batch: int) -> None:
        self.length = length
        self.batch = batch
        self.models: dict[str, dict] = {name: {"status": "pending", "reason": None, "samples_s": []} for name in MODELS}

    def skip(self, model_name: str, reason: str) -> None:
        entry = self.models[model_name]
        if entry["status"] != "skipped":
            entry["status"], entry["reason"] = "skipped", reason
            log(f"  L={self.length}: {MODEL_TITLES[model_name]} skipped: {reason}")

    def active(self) -> list[str]:
        return [name for name in MODELS if self.models[name]["status"] != "skipped"]


def predicted_seconds(history: dict[str, tuple[float, float]], model_name: str, flops: float) -> Optional[float]:
    """Seconds per call scaled from the model's last measurement by the FLOP ratio (None before any measurement)."""
    if model_name not in history:
        return None
    measured_flops, measured_seconds = history[model_name]
    return measured_seconds * flops / measured_flops


def probe_memory_for_length(run: LengthRun, args: argparse.Namespace, history: dict) -> None:
    for name in run.active():
        log(f"  L={run.length}: memory probe {MODEL_TITLES[name]} (fresh process)")
        result = probe_memory(name, args, run.length, run.batch)
        run.models[name]["memory"] = result
        if result["status"] != "ok":
            run.skip(name, result["reason"])
            continue
        seconds = result["cold_call_seconds"]
        history[name] = (run.models[name]["flops_per_call"], seconds)
        if seconds > args.max_seconds_per_call:
            run.skip(name, f"too slow: the memory probe's call took {seconds:.3g} s > {args.max_seconds_per_call:g} s")


def build_for_timing(run: LengthRun, args: argparse.Namespace, shape: ModelShape) -> dict[str, nn.Module]:
    built = {}
    for name in run.active():
        try:
            built[name] = build_model(name, shape, run.length, args.seed)
        except (RuntimeError, MemoryError) as error:
            run.skip(name, short_error(error))
    free = available_memory_mb()
    for name in list(built):
        need = run.models[name].get("memory", {}).get("peak_increase_mb")
        if need is not None and free is not None and need > MEMORY_SAFETY_FACTOR * free:
            run.skip(name, f"out of memory (predicted): needs ~{need:.0f} MB, {free:.0f} MB available")
            del built[name]
    return built


def warm_up(run: LengthRun, calls: dict[str, Callable[[], None]], args: argparse.Namespace, history: dict) -> None:
    """One untimed call per model (allocator, oneDNN primitives, M2's filter cache); also calibrates the loop."""
    for name in list(calls):
        try:
            seconds = seconds_per_call(calls[name], 1)
        except (RuntimeError, MemoryError) as error:
            run.skip(name, short_error(error))
            del calls[name]
            continue
        entry = run.models[name]
        entry["warmup_s"] = seconds
        history[name] = (entry["flops_per_call"], seconds)
        if seconds > args.max_seconds_per_call:
            run.skip(name, f"too slow: the warm-up call took {seconds:.3g} s > {args.max_seconds_per_call:g} s")
            del calls[name]
            continue
        # The warm-up is slower than a warm call (first-call set-up, M2's filters), so calibrate on a second call
        # whenever that is cheap.
        estimate = seconds if seconds >= SKIP_CALIBRATION_SECONDS else seconds_per_call(calls[name], 1)
        entry["calls_per_sample"] = calls_per_sample_for(estimate)


def time_interleaved(run: LengthRun, calls: dict[str, Callable[[], None]], repeats: int) -> None:
    """``repeats`` rounds, each timing every model once (M2, BERT, M2, BERT, ...), so drifts of a shared machine
    hit both models alike."""
    gc.collect()
    gc.disable()  # a collection inside one sample would show up as a spurious outlier
    try:
        for round_index in range(repeats):
            for name in list(calls):
                try:
                    sample = seconds_per_call(calls[name], run.models[name]["calls_per_sample"])
                except (RuntimeError, MemoryError) as error:
                    run.skip(name, short_error(error))
                    del calls[name]
                    continue
                run.models[name]["samples_s"].append(sample)
            log(f"  L={run.length}: round {round_index + 1}/{repeats} done")
    finally:
        gc.enable()


def summarize(run: LengthRun, history: dict) -> None:
    tokens_per_call = run.batch * run.length
    for name, entry in run.models.items():
        if entry["status"] == "skipped" or not entry["samples_s"]:
            entry.setdefault("median_s", None)
            entry.setdefault("tokens_per_s", None)
            continue
        entry["status"] = "ok"
        entry["median_s"] = statistics.median(entry["samples_s"])
        entry["tokens_per_s"] = tokens_per_call / entry["median_s"]
        entry["relative_spread"] = (max(entry["samples_s"]) - min(entry["samples_s"])) / entry["median_s"]
        history[name] = (entry["flops_per_call"], entry["median_s"])


def attach_flops(run: LengthRun, shape: ModelShape, models: dict[str, nn.Module]) -> None:
    for name, model in models.items():
        parts = layer_flops_per_token(name, model, run.length, run.batch)
        run.models[name]["flops_per_token_per_layer"] = parts
        run.models[name]["flops_per_call"] = flops_per_call(parts["total"], shape.layers, run.batch, run.length)


def count_flops_for_length(run: LengthRun, args: argparse.Namespace, shape: ModelShape) -> None:
    """The FLOP model needs a layer's modules only; a one-layer model at the same length gives them cheaply."""
    one_layer = ModelShape(shape.hidden, 1, shape.intermediate, shape.heads)
    models = {name: build_model(name, one_layer, run.length, args.seed) for name in MODELS}
    attach_flops(run, shape, models)


def skip_predicted_too_slow(run: LengthRun, args: argparse.Namespace, history: dict) -> None:
    for name in run.active():
        estimate = predicted_seconds(history, name, run.models[name]["flops_per_call"])
        run.models[name]["predicted_seconds_per_call"] = estimate
        if estimate is not None and estimate > args.max_seconds_per_call:
            run.skip(
                name,
                f"too slow: ~{estimate:.3g} s per call predicted (FLOP-scaled from a shorter length) "
                f"> {args.max_seconds_per_call:g} s",
            )


def benchmark_length(length: int, args: argparse.Namespace, shape: ModelShape, history: dict) -> dict:
    run = LengthRun(length, batch_for(args.tokens, length))
    count_flops_for_length(run, args, shape)
    skip_predicted_too_slow(run, args, history)
    if args.memory:
        probe_memory_for_length(run, args, history)
    built = build_for_timing(run, args, shape)
    input_ids = make_input_ids(run.batch, length, args.seed)
    calls = {name: forward_call(model, input_ids) for name, model in built.items()}
    log(f"  L={length}: warm-up of {', '.join(MODEL_TITLES[n] for n in calls) or 'nothing'}")
    warm_up(run, calls, args, history)
    if calls:
        time_interleaved(run, calls, args.repeats)
    del calls, built
    gc.collect()
    summarize(run, history)
    return run_row(run)


def run_row(run: LengthRun) -> dict:
    m2, bert = run.models["m2"], run.models["bert"]
    both = m2.get("tokens_per_s") and bert.get("tokens_per_s")
    return {
        "length": run.length,
        "batch": run.batch,
        "tokens_per_call": run.batch * run.length,
        "models": run.models,
        "ratio_m2_over_bert": m2["tokens_per_s"] / bert["tokens_per_s"] if both else None,
        "flop_predicted_ratio": (
            bert["flops_per_token_per_layer"]["total"] / m2["flops_per_token_per_layer"]["total"]
        ),
        "load_average_1m": load_average(),
    }


def run_benchmark(args: argparse.Namespace, shape: ModelShape) -> list[dict]:
    history: dict[str, tuple[float, float]] = {}  # model -> (flops per call, seconds per call) of its last length
    rows = []
    started = time.perf_counter()
    for index, length in enumerate(args.lengths, 1):
        log(f"[{index}/{len(args.lengths)}] length {length} [{time.perf_counter() - started:.0f} s elapsed]")
        rows.append(benchmark_length(length, args, shape, history))
    log(f"done in {time.perf_counter() - started:.0f} s")
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------------


def run_metadata(args: argparse.Namespace, shape: ModelShape) -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": available_cores(),
        "threads": torch.get_num_threads(),
        "memory_available_mb_at_start": available_memory_mb(),
        "load_average_1m_at_start": load_average(),
        "dtype": "float32",
        "model_shape": asdict(shape),
        "m2_mlp": "block-diagonal GLU, 4 blocks (M2BertConfig defaults)",
        "bert_attention": "sdpa",
        "lengths": args.lengths,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "memory": args.memory,
        "max_seconds_per_call": args.max_seconds_per_call,
        "seed": args.seed,
        "fft_flop_constant": REAL_FFT_FLOP_CONSTANT,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def print_header(meta: dict) -> None:
    shape = meta["model_shape"]
    print("M2-BERT vs BERT (sdpa) forward at long sequence lengths (float32, CPU)")
    print(
        f"  date {meta['date']}   torch {meta['torch_version']}   transformers {meta['transformers_version']}   "
        f"python {meta['python_version']}"
    )
    print(f"  cpu {meta['cpu']} ({meta['cpu_capability']}), {meta['cores']} cores, torch threads {meta['threads']}")
    print(
        f"  models: hidden {shape['hidden']}, {shape['layers']} layers, intermediate {shape['intermediate']}, "
        f"BERT heads {shape['heads']}; M2 MLP {meta['m2_mlp']}"
    )
    print(f"  {meta['tokens']} tokens per call, median of {meta['repeats']} interleaved rounds after one warm-up")
    load = meta["load_average_1m_at_start"]
    if load is not None:
        # Oversubscribed cores make every OpenMP barrier wait for a time slice: timings then mean little.
        warning = "  WARNING: the machine is busy, results will be noisy" if load > 0.5 * meta["cores"] else ""
        print(f"  load average at start {load:.2f}{warning}")
    print(flush=True)


TABLE_COLUMNS = (
    ("length", 7, ">"),
    ("batch", 5, ">"),
    ("M2 tok/s", 10, ">"),
    ("BERT tok/s", 10, ">"),
    ("ratio", 7, ">"),
    ("FLOP pred", 9, ">"),
    ("M2 MF/tok", 9, ">"),
    ("BERT MF/tok", 11, ">"),
    ("M2 peak MB", 10, ">"),
    ("BERT peak MB", 12, ">"),
)


def format_number(value: Optional[float], pattern: str, missing: str = "skipped") -> str:
    return missing if value is None else format(value, pattern)


def peak_mb(entry: dict) -> Optional[float]:
    memory = entry.get("memory")
    return memory["peak_increase_mb"] if memory and memory.get("status") == "ok" else None


def print_table(rows: list[dict], memory_enabled: bool) -> None:
    print(format_table_line([name for name, _, _ in TABLE_COLUMNS], TABLE_COLUMNS))
    print("-" * len(format_table_line([""] * len(TABLE_COLUMNS), TABLE_COLUMNS)))
    memory_missing = "n/a" if memory_enabled else "off"
    for row in rows:
        m2, bert = row["models"]["m2"], row["models"]["bert"]
        print(
            format_table_line(
                [
                    str(row["length"]),
                    str(row["batch"]),
                    format_number(m2["tokens_per_s"], ".0f"),
                    format_number(bert["tokens_per_s"], ".0f"),
                    format_number(row["ratio_m2_over_bert"], ".2f", "n/a") + ("x" if row["ratio_m2_over_bert"] else ""),
                    f"{row['flop_predicted_ratio']:.2f}x",
                    f"{m2['flops_per_token_per_layer']['total'] / 1e6:.2f}",
                    f"{bert['flops_per_token_per_layer']['total'] / 1e6:.2f}",
                    format_number(peak_mb(m2), ".0f", memory_missing),
                    format_number(peak_mb(bert), ".0f", memory_missing),
                ],
                TABLE_COLUMNS,
            )
        )
    print()
    print("ratio = M2 tokens/s / BERT tokens/s (medians); FLOP pred = BERT FLOPs / M2 FLOPs per token.")
    print("MF/tok = counted MFLOP per token and layer; peak MB = peak RSS increase of one cold forward over the RSS")
    print("after building the model and inputs, in a fresh process (M2's includes its cached filters).")
    print_skips(rows)
    print_noise_notes(rows)
    print(flush=True)


def print_skips(rows: list[dict]) -> None:
    for row in rows:
        for name, entry in row["models"].items():
            if entry["status"] == "skipped":
                print(f"skipped: {MODEL_TITLES[name]} at length {row['length']}: {entry['reason']}")


def print_noise_notes(rows: list[dict]) -> None:
    noisy = [
        f"{MODEL_TITLES[name]}@{row['length']}"
        for row in rows
        for name, entry in row["models"].items()
        if entry.get("relative_spread", 0.0) > NOISY_SPREAD
    ]
    if noisy:
        print(
            f"note: samples spread over more than {NOISY_SPREAD:.0%} of their median for {', '.join(noisy)} "
            "(busy machine?); the JSON holds every sample."
        )


def print_flop_breakdown(rows: list[dict], shape: ModelShape) -> None:
    """The counted FLOP model, next to the issue's rough figures (which it is meant to check) for the base size."""
    print("FLOP model per token and layer (MFLOP), counted from the built modules")
    for row in rows:
        m2 = row["models"]["m2"]["flops_per_token_per_layer"]
        bert = row["models"]["bert"]["flops_per_token_per_layer"]
        issue_bert = ISSUE_BERT_MFLOP + 4 * row["length"] * 768 / 1e6
        print(
            f"  L={row['length']:>6}: M2 {m2['total'] / 1e6:6.2f} (projections+short conv "
            f"{m2['mixer_projections_and_short_conv'] / 1e6:.2f}, FFT convs {m2['long_convolutions_fft'] / 1e6:.2f}, "
            f"gating {m2['gating'] / 1e6:.3f}, MLP {m2['mlp'] / 1e6:.2f})   BERT {bert['total'] / 1e6:6.2f} "
            f"(projections {bert['attention_projections'] / 1e6:.2f}, scores+sum "
            f"{bert['attention_scores_and_sum'] / 1e6:.2f}, MLP {bert['mlp'] / 1e6:.2f})"
        )
        if shape == BASE_SHAPE:
            print(
                f"            issue's figures: M2 ~{ISSUE_M2_MFLOP:.0f}, BERT ~{issue_bert:.2f} "
                f"-> {issue_bert / ISSUE_M2_MFLOP:.2f}x; counted -> {row['flop_predicted_ratio']:.2f}x"
            )
    print(
        f"  FFT cost model: a real FFT of size n = 2L costs {REAL_FFT_FLOP_CONSTANT} n log2 n; per channel and "
        "sequence rfft + irfft + complex product + D term; the kernel rfft once per call; filter MLPs excluded."
    )
    print(flush=True)


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """One verdict per target length: 'PASS', 'MISS', or 'n/a' when the run did not measure both models there."""
    verdicts = []
    by_length = {row["length"]: row for row in rows}
    for length, threshold in TARGET_RATIO_AT_LENGTH.items():
        row = by_length.get(length)
        value = row["ratio_m2_over_bert"] if row else None
        if row is None:
            detail = "length not run"
        elif value is None:
            reasons = [f"{MODEL_TITLES[n]}: {e['reason']}" for n, e in row["models"].items() if e["reason"]]
            detail = "; ".join(reasons) or "not measured"
        else:
            detail = f"{value:.2f}x, FLOP-predicted {row['flop_predicted_ratio']:.2f}x"
        verdicts.append(
            {
                "length": length,
                "target": f"M2 tokens/s >= {threshold}x BERT's at length {length}",
                "value": value,
                "detail": detail,
                "verdict": "n/a" if value is None else ("PASS" if value >= threshold else "MISS"),
            }
        )
    return verdicts


def print_targets(verdicts: list[dict]) -> None:
    print("Targets (measured in this run)")
    for item in verdicts:
        print(f"  {item['verdict']:<4}  {item['target']} ({item['detail']})")
    counts = {verdict: sum(item["verdict"] == verdict for item in verdicts) for verdict in ("PASS", "MISS", "n/a")}
    print(f"Summary: {counts['PASS']} PASS, {counts['MISS']} MISS, {counts['n/a']} n/a of {len(verdicts)} checks")
    print(flush=True)


def write_plot(path: Path, meta: dict, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on benchmark machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    plain_numbers = FuncFormatter(lambda value, _: f"{value:g}")
    figure, (speed_axis, memory_axis) = plt.subplots(1, 2, figsize=(13, 5.5))
    styles = {"m2": ("o-", "tab:blue"), "bert": ("s-", "tab:orange")}
    for name in MODELS:
        marker, color = styles[name]
        timed = [(r["length"], r["models"][name]["tokens_per_s"]) for r in rows if r["models"][name]["tokens_per_s"]]
        if timed:
            speed_axis.plot(*zip(*timed), marker, color=color, label=MODEL_TITLES[name])
        measured = [(r["length"], peak_mb(r["models"][name])) for r in rows if peak_mb(r["models"][name]) is not None]
        if measured:
            memory_axis.plot(*zip(*measured), marker, color=color, label=MODEL_TITLES[name])
    # What BERT would reach if both models ran at M2's FLOP rate: shows where the gap departs from the FLOP count.
    predicted = [
        (r["length"], r["models"]["m2"]["tokens_per_s"] / r["flop_predicted_ratio"])
        for r in rows
        if r["models"]["m2"]["tokens_per_s"]
    ]
    if predicted:
        speed_axis.plot(*zip(*predicted), "--", color=styles["bert"][1], alpha=0.6, label="BERT, FLOP-predicted")
    lengths = [row["length"] for row in rows]
    for axis in (speed_axis, memory_axis):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(lengths)
        axis.xaxis.set_major_formatter(plain_numbers)
        axis.xaxis.set_minor_locator(NullLocator())
        axis.yaxis.set_major_formatter(plain_numbers)
        # Labels at 1-2-5 steps stay readable whether the data span a fraction of a decade or several decades.
        axis.yaxis.set_minor_locator(LogLocator(base=10, subs=(2, 5)))
        axis.yaxis.set_minor_formatter(plain_numbers)
        axis.set_xlabel("sequence length (tokens)")
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # every model may have been skipped
            axis.legend(fontsize=9)
    speed_axis.set_ylabel("forward throughput (tokens/s)")
    speed_axis.set_title(f"throughput, {meta['tokens']} tokens per call, float32")
    memory_axis.set_ylabel("peak RSS increase of one forward (MB)")
    memory_axis.set_title("peak memory" if meta["memory"] else "peak memory (not measured: --no-memory)")
    shape = meta["model_shape"]
    figure.suptitle(
        f"M2-BERT vs BERT (hidden {shape['hidden']}, {shape['layers']} layers): {meta['cpu']}, "
        f"{meta['threads']} threads, torch {meta['torch_version']}"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    log(f"wrote {path}")


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=positive_int, nargs="+", help=f"(default {list(DEFAULT_LENGTHS)})")
    parser.add_argument("--tokens", type=positive_int, help=f"tokens per call; batch = tokens // length, at least 1 "
                        f"(default {DEFAULT_TOKENS})")
    parser.add_argument("--repeats", type=positive_int, help=f"timed rounds (default {DEFAULT_REPEATS})")
    parser.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, default=True,
        help="measure peak memory in a subprocess per (model, length) (default: on)",
    )
    parser.add_argument(
        "--max-seconds-per-call", type=float, default=DEFAULT_MAX_SECONDS_PER_CALL,
        help="skip a model at lengths where one forward would take longer (default: %(default)s)",
    )
    parser.add_argument("--hidden", type=positive_int, help=f"model width (default {BASE_SHAPE.hidden})")
    parser.add_argument("--layers", type=positive_int, help=f"model depth (default {BASE_SHAPE.layers})")
    parser.add_argument("--intermediate", type=positive_int, help=f"MLP width (default {BASE_SHAPE.intermediate})")
    parser.add_argument("--heads", type=positive_int, help=f"BERT attention heads (default {BASE_SHAPE.heads})")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: all available cores)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="(default: %(default)s)")
    parser.add_argument("--json", type=Path, help="JSON output (default benchmarks/out/bench_long_context.json)")
    parser.add_argument("--plot", type=Path, help="PNG output (default benchmarks/out/bench_long_context.png)")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke test: hidden 64, 2 layers, intermediate 128, 2 heads, lengths 128 256, 512 tokens, 1 repeat; "
        "writes *_quick.json/png unless paths are given",
    )
    # Internal: the memory probe re-runs this script as `--memory-child MODEL LENGTH BATCH`.
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "LENGTH", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    apply_defaults(args)
    return args


def apply_defaults(args: argparse.Namespace) -> None:
    """Explicit options win over --quick, which wins over the full-run defaults."""
    quick = QUICK_SETTINGS if args.quick else {}
    shape = QUICK_SHAPE if args.quick else BASE_SHAPE
    args.lengths = list(dict.fromkeys(args.lengths or quick.get("lengths") or DEFAULT_LENGTHS))
    args.tokens = args.tokens or quick.get("tokens") or DEFAULT_TOKENS
    args.repeats = args.repeats or quick.get("repeats") or DEFAULT_REPEATS
    args.hidden = args.hidden or shape.hidden
    args.layers = args.layers or shape.layers
    args.intermediate = args.intermediate or shape.intermediate
    args.heads = args.heads or shape.heads
    args.threads = args.threads or available_cores()
    # A smoke test must not overwrite the results of a real run.
    suffix = "_quick" if args.quick else ""
    args.json = args.json or DEFAULT_OUT_DIR / f"bench_long_context{suffix}.json"
    args.plot = args.plot or DEFAULT_OUT_DIR / f"bench_long_context{suffix}.png"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        return memory_child_main(args)
    torch.set_num_threads(args.threads)
    shape = ModelShape(args.hidden, args.layers, args.intermediate, args.heads)
    meta = run_metadata(args, shape)
    print_header(meta)
    rows = run_benchmark(args, shape)
    print_flop_breakdown(rows, shape)
    print_table(rows, args.memory)
    verdicts = evaluate_targets(rows)
    print_targets(verdicts)
    write_json(args.json, meta, rows, verdicts)
    write_plot(args.plot, meta, rows)
    return 0  # targets are reported, not enforced: a slow or busy machine must not break a benchmark run


if __name__ == "__main__":
    sys.exit(main())
