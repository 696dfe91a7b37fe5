"""Helpers the benchmark scripts share: machine facts, timing, table and JSON output, argument types."""

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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def seconds_per_call(fn: Callable[[], None], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def timing_summary(samples: list[float]) -> dict:
    """The median a table shows, with the range and every sample: raw results files keep all of them."""
    samples = list(samples)
    if not samples:
        raise ValueError("No timing samples to summarise: measure at least one repeat.")
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on every platform
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset/cgroup pinning, unlike os.cpu_count()
    except AttributeError:
        return os.cpu_count() or 1


def format_table_line(values: list[str], columns: list[tuple[str, int, str]]) -> str:
    """One table row; `columns` holds (title, width, alignment) per column."""
    return "  ".join(f"{value:{align}{width}}" for value, (_, width, align) in zip(values, columns))


def write_json(path: Path, meta: dict, rows: list[dict], verdicts: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metadata": meta, "results": rows, "targets": verdicts}, indent=2) + "\n")
    log(f"wrote {path}")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
