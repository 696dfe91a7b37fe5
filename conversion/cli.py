"""The `m2-convert` command line (also `python -m conversion`).

Every failure ends in one line `m2-convert: error: ...` on stderr and exit code 2; `--debug` shows the traceback
instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoints import ConversionError
from .refinement import REFINE_LEARNING_RATE

PROG = "m2-convert"


class UsageError(ConversionError):
    """Arguments that argparse refused."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message}; see `{self.prog} --help`")


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 1e-4, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.4, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1] of the targeted layers' size, got {text}")
    return value


def _nblocks(values: list[str]) -> dict[str, int]:
    """`4` (every target) or `TARGET=N` items."""
    parsed = {}
    for value in values:
        target, _, number = value.rpartition("=")
        try:
            parsed[target or "*"] = int(number)
        except ValueError:
            raise ConversionError(f"--nblocks takes N or TARGET=N (for example 4, or mlp=4 attention=2), got {value!r}.")
        if parsed[target or "*"] < 1:
            raise ConversionError(f"--nblocks must be at least 1, got {value!r}.")
    return parsed


def _m2_bert(args: argparse.Namespace) -> dict:
    from .m2_bert import convert_m2_bert

    return convert_m2_bert(args.source, args.destination, overwrite=args.overwrite, dry_run=args.dry_run)


