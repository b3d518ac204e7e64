"""The command line: `onnx-fwlr SUBCOMMAND ...` (see main.py)."""

from onnx_fwlr.cli.main import main

__all__ = ["main"]
