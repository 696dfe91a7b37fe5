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
