"""Cost of `m2-convert monarch` against plainly loading and saving the same checkpoint, in one run.

Checkpoints: BERT-base (`BertForMaskedLM`) and GPT-2 small (`GPT2LMHeadModel`) with random weights built from their
standard configs and saved as safetensors. Each operation runs in a fresh process (so that peak memory is its own),
alternating conversion and load-and-save, several times; the table gives median wall times and the peak resident
memory increase over the process's state after imports. Targets: conversion at most 2x the load-and-save time, peak
memory at most 2x the checkpoint size.

    python benchmarks/bench_conversion.py [--repeats 3] [--targets mlp] [--nblocks 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "bert-base": ("BertConfig", "BertForMaskedLM", {}),
    "gpt2-small": ("GPT2Config", "GPT2LMHeadModel", {}),
}
TIME_TARGET = 2.0
MEMORY_TARGET = 2.0


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(operation: str, source: str, destination: str, targets: list[str], nblocks: int) -> None:
    """One measured operation in this (fresh) process; prints a JSON line."""
    import torch  # noqa: F401  (imports are part of the baseline, not of the measurement)
    import transformers

    from conversion.monarch import MonarchSettings, convert_to_monarch

    baseline = _status_kb("VmRSS")
    start = time.perf_counter()
    if operation == "load-save":
        config = json.loads((Path(source) / "config.json").read_text())
        model = getattr(transformers, config["architectures"][0]).from_pretrained(source)
        model.save_pretrained(destination)
    else:
        settings = MonarchSettings(targets=targets, nblocks={"*": nblocks})
        convert_to_monarch(Path(source), Path(destination), settings, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_increase_mb": (_status_kb("VmHWM") - baseline) / 1024}))


def write_checkpoint(name: str, folder: Path) -> int:
    import torch
    import transformers

    config_name, model_name, overrides = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**overrides))
    model.save_pretrained(folder)
    return (folder / "model.safetensors").stat().st_size


def measure(operation: str, source: Path, work: Path, args: argparse.Namespace) -> dict:
    destination = work / f"{operation}-{time.monotonic_ns()}"
    command = [sys.executable, __file__, "--child", operation, str(source), str(destination),
               "--targets", *args.targets, "--nblocks", str(args.nblocks)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    if result.returncode != 0:
        raise SystemExit(f"{operation} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", nargs="+", default=["mlp"])
    parser.add_argument("--nblocks", type=int, default=4)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/out/bench_conversion.json")
    parser.add_argument("--child", nargs=3, metavar=("OPERATION", "SOURCE", "DESTINATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.targets, args.nblocks)
        return
    rows = []
    print(f"m2-convert monarch --targets {' '.join(args.targets)} --nblocks {args.nblocks} vs load + save_pretrained; "
          f"median of {args.repeats} fresh processes each")
    print(f"{'model':11} {'ckpt MB':>8} {'load+save s':>11} {'convert s':>9} {'time ratio':>10} "
          f"{'load+save MB':>12} {'convert MB':>10} {'mem / ckpt':>10}")
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        for name in args.models:
            source = work / name
            size_mb = write_checkpoint(name, source) / 2**20
            samples = {"load-save": [], "convert": []}
            for _ in range(args.repeats):
                for operation in samples:
                    samples[operation].append(measure(operation, source, work, args))
            row = {"model": name, "checkpoint_mb": size_mb, "samples": samples}
            for operation, values in samples.items():
                row[f"{operation}_seconds"] = statistics.median(v["seconds"] for v in values)
                row[f"{operation}_peak_mb"] = statistics.median(v["peak_increase_mb"] for v in values)
            row["time_ratio"] = row["convert_seconds"] / row["load-save_seconds"]
            row["memory_over_checkpoint"] = row["convert_peak_mb"] / size_mb
            rows.append(row)
            print(f"{name:11} {size_mb:>8.0f} {row['load-save_seconds']:>11.2f} {row['convert_seconds']:>9.2f} "
                  f"{row['time_ratio']:>9.2f}x {row['load-save_peak_mb']:>12.0f} {row['convert_peak_mb']:>10.0f} "
                  f"{row['memory_over_checkpoint']:>9.2f}x", flush=True)
    for row in rows:
        for label, value, target in (("time", row["time_ratio"], TIME_TARGET),
                                     ("memory", row["memory_over_checkpoint"], MEMORY_TARGET)):
            print(f"{'PASS' if value <= target else 'MISS'}  {row['model']}: {label} {value:.2f}x (target <= {target}x)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
