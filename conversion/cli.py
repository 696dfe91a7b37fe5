"""The `m2-convert` command line (also `python -m conversion`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoints import ConversionError


def _m2_bert(args: argparse.Namespace) -> dict:
    from .m2_bert import convert_m2_bert

    return convert_m2_bert(args.source, args.destination, overwrite=args.overwrite, dry_run=args.dry_run)


def _nblocks(values: list[str]) -> dict[str, int]:
    """`4` (every target) or `TARGET=N` items."""
    parsed = {}
    for value in values:
        target, _, number = value.rpartition("=")
        try:
            parsed[target or "*"] = int(number)
        except ValueError:
            raise ConversionError(f"--nblocks takes N or TARGET=N (for example 4, or mlp=4 attention=2), got {value!r}.")
    return parsed


def _monarch(args: argparse.Namespace) -> dict:
    from .monarch import MonarchSettings, convert_to_monarch, format_report

    settings = MonarchSettings(
        targets=args.targets, nblocks=_nblocks(args.nblocks), structure=args.structure, method=args.method,
        calibration_file=args.calibration_file, calibration_samples=args.calibration_samples,
        evaluation_file=args.evaluation_file,
    )
    report = convert_to_monarch(
        args.source, args.destination, settings, overwrite=args.overwrite, dry_run=args.dry_run,
        push_to_hub=args.push_to_hub,
    )
    print(format_report(report), file=sys.stderr)
    return report


def _dense(args: argparse.Namespace) -> dict:
    from .monarch import convert_to_dense

    return convert_to_dense(args.source, args.destination, overwrite=args.overwrite, dry_run=args.dry_run)


def _inspect(args: argparse.Namespace) -> dict:
    from .inspect import format_report, inspect_folder

    report = inspect_folder(args.path)
    print(format_report(report))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2-convert", description="Convert checkpoints to and from m2-hf formats.")
    commands = parser.add_subparsers(dest="command", required=True)

    m2_bert = commands.add_parser("m2-bert", help="a released M2-BERT checkpoint folder to a native m2-hf folder")
    m2_bert.add_argument("source", type=Path, help="released checkpoint folder (config.json + weights)")
    m2_bert.add_argument("destination", type=Path, help="output folder (must not exist unless --overwrite)")
    m2_bert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    m2_bert.add_argument("--dry-run", action="store_true", help="check and report, write nothing")
    m2_bert.set_defaults(run=_m2_bert)

    monarch = commands.add_parser("monarch", help="a BERT/RoBERTa/DistilBERT/GPT-2 checkpoint to Monarch layers")
    monarch.add_argument("source", help="checkpoint folder (config.json, weights, tokenizer files), or a Hub repo id "
                         "when the Hub is reachable")
    monarch.add_argument("destination", type=Path, help="output folder (must not exist unless --overwrite)")
    monarch.add_argument("--targets", nargs="+", default=["mlp"],
                         help="presets mlp, attention, all, or regular expressions matching whole layer names "
                              "(default: mlp)")
    monarch.add_argument("--nblocks", nargs="+", default=["4"], metavar="N|TARGET=N",
                         help="blocks per layer, for every target or per target (default: 4)")
    monarch.add_argument("--structure", choices=["monarch", "blockdiag"], default="monarch")
    monarch.add_argument("--method", choices=["closed-form", "calibrated"], default="closed-form",
                         help="closed-form projection, or calibrated: fitted to the layers' outputs on the calibration "
                              "text (default: closed-form)")
    monarch.add_argument("--calibration-file", type=Path, help="plain text, one sample per line: report (and, with "
                         "--method calibrated, fit) the converted model against the original on it")
    monarch.add_argument("--evaluation-file", type=Path, help="plain text to compare against the original on, when "
                         "it should differ from the calibration text (held-out text)")
    monarch.add_argument("--calibration-samples", type=int, default=1000,
                         help="lines used from each text file (default: 1000)")
    monarch.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the finished folder to this Hub repo")
    monarch.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    monarch.add_argument("--dry-run", action="store_true", help="convert and report, write nothing")
    monarch.set_defaults(run=_monarch)

    dense = commands.add_parser("dense", help="a Monarch-converted folder back to the dense original (exact)")
    dense.add_argument("source", type=Path)
    dense.add_argument("destination", type=Path)
    dense.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    dense.add_argument("--dry-run", action="store_true", help="check and report, write nothing")
    dense.set_defaults(run=_dense)

    inspect = commands.add_parser("inspect", help="what a checkpoint folder holds")
    inspect.add_argument("path", type=Path)
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = args.run(args)
    except ConversionError as error:
        print(f"m2-convert {args.command}: error: {error}", file=sys.stderr)
        return 2
    if args.command != "inspect":
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
