"""`onnx-fwlr`: a thin command line over the API, one file per command.

Exit codes: 0 success, 1 validation failed, 2 bad input (one plain sentence on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys

from onnx_fwlr.cli.calibrate import Calibrate
from onnx_fwlr.cli.compress import Compress
from onnx_fwlr.cli.inspect_model import Inspect
from onnx_fwlr.cli.merge_stats import MergeStats
from onnx_fwlr.cli.options import check_before_work, in_flag_terms, user_texts
from onnx_fwlr.cli.profile_model import Profile
from onnx_fwlr.cli.refine import Refine
from onnx_fwlr.cli.sweep import Sweep
from onnx_fwlr.cli.validate import Validate
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.version import __version__

COMMANDS = [Inspect, Calibrate, MergeStats, Compress, Validate, Profile, Sweep, Refine]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-fwlr", description="Importance-weighted low-rank compression of ONNX models."
    )
    parser.add_argument("--version", action="version", version=f"onnx-fwlr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(handler=command.run, flags=getattr(command, "flags", {}), path_inputs=command.inputs,
                       path_outputs=command.outputs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; Ctrl-C at any moment (the library is imported lazily, inside the command) is one line."""
    try:
        return _run(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        print("onnx-fwlr: interrupted", file=sys.stderr)
        return 130


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", None) is False and not sys.stderr.isatty():
        args.quiet = True  # progress bars only on a terminal: in a log file their frames are noise
    args.verbatim = user_texts(argv)
    try:
        check_before_work(args)
        from onnx_fwlr.io.runtime import silence_onnxruntime

        silence_onnxruntime()
        return args.handler(args)
    except FwlrError as exc:
        message = in_flag_terms(str(exc), getattr(args, "flags", {}), args.verbatim)
        print(f"onnx-fwlr: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early: not an error of ours
        sys.stderr.close()
        return 0
