#!/usr/bin/env python
"""CPU benchmark: M2-ViT-b against Transformers' ViT-b/16 (`ViTForImageClassification`, SDPA attention), images/s
of inference (forward) and training (forward + backward with the classification loss), at 224 px and 512 px.

Reproduce (from the repository root, inside the project's virtual environment)::

    python benchmarks/bench_vision.py            # full run: about 15 minutes on 2 cores, 24 GB
    python benchmarks/bench_vision.py --quick    # tiny models, seconds (smoke test)

Models: `M2ViTForImageClassification` with its defaults (hidden 768, 12 layers, 16 px patches, block-diagonal MLP
with 4 blocks, mean pooling) and `ViTForImageClassification` with `ViTConfig`'s defaults (ViT-b/16), both float32,
1000 classes, without dropout, each built for the image size measured (M2-ViT's filters span the patch grid; ViT's
position table has one entry per patch). 224 px gives 196 patches, 512 px 1024.

Each model and size runs in a fresh process: a warm-up, then `--repeats` measured calls; the table gives medians.
There is no target in the issue: the ratios are reported as measured.
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

MODELS = ("m2-vit", "vit")


def build_model(name: str, image_size: int, quick: bool):
    import transformers

    from m2_hf import M2ViTConfig, M2ViTForImageClassification

    shape = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=256, patch_size=8) if quick else {}
    torch.manual_seed(0)
    if name == "m2-vit":
        return M2ViTForImageClassification(M2ViTConfig(image_size=image_size, num_labels=1000, **shape))
    config = transformers.ViTConfig(image_size=image_size, num_labels=1000, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, attn_implementation="sdpa", **shape)
    if quick:
        config.num_attention_heads = 1
    return transformers.ViTForImageClassification(config)


def measure(model, batch: int, image_size: int, training: bool, repeats: int) -> list[float]:
    pixels = torch.randn(batch, 3, image_size, image_size)
    labels = torch.randint(0, 1000, (batch,))
    model.train(training)
    seconds = []
    for _ in range(repeats + 1):  # one warm-up
        start = time.perf_counter()
        if training:
            model.zero_grad(set_to_none=True)
            model(pixels, labels=labels).loss.backward()
        else:
            with torch.no_grad():
                model(pixels)
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


def child(name: str, image_size: int, batch: int, repeats: int, quick: bool) -> None:
    model = build_model(name, image_size, quick)
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "patches": (image_size // model.config.patch_size) ** 2,
        "forward": measure(model, batch, image_size, False, repeats),
        "training": measure(model, batch, image_size, True, repeats),
    }
    print(json.dumps(result))


def in_fresh_process(name: str, image_size: int, batch: int, repeats: int, quick: bool) -> dict:
    command = [sys.executable, __file__, "--child", name, str(image_size), str(batch), str(repeats)]
    result = subprocess.run(command + (["--quick"] if quick else []), capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{name} at {image_size} px failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and images: a smoke test")
    parser.add_argument("--sizes", nargs="+", type=positive_int, default=[224, 512])
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[8, 2],
                        help="images per call, one per size (ViT-b training at 512 px and batch 8 needs ~20 GB)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks/out/bench_vision.json")
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "SIZE", "BATCH", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, size, batch, repeats = args.child
        return child(name, int(size), int(batch), int(repeats), args.quick)
    if args.quick:
        args.sizes, args.batches, args.repeats = [32, 64], [4, 2], 2
    if len(args.batches) != len(args.sizes):
        parser.error("give one --batches entry per --sizes entry")

    rows = []
    print(f"{'size':>5} {'patches':>8} {'batch':>6} {'mode':>9} {'M2-ViT img/s':>13} {'ViT img/s':>10} {'ratio':>7}")
    for size, batch in zip(args.sizes, args.batches):
        log(f"{size} px, batch {batch}")
        results = {name: in_fresh_process(name, size, batch, args.repeats, args.quick) for name in MODELS}
        patches = results["m2-vit"]["patches"]
        for mode in ("forward", "training"):
            rate = {name: batch / statistics.median(r[mode]) for name, r in results.items()}
            ratio = rate["m2-vit"] / rate["vit"]
            rows.append({"image_size": size, "patches": patches, "batch": batch, "mode": mode,
                         "images_per_s": rate, "ratio": ratio,
                         "seconds_per_call_samples": {name: r[mode] for name, r in results.items()},
                         "parameters": {name: r["parameters"] for name, r in results.items()}})
            print(f"{size:>5} {patches:>8} {batch:>6} {mode:>9} {rate['m2-vit']:>13.2f} {rate['vit']:>10.2f} "
                  f"{ratio:>6.2f}x", flush=True)
    parameters = rows[0]["parameters"]
    print(f"\nparameters (1000 classes, {args.sizes[0]} px): M2-ViT {parameters['m2-vit'] / 1e6:.1f}M, "
          f"ViT {parameters['vit'] / 1e6:.1f}M ({parameters['m2-vit'] / parameters['vit']:.2f}x)")
    meta = {
        "date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": available_cores(),
        "torch": torch.__version__, "python": platform.python_version(),
        "arguments": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
    }
    write_json(args.json, meta, rows, [])


if __name__ == "__main__":
    main()
