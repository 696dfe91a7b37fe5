#!/usr/bin/env python
"""CPU benchmark of the filter-spectrum cache's budget: M2-BERT-base peak memory and throughput of this checkout
against a baseline checkout (another commit of m2-hf), measured side by side, and BERT-base's (SDPA) peak memory.

Reproduce (from the repository root; the baseline is any other checkout, e.g. ``git worktree add /tmp/base f7e62f2``)::

    python benchmarks/bench_filter_cache.py --baseline /tmp/base
    python benchmarks/bench_filter_cache.py --baseline /tmp/base --quick      # tiny models, a minute
    python benchmarks/bench_filter_cache.py --spectrum-only --repeats 7       # one filter's uncached spectrum

Memory: `bench_long_context.py`'s probe (``--memory-child``: peak RSS increase of one cold forward in a fresh
process), run from each checkout's own copy of that script. Throughput: one worker process per configuration
(baseline; this checkout with its default ``filter_cache_bytes``; this checkout with no limit), each importing its
own checkout's m2-hf, built and warmed up once per length; then rounds in which every configuration times one
forward per length, in a rotating order, so that the load of a shared machine hits them alike. Ratios of medians
are reported; the JSON keeps every sample.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import available_cores, cpu_model, load_average, log, positive_int  # noqa: E402

CONFIGURATIONS = {  # name -> (checkout: "baseline" or "this", budget override; "default" keeps the config's)
    "baseline": ("baseline", "default"),
    "default_budget": ("this", "default"),
    "no_limit": ("this", None),
}


def worker_main(tree: str, budget: str, lengths: list[int], tokens: int, quick: bool) -> None:
    """Serve ``time LENGTH`` requests on stdin with the seconds of one warm forward, on stdout."""
    sys.path.insert(0, os.path.join(tree, "benchmarks"))
    import torch

    import bench_long_context as blc  # this checkout's copy: it puts its own repository first on sys.path

    import m2_hf

    torch.set_num_threads(available_cores())
    shape = blc.QUICK_SHAPE if quick else blc.BASE_SHAPE
    runs = {}
    for length in lengths:
        model = blc.build_model("m2", shape, length, 0)
        if budget != "default":
            model.filter_cache.max_bytes = None
        runs[length] = blc.forward_call(model, blc.make_input_ids(blc.batch_for(tokens, length), length, 0))
        runs[length]()  # warm-up: allocator, oneDNN primitives, the filter cache
    print(json.dumps({"ready": True, "m2_hf": m2_hf.__file__}), flush=True)
    for line in sys.stdin:
        length = int(line.split()[1])
        start = time.perf_counter()
        runs[length]()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def start_worker(name: str, trees: dict, args) -> subprocess.Popen:
    tree, budget = CONFIGURATIONS[name]
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", trees[tree], str(budget),
               "--tokens", str(args.tokens), "--lengths", *map(str, args.lengths)] + (["--quick"] if args.quick else [])
    env = {**os.environ, "PYTHONPATH": trees[tree]}
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def read_reply(worker: subprocess.Popen) -> dict:
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError("a benchmark worker exited early (see its stderr above)")
    return json.loads(line)


def time_side_by_side(trees: dict, args, result: dict, save) -> None:
    workers = {}
    for name in args.configurations:
        log(f"building and warming up {name}")
        workers[name] = start_worker(name, trees, args)
        result.setdefault("m2_hf_files", {})[name] = read_reply(workers[name])["m2_hf"]  # warm-ups do not overlap
    samples = result["samples_s"]
    names = list(args.configurations)
    for round_index in range(args.repeats):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for length in args.lengths:
            for name in order:
                workers[name].stdin.write(f"time {length}\n")
                workers[name].stdin.flush()
                samples[name][length].append(read_reply(workers[name])["seconds"])
        save()
        log(f"round {round_index + 1}/{args.repeats} done (load {load_average()})")
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()


def probe_memory(tree: str, model: str, length: int, batch: int, args) -> dict:
    command = [sys.executable, os.path.join(tree, "benchmarks", "bench_long_context.py"), "--memory-child", model,
               str(length), str(batch)] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": tree})
    if done.returncode != 0:
        return {"status": "failed", "reason": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="path of the baseline checkout")
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[4096, 16384])
    parser.add_argument("--tokens", type=positive_int, default=16384, help="tokens per call (default: %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=4, help="timed rounds (default: %(default)s)")
    parser.add_argument("--memory-repeats", type=positive_int, default=1, help="probes per M2 configuration")
    parser.add_argument("--configurations", nargs="+", choices=list(CONFIGURATIONS), default=list(CONFIGURATIONS),
                        help="timed configurations (default: all)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="run the memory probes")
    parser.add_argument("--quick", action="store_true", help="tiny models, lengths 128 256, 512 tokens")
    parser.add_argument("--json", type=Path, default=HERE / "out" / "bench_filter_cache.json")
    parser.add_argument("--spectrum-only", action="store_true",
                        help="only time one filter's uncached spectrum against the whole-tensor reference")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and args.lengths == [4096, 16384]:
        args.lengths, args.tokens = [128, 256], 512
    if args.worker:
        worker_main(args.worker[0], args.worker[1], args.lengths, args.tokens, args.quick)
        return 0
    if args.spectrum_only:
        result = {"metadata": {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                               "cpu": cpu_model(), "cores": available_cores(), "command": " ".join(sys.argv)}}
        time_spectra(args, result)
        write_result(args.json, result)
        return 0
    if not args.baseline:
        parser.error("--baseline PATH is required")
    trees = {"baseline": str(Path(args.baseline).resolve()), "this": str(HERE.parent)}
    result = {
        "metadata": {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cores": available_cores(), "trees": trees, "command": " ".join(sys.argv), "tokens": args.tokens,
            "lengths": args.lengths, "quick": args.quick,
        },
        "memory": {},
        "samples_s": {name: {length: [] for length in args.lengths} for name in args.configurations},
    }
    def save() -> None:  # after every measurement, so that an interrupted run keeps what it measured
        write_result(args.json, result)

    for length in args.lengths if args.memory else []:
        for _ in range(args.memory_repeats):
            for tree in ("baseline", "this"):
                log(f"memory probe: M2 ({tree}) at {length}")
                probe = probe_memory(trees[tree], "m2", length, max(1, args.tokens // length), args)
                result["memory"].setdefault(f"m2_{tree}@{length}", []).append(probe)
                save()
    time_side_by_side(trees, args, result, save)
    for length in args.lengths if args.memory else []:
        log(f"memory probe: BERT at {length}")
        result["memory"][f"bert@{length}"] = [probe_memory(trees["this"], "bert", length, max(1, args.tokens // length), args)]
        save()
    print_summary(result, args.lengths)
    return 0


def time_spectra(args, result: dict) -> None:
    """Milliseconds to compute one filter's spectrum when it is not cached: the inference computation
    (`HyenaFilter._spectrum_by_channels`) against the whole-tensor reference (`kernel_spectrum(*filter(length))`,
    what the baseline computed once per length and then cached), alternating, in this process."""
    import torch

    import bench_long_context as blc
    from m2_hf import M2BertConfig
    from m2_hf.m2_mixer import HyenaFilter, kernel_spectrum

    torch.set_num_threads(available_cores())
    shape = blc.QUICK_SHAPE if args.quick else blc.BASE_SHAPE
    hidden = shape.hidden
    config = M2BertConfig(hidden_size=hidden, max_position_embeddings=max(args.lengths))
    hyena = HyenaFilter(config, hidden, bidirectional=True).eval()
    ways = {"inference": hyena._spectrum_by_channels, "reference": lambda n: kernel_spectrum(*hyena(n))}
    samples = result.setdefault("spectrum_ms", {name: {length: [] for length in args.lengths} for name in ways})
    with torch.no_grad():
        for length in args.lengths:
            for name, way in ways.items():
                way(length)  # warm-up
            for _ in range(args.repeats):
                for name, way in ways.items():
                    start = time.perf_counter()
                    way(length)
                    samples[name][length].append(1e3 * (time.perf_counter() - start))
            medians = {name: statistics.median(samples[name][length]) for name in ways}
            log(f"spectrum of one filter (hidden {hidden}) at {length}: "
                + ", ".join(f"{name} {ms:.1f} ms" for name, ms in medians.items())
                + f"; reference / inference {medians['reference'] / medians['inference']:.2f}x")


def write_result(path: Path, result: dict) -> None:
    result["metadata"]["load_average_1m_at_last_write"] = load_average()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def print_summary(result: dict, lengths: list[int]) -> None:
    samples = result["samples_s"]
    for length in lengths:
        peaks = {key.split("@")[0]: [round(m.get("peak_increase_mb") or 0) for m in probes]
                 for key, probes in result["memory"].items() if key.endswith(f"@{length}")}
        print(f"length {length}: peak MB {json.dumps(peaks)}")
        if "baseline" not in samples or not all(samples[name][length] for name in samples):
            continue
        base = statistics.median(samples["baseline"][length])
        for name in samples:
            median = statistics.median(samples[name][length])
            print(f"  {name:<15} median {median:7.2f} s  throughput vs baseline {base / median:6.3f}  "
                  f"samples {[round(s, 2) for s in samples[name][length]]}")


if __name__ == "__main__":
    sys.exit(main())
