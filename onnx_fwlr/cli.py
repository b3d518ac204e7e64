"""`onnx-fwlr`: a thin command line over the API.

Exit codes: 0 success, 1 validation failed, 2 bad input (one plain sentence on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import FwlrError


def _write_json(data: dict, target: str) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=_json_default)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(target).write_text(text + "\n")


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _out(args) -> "callable":
    """Where tables go: stdout, or stderr when stdout carries JSON."""
    stream = sys.stderr if getattr(args, "json", None) == "-" else sys.stdout
    return lambda text="": print(text, file=stream)


class Inspect:
    name = "inspect"
    help = "list every factorisable MatMul/Gemm weight and every skipped one with its reason"

    @staticmethod
    def add_arguments(p):
        p.add_argument("model", help="ONNX model file")
        p.add_argument("--include", help="regex: only sites whose node or weight name matches")
        p.add_argument("--exclude", help="regex: skip sites whose node or weight name matches")
        p.add_argument("--json", metavar="FILE", help="also write the listing as JSON ('-' for stdout)")

    @staticmethod
    def run(args) -> int:
        from .inspect import inspect_model

        listing = inspect_model(args.model, args.include, args.exclude)
        _out(args)(listing.format())
        if args.json:
            _write_json(listing.to_dict(), args.json)
        return 0


class Compress:
    name = "compress"
    help = "factorise the model's constant MatMul/Gemm weights and write the compressed model"

    @staticmethod
    def add_arguments(p):
        from .api import ALLOCATIONS, METHODS

        p.add_argument("model", help="ONNX model file")
        p.add_argument("-o", "--output", required=True, help="path of the compressed model")
        p.add_argument("--ratio", type=float, help="parameters kept in the factorised weights (0 < R <= 1)")
        p.add_argument("--rank", type=int, help="one fixed rank for every site")
        p.add_argument("--method", default="svd", choices=list(METHODS), help="weighting (default: svd)")
        p.add_argument("--allocation", default="uniform", choices=list(ALLOCATIONS), help="rank allocation")
        p.add_argument("--include", help="regex: only sites whose node or weight name matches")
        p.add_argument("--exclude", help="regex: skip sites whose node or weight name matches")
        p.add_argument("--force", action="store_true", help="overwrite an existing output")
        p.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data beside the model")
        p.add_argument("--write-unchanged", action="store_true",
                       help="write the output even when no site can be factorised")
        p.add_argument("--json", metavar="FILE", help="write the report as JSON ('-' for stdout)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    @staticmethod
    def run(args) -> int:
        from .api import compress
        from .modelio import check_output_path, file_size, save_model

        output = check_output_path(args.output, [args.model], args.force)
        model, report = compress(
            args.model, ratio=args.ratio, rank=args.rank, method=args.method, allocation=args.allocation,
            include=args.include, exclude=args.exclude, progress=not args.quiet,
        )
        out = _out(args)
        report.file_size_before = file_size(args.model)
        if report.sites or args.write_unchanged:
            save_model(model, output, external_data=True if args.external_data else None)
            report.file_size_after = file_size(output)
        out(report.format())
        if report.sites or args.write_unchanged:
            out(f"wrote {output}")
        if args.json:
            _write_json(report.to_dict(), args.json)
        return 0


COMMANDS = [Inspect, Compress]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-fwlr", description="Importance-weighted low-rank compression of ONNX models."
    )
    parser.add_argument("--version", action="version", version=f"onnx-fwlr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(handler=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except FwlrError as exc:
        print(f"onnx-fwlr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnx-fwlr: interrupted", file=sys.stderr)
        return 130
