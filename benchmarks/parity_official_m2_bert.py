"""Numerical parity of m2-hf's M2-BERT with the official implementation (HazyResearch/m2 at a pinned commit) at a
larger size than the test fixtures (by default the released vocabulary and a 128-token context).

For each head (masked LM, classifier, retrieval encoder) and with `hyena_training_additions` on and off, it builds
the official model, moves every parameter to a trained-like scale (so that the gated branch, the D terms, both filters
and the residual convolution all matter; see `official_m2_bert.move_to_trained_scale`), writes it as a released
checkpoint folder, loads that folder with m2-hf's `from_pretrained`, and compares the outputs, in inference and with
autograd recording, at full and shorter lengths. The official model runs in float64; m2-hf runs in float64 (checked to
a relative 1e-5) and in float32 (reported: the sine filter MLP amplifies float32 rounding to about 1e-4).

    pip install einops opt_einsum          # imported by the official code
    python benchmarks/parity_official_m2_bert.py [--official-repo PATH] [--json PATH]
    # without --official-repo it clones HazyResearch/m2

``--json`` writes every comparison (head, training additions, model, dtype, length, path and relative difference),
including the official code's own float32 output against its float64 one.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import tempfile
from pathlib import Path

import torch

from m2_hf import M2BertForMaskedLM, M2BertForSequenceClassification, M2BertForTextEncoding
from official_m2_bert import (
    OUTPUT_NAME,
    add_arguments,
    build_official,
    import_official,
    move_to_trained_scale,
    official_output,
    official_output_of_short_input,
    official_source,
    write_released_folder,
)

CONFIG = dict(
    vocab_size=30528, hidden_size=96, num_hidden_layers=2, intermediate_size=192, max_position_embeddings=128,
    long_conv_l_max=128, alibi_starting_size=128, use_glu_mlp=True, use_monarch_mlp=True, monarch_mlp_nblocks=4,
    residual_long_conv=True, bidirectional=True, hyena_filter_order=32, use_positional_encodings=True, hyena_w=10,
    hyena_w_mod=1, hyena_wd=0.1, hyena_emb_dim=5, hyena_lr_pos_emb=1e-5, long_conv_kernel_learning_rate=1e-3,
    hidden_dropout_prob=0.1,
)
OURS = {"mlm": M2BertForMaskedLM, "classifier": M2BertForSequenceClassification, "retrieval": M2BertForTextEncoding}
TOLERANCE = 1e-5  # relative, float64


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.detach().double() - expected).abs().max() / expected.abs().max()).item()


def compare(models, head: str, additions: bool, lengths: list[int], folder: Path) -> list[dict]:
    """One row per (model, dtype, length, path): the relative difference of an output from the official float64 one.
    The model is m2-hf, or the official code itself in float32 (how far float32 rounding alone moves it)."""
    torch.manual_seed(0)
    official = build_official(models, head, **CONFIG, hyena_training_additions=additions)
    move_to_trained_scale(official, seed=0)
    write_released_folder(official, head, folder)
    official_float32 = copy.deepcopy(official)
    official.double()
    inputs = {length: torch.randint(5, CONFIG["vocab_size"], (3, length),
                                    generator=torch.Generator().manual_seed(length)) for length in lengths}

    def official_of(model, length: int) -> torch.Tensor:
        full = length == CONFIG["max_position_embeddings"]
        return (official_output if full else official_output_of_short_input)(model, head, inputs[length])

    with torch.no_grad():
        expected = {length: official_of(official, length) for length in lengths}
        outputs = [("official", torch.float32, length, "no_grad", official_of(official_float32, length))
                   for length in lengths]
    for dtype in (torch.float64, torch.float32):
        ours = OURS[head].from_pretrained(folder).eval().to(dtype)
        for length in lengths:
            with torch.no_grad():
                outputs.append(("m2_hf", dtype, length, "no_grad", getattr(ours(inputs[length]), OUTPUT_NAME[head])))
            # autograd records: the out-of-place path
            outputs.append(("m2_hf", dtype, length, "autograd", getattr(ours(inputs[length]), OUTPUT_NAME[head])))
    rows = []
    for model, dtype, length, path, actual in outputs:
        difference = relative_difference(actual, expected[length])
        rows.append({"head": head, "training_additions": additions, "model": model, "dtype": str(dtype)[6:],
                     "length": length, "path": path, "relative_difference": difference})
        print(f"{head:10} additions={additions!s:5} {model:8} {str(dtype)[6:]:7} L={length:4} {path:8} "
              f"max|output - official float64| / max|official float64| = {difference:.2e}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--json", type=Path, default=None, help="write every comparison to this file")
    args = parser.parse_args()
    models = import_official(official_source(args.work_dir, args.official_repo))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for head in OURS:
            for additions in (True, False):
                # The official classification head asserts inputs of max_position_embeddings tokens; for shorter
                # ones its backbone and last layer are called as its forward calls them.
                lengths = [CONFIG["max_position_embeddings"], 77]
                rows += compare(models, head, additions, lengths, Path(scratch) / f"{head}-{additions}")
    worst = {f"{model} {dtype}": max(r["relative_difference"] for r in rows
                                     if (r["model"], r["dtype"]) == (model, dtype))
             for model, dtype in (("m2_hf", "float64"), ("m2_hf", "float32"), ("official", "float32"))}
    print(f"worst m2-hf float64 difference: {worst['m2_hf float64']:.2e} (tolerance {TOLERANCE:.0e}); m2-hf float32: "
          f"{worst['m2_hf float32']:.2e}; the official code in float32: {worst['official float32']:.2e}")
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "official_commit": models.commit, "config": CONFIG,
                "torch": torch.__version__, "python": platform.python_version(), "tolerance_float64": TOLERANCE}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"metadata": meta, "worst": worst, "comparisons": rows}, indent=1) + "\n")
    if worst["m2_hf float64"] > TOLERANCE:
        raise SystemExit("m2-hf's outputs differ from the official ones")


if __name__ == "__main__":
    main()
