#!/usr/bin/env python
"""How precisely a test split measures the accuracy gap between a dense model and its Monarch student.

For each run folder of `examples/dense_to_sparse.py` (its `dense/` and `monarch/` models), both models predict the
same labelled test split (the example's offline Rotten Tomatoes test split unless ``--test_file`` names a CSV/JSON
file with ``text`` and ``label`` columns), and the script reports the gap in accuracy points with a paired bootstrap
over the test examples (both models resampled together, so what they get right together cancels): its standard
deviation and 95% interval, and how many examples only one of the two gets right.

    python benchmarks/paired_test_gap.py runs/d2s/seed42-mlp runs/d2s/seed43-mlp --json gap.json

Every run is scored on the same examples, so averaging the gaps of several seeds does not shrink this sampling
error: it is the resolution of the split itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "examples"))

import example_utils  # noqa: E402,F401  (makes the checkout importable)
import m2_hf  # noqa: E402,F401  (registers the converted and M2 classes)
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402


def paired_gap(labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray, samples: int = 10000,
               seed: int = 0) -> dict:
    """The accuracy gap ``sparse - dense`` in points, with a paired bootstrap of the examples."""
    labels, dense, sparse = map(np.asarray, (labels, dense, sparse))
    if not labels.shape == dense.shape == sparse.shape or labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels and both models' predictions must be equally long 1-D arrays, got shapes "
                         f"{labels.shape}, {dense.shape}, {sparse.shape}.")
    dense_right, sparse_right = dense == labels, sparse == labels
    difference = sparse_right.astype(float) - dense_right.astype(float)  # per example: -1, 0 or 1
    resampled = np.random.default_rng(seed).integers(0, len(labels), (samples, len(labels)))
    gaps = difference[resampled].mean(axis=1) * 100
    return {
        "examples": int(len(labels)),
        "dense_accuracy": float(dense_right.mean()),
        "sparse_accuracy": float(sparse_right.mean()),
        "gap_points": float(difference.mean() * 100),
        "bootstrap_sd_points": float(gaps.std()),
        "bootstrap_95_points": [float(np.percentile(gaps, 2.5)), float(np.percentile(gaps, 97.5))],
        "only_dense_right": int((dense_right & ~sparse_right).sum()),
        "only_sparse_right": int((sparse_right & ~dense_right).sum()),
    }


def predictions(folder: Path, texts: list[str], max_length: int, batch_size: int = 128) -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            out.append(model(**batch).logits.argmax(-1).numpy())
    return np.concatenate(out)


def model_folders(run: Path) -> tuple[Path, Path]:
    """``(dense, monarch)`` model folders of one run; a run that reused an earlier run's dense model (``--dense_run``)
    names it in its ``results.json``."""
    dense, monarch = run / "dense", run / "monarch"
    if not (dense / "config.json").is_file():
        results = run / "results.json"
        rows = json.loads(results.read_text()) if results.is_file() else []
        source = next((row.get("reused_from") for row in rows if row.get("model") == "dense"), None)
        if source is not None:
            dense = Path(source) / "dense"
    missing = [name for name, folder in (("dense", dense), ("monarch", monarch))
               if not (folder / "config.json").is_file()]
    if missing:
        raise ValueError(f"{run} has no {' or '.join(missing)} model folder (nor a dense run it reused): pass "
                         "output_dir folders of examples/dense_to_sparse.py")
    return dense, monarch


def test_split(test_file: Optional[Path], test_fold: int = 0) -> tuple[list[str], np.ndarray]:
    if test_file is None:
        from finetune_text_classification import rotten_tomatoes_offline

        split = rotten_tomatoes_offline(test_fold)["test"]
    else:
        from datasets import load_dataset

        split = load_dataset("csv" if test_file.suffix == ".csv" else "json", data_files=str(test_file))["train"]
    return list(split["text"]), np.asarray(split["label"])


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output_dir folders of examples/dense_to_sparse.py")
    parser.add_argument("--test_file", type=Path, help="CSV or JSON with text and label columns (default: the "
                                                       "example's offline Rotten Tomatoes test split)")
    parser.add_argument("--offline_test_fold", type=int, default=0, help="as in the runs, without --test_file "
                                                                         "(default: %(default)s)")
    parser.add_argument("--max_seq_length", type=int, default=128, help="as in the runs (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=10000, help="bootstrap samples (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="where to write the results")
    args = parser.parse_args(argv)
    folders = {}
    for run in args.runs:
        try:
            folders[run] = model_folders(run)
        except ValueError as error:
            parser.error(str(error))
    texts, labels = test_split(args.test_file, args.offline_test_fold)
    rows = []
    for run in args.runs:
        dense = predictions(folders[run][0], texts, args.max_seq_length)
        sparse = predictions(folders[run][1], texts, args.max_seq_length)
        rows.append({"run": str(run), **paired_gap(labels, dense, sparse, args.samples)})
        row = rows[-1]
        low, high = row["bootstrap_95_points"]
        print(f"{run}: dense {row['dense_accuracy']:.4f}, Monarch {row['sparse_accuracy']:.4f}, gap "
              f"{row['gap_points']:+.2f} points (paired bootstrap sd {row['bootstrap_sd_points']:.2f}, 95% "
              f"[{low:+.2f}, {high:+.2f}]); only dense right {row['only_dense_right']}, only Monarch right "
              f"{row['only_sparse_right']} of {row['examples']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
