"""GPU benchmark: the Monarch layer (PyTorch path and Triton kernel) against nn.Linear, and M2-BERT-base against
BERT-base (SDPA) at long sequence lengths, all measured in one run on one CUDA device.

    python benchmarks/bench_gpu.py                       # full run (a few minutes on an H200)
    python benchmarks/bench_gpu.py --quick --device cpu  # a smoke test of the script itself, tiny sizes
    python benchmarks/bench_gpu.py --sections layer      # only the layer timings (also: converted, long_context,
                                                         # profile)

Correctness is checked before anything is timed: the Triton kernel against the PyTorch path (values and gradients),
both against a float64 dense reference, and M2-BERT on the device against M2-BERT on the CPU. Timings are medians of
CUDA-event-timed repeats after warm-up (``triton.testing.do_bench`` when triton is present); the JSON file keeps every
repeat (``*_samples_ms``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_converted's model builders

from m2_hf import M2BertConfig, M2BertModel, MonarchLinear  # noqa: E402
from m2_hf.monarch import _INFERENCE_PATHS, _TRAINING_PATHS, AUTO_BACKENDS, _synchronize  # noqa: E402
from m2_hf.monarch_triton import TRITON_AVAILABLE  # noqa: E402

LAYER_SHAPES = [(1024, 4096), (4096, 16384), (4096, 4096)]
LAYER_NBLOCKS = [4, 16]
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SECTIONS = ("layer", "converted", "long_context", "profile")
# The converted section's passes: (mode, dtype name). Training keeps float32 weights, under bfloat16 autocast as
# `Trainer(bf16=True)` runs it, or in float32.
CONVERTED_MODES = {
    "inference-bf16": ("inference", "bf16"),
    "inference-fp32": ("inference", "fp32"),
    "training-bf16-autocast": ("training", "fp32+bf16-autocast"),
    "training-fp32": ("training", "fp32"),
}


def timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], list[float]]:
    """Milliseconds of every timed call of ``fn``, synchronized and warmed up."""

    def measure(fn: Callable[[], object]) -> list[float]:
        if device.type == "cuda" and TRITON_AVAILABLE:
            from triton.testing import do_bench

            return [float(t) for t in do_bench(fn, warmup=25, rep=max(50, 10 * repeats), return_mode="all")]
        for _ in range(2):
            fn()
        samples = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - begin) * 1e3)
        return samples

    return measure


def warm_up(device: torch.device, seconds: float = 3.0) -> None:
    """Keep the device busy for a few seconds so that its clocks have risen before the first timing (an idle H200
    reads 345 MHz; the first model timed in a cold run measured up to 1.6x slow)."""
    if device.type != "cuda":
        return
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        a @ a
        torch.cuda.synchronize()


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    actual, reference = actual.detach().double(), reference.detach().double()
    return float((actual - reference).norm() / reference.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------------------------
# Monarch layer
# --------------------------------------------------------------------------------------------------------------------


# Largest relative difference between the Triton kernel and the PyTorch path (output, input and weight gradients) that
# still counts as the same function: float32 runs both in IEEE float32; bfloat16 rounds each factor's product.
TRITON_AGREEMENT = {"fp32": 1e-4, "bf16": 5e-2}


def check_monarch_layer(device: torch.device, tokens: int, backends: list[str]) -> list[dict]:
    """Each backend against a float64 dense reference and the Triton kernel against the PyTorch path. A backend that
    raises gets its error recorded instead of values (``<backend>_error``); ``triton_agrees`` says whether the
    kernel matched the PyTorch path within ``TRITON_AGREEMENT``."""
    rows = []
    for (n_in, n_out), nblocks, (dtype_name, dtype) in [
        ((1024, 4096), 4, ("fp32", torch.float32)),
        ((1024, 4096), 4, ("bf16", torch.bfloat16)),
        ((1000, 3000), 16, ("fp32", torch.float32)),
    ]:
        torch.manual_seed(0)
        layer = MonarchLinear(n_in, n_out, nblocks=nblocks).to(device=device, dtype=dtype)
        x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, n_out, device=device, dtype=dtype)
        reference = x.detach().double() @ layer.dense_weight().double().t() + layer.bias.double()
        row = {"shape": f"{n_in}->{n_out}", "nblocks": nblocks, "dtype": dtype_name}
        results = {}
        for backend in backends:
            layer.backend = backend
            x.grad = None
            layer.zero_grad()
            try:
                out = layer(x)
                out.backward(grad)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            except Exception as error:  # a kernel that fails to compile or launch is a finding, not a crash
                row[f"{backend}_error"] = f"{type(error).__name__}: {error}"[:2000]
                continue
            results[backend] = (out.detach(), x.grad.clone(), layer.blkdiag1.grad.clone())
            row[f"{backend}_vs_fp64"] = relative_error(out, reference)
        if "torch" in results and "triton" in results:
            torch_out, triton_out = results["torch"], results["triton"]
            row["triton_vs_torch_out"] = relative_error(triton_out[0], torch_out[0])
            row["triton_vs_torch_grad_x"] = relative_error(triton_out[1], torch_out[1])
            row["triton_vs_torch_grad_w1"] = relative_error(triton_out[2], torch_out[2])
        if "triton" in backends:
            differences = [row.get(f"triton_vs_torch_{part}", float("nan")) for part in ("out", "grad_x", "grad_w1")]
            row["triton_agrees"] = all(d <= TRITON_AGREEMENT[dtype_name] for d in differences)  # NaN fails
        rows.append(row)
    return rows


def triton_agrees_everywhere(rows: list[dict]) -> bool:
    return all(row.get("triton_agrees", False) for row in rows)


def time_monarch_layer(device: torch.device, tokens: int, repeats: int, shapes, nblocks_list, backends) -> list[dict]:
    measure = timer(device, repeats)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for n_in, n_out in shapes:
            torch.manual_seed(0)
            linear = nn.Linear(n_in, n_out).to(device=device, dtype=dtype)
            x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn(tokens, n_out, device=device, dtype=dtype)
            layers = {"linear": linear}
            for nblocks in nblocks_list:
                for backend in backends:
                    # "structured": inference too runs the multiply of `backend` (not the densified weight).
                    layers[f"monarch{nblocks}_{backend}"] = MonarchLinear(
                        n_in, n_out, nblocks=nblocks, backend=backend, inference_path="structured"
                    ).to(device=device, dtype=dtype)
                # Inference through the cached dense weight, training through the weight densified in the graph.
                layers[f"monarch{nblocks}_densified"] = MonarchLinear(
                    n_in, n_out, nblocks=nblocks, inference_path="dense", training_path="dense",
                    dense_weight_max_bytes=None,
                ).to(device=device, dtype=dtype)
            for mode in ("fwd", "fwdbwd"):
                row = {"dtype": dtype_name, "shape": f"{n_in}->{n_out}", "mode": mode, "tokens": tokens}
                for name, layer in layers.items():
                    if mode == "fwd":
                        with torch.no_grad():
                            samples = measure(lambda: layer(x))
                    else:
                        samples = measure(lambda: layer(x).backward(grad))
                    row[name], row[f"{name}_samples_ms"] = statistics.median(samples), samples
                rows.append(row)
                print(format_layer_row(row, [name for name in layers if name in row]), flush=True)
    return rows


def fastest_multiply(rows: list[dict], nblocks_list) -> dict:
    """Which Monarch multiply path these timings favour: what ``m2_hf.monarch.AUTO_BACKENDS["cuda"]`` should name.
    Summarised by the geometric mean, over every (dtype, shape, nblocks, mode) cell, of Triton time / PyTorch time."""
    ratios = [
        row[f"monarch{nblocks}_triton"] / row[f"monarch{nblocks}_torch"]
        for row in rows
        for nblocks in nblocks_list
        if f"monarch{nblocks}_triton" in row
    ]
    if not ratios:
        return {"fastest": "torch", "cells": 0, "note": "only the PyTorch path was timed"}
    geomean = statistics.geometric_mean(ratios)
    return {
        "fastest": "triton" if geomean < 1 else "torch",
        "cells": len(ratios),
        "triton_faster_cells": sum(ratio < 1 for ratio in ratios),
        "triton_over_torch_time_geomean": geomean,
    }


def format_layer_row(row: dict, names: list[str]) -> str:
    cells = [f"{row['dtype']:5} {row['shape']:12} {row['mode']:7}", f"linear {row['linear']:8.3f} ms"]
    for name in names[1:]:
        cells.append(f"{name} {row[name]:8.3f} ms ({row['linear'] / row[name]:.2f}x)")
    return "  ".join(cells)


# --------------------------------------------------------------------------------------------------------------------
# M2-BERT against BERT
# --------------------------------------------------------------------------------------------------------------------


def m2_bert(length: int, hidden: int, layers: int, intermediate: int) -> M2BertModel:
    config = M2BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate, max_position_embeddings=length
    )
    return M2BertModel(config, add_pooling_layer=False).eval()


def bert(length: int, hidden: int, layers: int, intermediate: int, heads: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=length,
        attn_implementation="sdpa",
    )
    return BertModel(config, add_pooling_layer=False).eval()


def check_m2_bert_on_device(device: torch.device) -> float:
    """Max |logit difference| of a small M2-BERT between the device and the CPU (float32)."""
    torch.manual_seed(0)
    model = m2_bert(256, 128, 2, 256)
    ids = torch.randint(5, 30000, (3, 256))
    mask = torch.ones_like(ids)
    mask[0, :40] = 0
    with torch.inference_mode():
        on_cpu = model(ids, attention_mask=mask).last_hidden_state
        on_device = model.to(device)(ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    return float((on_device.cpu() - on_cpu).abs().max())


def time_long_context(device: torch.device, args: argparse.Namespace) -> list[dict]:
    measure = timer(device, args.repeats)
    rows = []
    for length in args.lengths:
        batch = max(1, args.tokens // length)
        ids = torch.randint(1, 30522, (batch, length), device=device)
        for dtype_name in args.model_dtypes:
            dtype = DTYPES[dtype_name]
            row = {"length": length, "batch": batch, "dtype": dtype_name, "compile": args.long_context_compile}
            for name in ("m2", "bert") + (("m2_conv1d",) if args.m2_conv1d_short_filter else ()):
                torch.manual_seed(0)
                with torch.device(device):  # initialised on the device: much faster than on the host
                    if name == "bert":
                        model = bert(length, args.hidden, args.layers, args.intermediate, args.heads)
                    else:
                        model = m2_bert(length, args.hidden, args.layers, args.intermediate)
                if name == "m2_conv1d":
                    run_short_filters_as_conv1d(model)
                model = model.to(dtype=dtype)
                if args.long_context_compile:
                    torch._dynamo.reset()  # each model compiled on its own, never up against the recompile limit
                    model = torch.compile(model, backend=args.long_context_compile)
                try:
                    with torch.inference_mode():
                        model(input_ids=ids)  # the M2 filters' spectra are cached from here on
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                            base = torch.cuda.memory_allocated()
                        samples = measure(lambda: model(input_ids=ids))
                        milliseconds = statistics.median(samples)
                        row[f"{name}_samples_ms"] = samples
                        if device.type == "cuda":
                            row[f"{name}_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                    row[f"{name}_ms"] = milliseconds
                    row[f"{name}_tokens_per_s"] = batch * length / (milliseconds / 1e3)
                except torch.OutOfMemoryError as error:
                    row[f"{name}_error"] = f"out of memory: {str(error).splitlines()[0]}"
                model = None  # free the weights before the next model is built
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if "m2_ms" in row and "bert_ms" in row:
                row["ratio"] = row["bert_ms"] / row["m2_ms"]
            if "m2_ms" in row and "m2_conv1d_ms" in row:
                row["shifted_over_conv1d"] = row["m2_conv1d_ms"] / row["m2_ms"]
            rows.append(row)
            print(format_context_row(row), flush=True)
    return rows


def run_short_filters_as_conv1d(model: nn.Module) -> None:
    """Make M2's short filters run `nn.Conv1d`'s depthwise kernel, as before f38a21c (shifted multiply-adds since):
    a forward hook that changes nothing sends a short filter through the module itself."""
    filters = [module.short_filter for module in model.modules() if isinstance(getattr(module, "short_filter", None),
                                                                              nn.Conv1d)]
    if not filters:
        raise ValueError("no M2 short filter (nn.Conv1d) in this model")
    for short_filter in filters:
        short_filter.register_forward_hook(lambda module, inputs, output: None)


def format_context_row(row: dict) -> str:
    def cell(name: str) -> str:
        if f"{name}_ms" not in row:
            return f"{name} {row.get(f'{name}_error', 'n/a')}"
        peak = row.get(f"{name}_peak_mb")
        peak_text = f", {peak:7.0f} MB" if peak is not None else ""
        return f"{name} {row[f'{name}_tokens_per_s']:11.0f} tok/s ({row[f'{name}_ms']:8.2f} ms{peak_text})"

    ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "n/a"
    text = f"L={row['length']:6} B={row['batch']:3} {row['dtype']:5} {cell('m2')}  {cell('bert')}  M2/BERT {ratio}"
    if "shifted_over_conv1d" in row:
        text += f"  {cell('m2_conv1d')}  shifted/conv1d {row['shifted_over_conv1d']:.2f}x"
    return text


# --------------------------------------------------------------------------------------------------------------------
# Converted models against their dense originals
# --------------------------------------------------------------------------------------------------------------------


def host_milliseconds(call: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    begin = time.perf_counter()
    call()
    elapsed = (time.perf_counter() - begin) * 1e3
    torch.cuda.synchronize()
    return elapsed


def time_converted(device: torch.device, args: argparse.Namespace) -> list[dict]:
    """``bench_converted.py``'s models (random BERT of the MiniLM and BERT-base shapes, dense and converted at
    ``mlp`` / ``all``, ``nblocks`` 4, ``--converted-inference-path`` and ``--converted-training-path``) on the device:
    inference in bfloat16 and float32, and a training step (forward, backward, AdamW) of float32 weights under
    bfloat16 autocast, as `Trainer(bf16=True)` runs it, and in float32 (``--converted-modes``). Each row records the
    paths that ``"auto"`` / ``"measured"`` timed for its layers (on CUDA)."""
    from transformers import BertForSequenceClassification, BertModel

    from bench_converted import VARIANTS, batch_of, build, inference_call, measured_path_choices, training_call

    from m2_hf import clear_measured_inference_paths, clear_measured_training_paths

    measure = timer(device, args.repeats)
    rows = []
    for shape in args.converted_shapes:
        for mode, dtype_name in (CONVERTED_MODES[name] for name in args.converted_modes):
            cls = BertModel if mode == "inference" else BertForSequenceClassification
            batch_size = args.converted_batch if mode == "inference" else args.converted_train_batch
            row = {"shape": shape, "mode": mode, "dtype": dtype_name, "batch": batch_size,
                   "compile": args.converted_compile if mode == "training" else None,
                   "length": args.converted_length, "nblocks": 4, "inference_path": args.converted_inference_path,
                   "training_path": args.converted_training_path}
            clear_measured_inference_paths()
            clear_measured_training_paths()
            for variant in VARIANTS:
                torch.manual_seed(0)
                model = build(shape, variant, cls, 4, args.converted_inference_path,
                              args.converted_training_path).to(device)
                batch = {k: v.to(device) for k, v in batch_of(
                    model.config, batch_size, args.converted_length, labels=mode == "training").items()}
                if mode == "inference":
                    call = inference_call(model.to(DTYPES[dtype_name]), batch)
                else:
                    autocast = torch.bfloat16 if "autocast" in dtype_name else None
                    if args.converted_compile:  # as `Trainer(torch_compile=True)`: the model, not the step
                        # Every model shares `forward`'s code: without a reset, the sixth model exceeds dynamo's
                        # recompile limit and silently runs eager.
                        torch._dynamo.reset()
                        model.forward = torch.compile(model.forward, backend=args.converted_compile)
                    call = training_call(model, batch, autocast_dtype=autocast)
                try:
                    samples = measure(call)
                except Exception as error:  # a compiler failure is a result too; the other models still run
                    if not args.converted_compile:
                        raise
                    row[f"{variant}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                    model = call = None
                    continue
                row[f"{variant}_ms"], row[f"{variant}_samples_ms"] = statistics.median(samples), samples
                if device.type == "cuda":  # time to issue one call on an idle device: near `_ms`, the host bounds it
                    row[f"{variant}_host_ms"] = statistics.median(host_milliseconds(call) for _ in range(10))
                model = call = None
            for variant in VARIANTS[1:]:
                if f"{variant}_ms" in row and "dense_ms" in row:
                    row[f"{variant}_speedup"] = row["dense_ms"] / row[f"{variant}_ms"]
            row["measured_paths"] = measured_path_choices(mode)
            rows.append(row)
            print(f"{shape:9} {mode:9} {dtype_name:18} batch {batch_size:4} x {args.converted_length}: " + "  ".join(
                f"{v} {row[f'{v}_ms']:8.3f} ms" + (f" ({row[f'{v}_speedup']:.2f}x)" if v != "dense" else "")
                if f"{v}_ms" in row else f"{v} {row[f'{v}_error']}" for v in VARIANTS), flush=True)
            if "dense_host_ms" in row:
                print("    host time to issue one call: " + "  ".join(
                    f"{v} {row[f'{v}_host_ms']:.3f} ms" for v in VARIANTS if f"{v}_host_ms" in row), flush=True)
            for choice in row["measured_paths"]:
                print(f"    auto measured {choice['in_features']}->{choice['out_features']} nblocks "
                      f"{choice['nblocks']} {choice['dtype']} autocast {choice['autocast_dtype']} rows<="
                      f"{choice['rows_up_to']}: {choice['path']}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Where M2-BERT's time goes
# --------------------------------------------------------------------------------------------------------------------

PROFILE_ROWS = 25


def profile_m2_bert(device: torch.device, args: argparse.Namespace) -> list[dict]:
    """`torch.profiler` of one M2-BERT forward (the long-context section's model, ``--tokens`` per call) at each of
    ``--profile-lengths``, in each of ``--model-dtypes``: the ops that take the most device time (CPU time on a CPU),
    with their call counts, and the forward's wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rows = []
    for length in args.profile_lengths:
        batch = max(1, args.tokens // length)
        ids = torch.randint(1, 30522, (batch, length), device=device)
        for dtype_name in args.model_dtypes:
            torch.manual_seed(0)
            with torch.device(device):
                model = m2_bert(length, args.hidden, args.layers, args.intermediate).to(DTYPES[dtype_name])
            with torch.inference_mode():
                for _ in range(3):  # filter spectra cached, kernels chosen
                    model(input_ids=ids)
                _synchronize(device)
                with profile(activities=activities) as profiler:
                    begin = time.perf_counter()
                    model(input_ids=ids)
                    _synchronize(device)
                    wall_ms = (time.perf_counter() - begin) * 1e3
            ops = [op_times(event, device) for event in profiler.key_averages()]
            ops.sort(key=lambda op: op["self_us"], reverse=True)
            # On a GPU both an op and the kernels it launches carry the kernels' time: the total counts kernels only.
            counted = [op for op in ops if op["kernel"]] if device.type == "cuda" else ops
            row = {"length": length, "batch": batch, "dtype": dtype_name, "wall_ms": wall_ms,
                   "self_us_total": sum(op["self_us"] for op in counted), "ops": ops[:PROFILE_ROWS]}
            rows.append(row)
            print(f"L={length:6} B={batch:3} {dtype_name:5} wall {wall_ms:8.2f} ms, "
                  f"{'device' if device.type == 'cuda' else 'CPU'} self time {row['self_us_total'] / 1e3:8.2f} ms; "
                  "top ops:", flush=True)
            for op in row["ops"][:12]:
                print(f"    {op['self_us'] / 1e3:8.3f} ms {op['count']:6} calls  {op['name'][:90]}", flush=True)
            model = None
    return rows


def op_times(event, device: torch.device) -> dict:
    """One row of ``key_averages()``: self time on the device (on the CPU for a CPU run), in microseconds."""
    if device.type == "cuda":
        self_us = getattr(event, "self_device_time_total", None)
        if self_us is None:  # before torch 2.4
            self_us = event.self_cuda_time_total
    else:
        self_us = event.self_cpu_time_total
    kernel = getattr(event, "device_type", None) not in (None, torch.autograd.DeviceType.CPU)
    return {"name": event.key, "count": event.count, "self_us": float(self_us), "kernel": kernel,
            "cpu_self_us": float(event.self_cpu_time_total)}


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import transformers

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton_available": TRITON_AVAILABLE,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    if TRITON_AVAILABLE:
        import triton

        info["triton"] = triton.__version__
    return info


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per M2/BERT call (default: %(default)s)")
    parser.add_argument("--layer-tokens", type=int, default=16384, help="tokens per layer call (default: %(default)s)")
    parser.add_argument("--model-dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="what to time after the correctness checks (default: all)")
    parser.add_argument("--converted-batch", type=int, default=256, help="inference batch of the converted models")
    parser.add_argument("--converted-train-batch", type=int, default=64, help="training batch of the converted models")
    parser.add_argument("--converted-length", type=int, default=128)
    parser.add_argument("--converted-shapes", nargs="+", choices=("minilm", "bert-base"),
                        help="model shapes of the converted section (default: both)")
    parser.add_argument("--converted-inference-path", choices=_INFERENCE_PATHS, default="auto",
                        help="inference_path of the converted models' layers (default: %(default)s)")
    parser.add_argument("--converted-training-path", choices=_TRAINING_PATHS, default="auto",
                        help="training_path of the converted models' layers (default: %(default)s)")
    parser.add_argument("--long-context-compile", metavar="BACKEND",
                        help="torch.compile M2-BERT and BERT of the long-context section with this backend")
    parser.add_argument("--m2-conv1d-short-filter", action="store_true",
                        help="long_context: also time M2-BERT with its short filters on nn.Conv1d's depthwise kernel "
                             "(column m2_conv1d; the path before the shifted multiply-adds)")
    parser.add_argument("--converted-compile", metavar="BACKEND",
                        help="torch.compile the models of the training passes with this backend (e.g. inductor)")
    parser.add_argument("--converted-modes", nargs="+", choices=list(CONVERTED_MODES), default=list(CONVERTED_MODES),
                        help="passes of the converted section (default: all)")
    parser.add_argument("--layer-backends", nargs="+", choices=("torch", "triton"), default=["torch", "triton"],
                        help="Monarch multiplies of the layer section where triton is available (default: both)")
    parser.add_argument("--profile-lengths", type=int, nargs="+", default=[512, 8192],
                        help="sequence lengths of the M2-BERT profile (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", "benchmarks/out")) / "bench_gpu.json")
    args = parser.parse_args(argv)
    args.hidden, args.layers, args.intermediate, args.heads = 768, 12, 3072, 12
    args.shapes, args.nblocks = LAYER_SHAPES, LAYER_NBLOCKS
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.heads = 64, 2, 128, 2
        args.lengths, args.tokens, args.layer_tokens, args.repeats = [128, 256], 512, 256, 3
        args.profile_lengths = [128]
        args.shapes, args.nblocks = [(64, 256)], [4]
        args.converted_batch, args.converted_train_batch, args.converted_length = 2, 2, 16
    if args.converted_shapes is None:
        args.converted_shapes = ["minilm"] if args.quick else ["minilm", "bert-base"]
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    backends = ["torch", "triton"] if device.type == "cuda" and TRITON_AVAILABLE else ["torch"]
    backends = [backend for backend in backends if backend in args.layer_backends] or ["torch"]
    report = {"environment": environment(device), "command": " ".join(sys.argv)}
    print(json.dumps(report["environment"]), flush=True)

    print("\n== correctness ==", flush=True)
    report["monarch_checks"] = check_monarch_layer(device, args.layer_tokens, backends)
    for row in report["monarch_checks"]:
        print(json.dumps(row), flush=True)
    if "triton" in backends and not triton_agrees_everywhere(report["monarch_checks"]):
        print("the Triton kernel failed or disagreed with the PyTorch path (above): only the PyTorch path is timed")
        backends = ["torch"]
    if device.type != "cpu":
        report["m2_bert_device_vs_cpu_max_abs"] = check_m2_bert_on_device(device)
        print(f"M2-BERT {device.type} vs CPU, float32, max |difference| {report['m2_bert_device_vs_cpu_max_abs']:.2e}")
    write_report(args.json, report)  # partial results survive a later failure or timeout
    warm_up(device)

    if "layer" in args.sections:
        print(f"\n== Monarch layer vs nn.Linear, {args.layer_tokens} tokens (speed-up = linear time / layer time; "
              "densified: inference through the cached dense weight) ==")
        report["monarch_layer"] = time_monarch_layer(
            device, args.layer_tokens, args.repeats, args.shapes, args.nblocks, backends
        )
        report["fastest_multiply"] = fastest_multiply(report["monarch_layer"], args.nblocks)
        print(f"fastest Monarch multiply: {json.dumps(report['fastest_multiply'])}; backend='auto' on CUDA runs "
              f"{AUTO_BACKENDS.get('cuda', 'torch')!r} (m2_hf.monarch.AUTO_BACKENDS)", flush=True)
        write_report(args.json, report)

    if "converted" in args.sections:
        print(f"\n== converted BERT shapes vs dense (nblocks 4; speed-up = dense time / converted time) ==")
        report["converted"] = time_converted(device, args)
        write_report(args.json, report)

    if "long_context" in args.sections:
        print(f"\n== M2-BERT vs BERT (SDPA), {args.layers} layers, hidden {args.hidden}, {args.tokens} tokens per "
              "call ==")
        report["long_context"] = time_long_context(device, args)
        write_report(args.json, report)

    if "profile" in args.sections:
        print(f"\n== where M2-BERT's forward spends its time (torch.profiler; {args.tokens} tokens per call) ==")
        report["profile"] = profile_m2_bert(device, args)
        write_report(args.json, report)
    print(f"\nwrote {args.json}")


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