def _monarch(args: argparse.Namespace) -> dict:
    from .monarch import MonarchSettings, convert_to_monarch, format_report

    if args.budget is not None and args.nblocks is not None:
        raise ConversionError("--budget chooses nblocks for every layer, so it cannot be combined with --nblocks: "
                              "leave out one of them.")
    if args.budget_of is not None and args.budget is None:
        raise ConversionError("--budget-of says what --budget counts: pass --budget F too (for example --budget 0.4).")
    settings = MonarchSettings(
        targets=args.targets, nblocks=_nblocks(args.nblocks or ["4"]), structure=args.structure, method=args.method,
        calibration_file=args.calibration_file, calibration_samples=args.calibration_samples,
        evaluation_file=args.evaluation_file, budget=args.budget, budget_of=args.budget_of or "parameters",
        refine_steps=args.refine_steps,
        **({} if args.refine_learning_rate is None else {"refine_learning_rate": args.refine_learning_rate}),
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


def _onnx(args: argparse.Namespace) -> dict:
    from .onnx_export import export_onnx

    return export_onnx(args.source, args.destination, overwrite=args.overwrite, dry_run=args.dry_run)


def _inspect(args: argparse.Namespace) -> dict:
    from .inspect import format_report, inspect_folder

    report = inspect_folder(args.path)
    print(format_report(report))
    return report


def _subcommand(commands, name: str, help: str, examples: str, run) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name, help=help, description=help[0].upper() + help[1:] + ".", epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.set_defaults(run=run)
    return parser


def _add_output_arguments(parser: argparse.ArgumentParser, destination_help: str) -> None:
    parser.add_argument("destination", type=Path, help=destination_help + " (must not exist, or be empty, unless "
                        "--overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the destination if it is an earlier m2-convert output (never any other folder)")
    parser.add_argument("--dry-run", action="store_true",
                        help="do all the checks and the conversion in memory, print the report, write nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Convert checkpoints to and from m2-hf formats. The source is never "
                     "modified; the output appears complete or not at all.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m2_bert = _subcommand(
        commands, "m2-bert", "convert a released M2-BERT checkpoint folder (HazyResearch/m2 format) to a native m2-hf "
        "folder", "  m2-convert m2-bert ./m2-bert-80M ./m2-bert-80M-hf\n"
        "  m2-convert m2-bert ./m2-bert-80M ./m2-bert-80M-hf --dry-run", _m2_bert,
    )
    m2_bert.add_argument("source", help="released checkpoint folder (config.json plus pytorch_model.bin or "
                         "safetensors, tokenizer files), or a Hub repo id when the Hub is reachable")
    _add_output_arguments(m2_bert, "folder to write the native m2-hf checkpoint to")

    monarch = _subcommand(
        commands, "monarch", "project the linear layers of a dense checkpoint of any Transformers architecture (Llama, "
        "Qwen, T5, ViT, BERT, GPT-2, ...) to Monarch (or block-diagonal) layers",
        "  m2-convert monarch ./bert-base ./bert-base-monarch --targets mlp --nblocks 4\n"
        "  m2-convert monarch ./llama ./llama-monarch --targets all --dry-run   # lists what each preset selects\n"
        "  m2-convert monarch ./gpt2 ./gpt2-monarch --targets all --nblocks mlp=4 attention=2 --dry-run\n"
        "  m2-convert monarch ./minilm ./minilm-monarch --method calibrated --calibration-file text.txt\n"
        "  m2-convert monarch ./llama ./llama-monarch --targets all --budget 0.4 --dry-run   # nblocks per layer",
        _monarch,
    )
    monarch.add_argument("source", help="checkpoint folder (config.json, weights, tokenizer files), or a Hub repo id "
                         "when the Hub is reachable")
    _add_output_arguments(monarch, "folder to write the converted checkpoint to")
    monarch.add_argument("--targets", nargs="+", default=["mlp"], metavar="TARGET",
                         help="presets mlp, attention, all (the linear layers of the repeated blocks; embeddings, "
                              "routers, poolers and heads stay dense), or regular expressions matching whole layer "
                              "names, relative to the base model or, for a head's layers, to the head model "
                              "(lm_head) (default: mlp); put them after SOURCE DESTINATION")
    monarch.add_argument("--nblocks", nargs="+", metavar="N|TARGET=N",
                         help="blocks per layer, for every target or per target (default: 4); nblocks=1 keeps a "
                              "layer's size, larger values shrink it more")
    monarch.add_argument("--budget", type=_fraction, metavar="F",
                         help="instead of --nblocks: keep a fraction F (0 < F <= 1) of the targeted layers' size and "
                              "choose nblocks per layer (or keep it dense) for the least summed projection error; with "
                              "--calibration-file, the least output error on that text")
    monarch.add_argument("--budget-of", choices=["parameters", "flops"],
                         help="what --budget counts: the layers' parameters, or their linear FLOPs per token "
                              "(default: parameters)")
    monarch.add_argument("--structure", choices=["monarch", "blockdiag"], default="monarch",
                         help="monarch: two block-diagonal factors with a permutation between them (MonarchLinear); "
                              "blockdiag: one block-diagonal factor (BlockdiagLinear, M2-BERT's MLP layer) "
                              "(default: monarch)")
    monarch.add_argument("--method", choices=["closed-form", "calibrated"], default="closed-form",
                         help="closed-form projection, or calibrated: fitted to the layers' outputs on the calibration "
                              "text (default: closed-form)")
    monarch.add_argument("--calibration-file", type=Path, help="plain text, one sample per line: report (and, with "
                         "--method calibrated, fit) the converted model against the original on it")
    monarch.add_argument("--evaluation-file", type=Path, help="plain text to compare against the original on, when "
                         "it should differ from the calibration text (held-out text)")
    monarch.add_argument("--calibration-samples", type=_positive_int, default=1000, metavar="N",
                         help="lines used from each text file (default: 1000)")
    monarch.add_argument("--refine-steps", type=_non_negative_int, default=0, metavar="N",
                         help="after projection, train the structured layers together for N Adam steps (one batch of "
                              "32 calibration samples each) so that the model's hidden states match the original's on "
                              "the calibration text; needs --calibration-file (default: 0, none)")
    monarch.add_argument("--refine-learning-rate", type=_positive_float, metavar="LR",
                         help=f"Adam learning rate of --refine-steps (default: {REFINE_LEARNING_RATE:g})")
    monarch.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the finished folder to this Hub repo")

    dense = _subcommand(
        commands, "dense", "turn a Monarch-converted folder back into the dense original architecture (exact reverse "
        "sparsification)", "  m2-convert dense ./bert-base-monarch ./bert-base-dense", _dense,
    )
    dense.add_argument("source", type=Path, help="a folder written by `m2-convert monarch` (or fine-tuned from one)")
    _add_output_arguments(dense, "folder to write the plain Transformers checkpoint to")

    onnx = _subcommand(
        commands, "onnx", "export a saved M2-BERT, M2-GPT or M2-ViT folder (any head) to ONNX, with a dynamic batch "
        "size and sequence length, checked in onnxruntime against PyTorch (needs the onnx extra: "
        'pip install "m2-hf[onnx]")',
        "  m2-convert onnx ./m2-bert-80M-hf ./m2-bert-80M-onnx\n"
        "  m2-convert onnx ./my-m2-vit ./my-m2-vit-onnx --overwrite", _onnx,
    )
    onnx.add_argument("source", type=Path, help="a folder saved from an m2-hf model (save_pretrained or m2-convert "
                      "m2-bert)")
    _add_output_arguments(onnx, "folder to write model.onnx, the config and the tokenizer files to")

    inspect = _subcommand(
        commands, "inspect", "show what a checkpoint folder holds: architecture, remote code, structured layers, "
        "parameters and dtypes", "  m2-convert inspect ./bert-base-monarch", _inspect,
    )
    inspect.add_argument("path", type=Path, help="a checkpoint folder (config.json plus weights)")
    return parser


def _usage_hint(message: str, argv: list[str]) -> str:
    """Say why SOURCE and DESTINATION went missing when a list option came first and took them as its values."""
    swallowing = [option for option in ("--targets", "--nblocks") if option in argv]
    if "the following arguments are required" in message and swallowing:
        return (f"{message}. {' and '.join(swallowing)} take every value up to the next option, so they took "
                "SOURCE and DESTINATION too: put them after SOURCE DESTINATION, or end their values with --")
    return message


def _fail(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        report = args.run(args)
    except UsageError as error:
        if debug:
            raise
        return _fail(_usage_hint(str(error), argv))
    except ConversionError as error:
        if debug:
            raise
        return _fail(str(error))
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as error:  # a failure this tool did not foresee: still one line, and the way to see more
        if debug:
            raise
        return _fail(f"unexpected {type(error).__name__}: {error}. Rerun with --debug for the traceback, and please "
                     "report it.")
    for warning in report.get("warnings", []):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if report.get("destination_problem"):
        print(f"{PROG}: warning: a real run would stop: {report['destination_problem']}", file=sys.stderr)
    if args.command != "inspect":
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
