"""`onnx-fwlr inspect`."""

from __future__ import annotations

from onnx_fwlr.cli.options import JSON_OUT, MODEL_IN, printer, write_json


class Inspect:
    name = "inspect"
    help = "list every factorisable MatMul/Gemm weight and every skipped one with its reason"
    inputs, outputs = MODEL_IN, JSON_OUT

    @staticmethod
    def add_arguments(p):
        p.add_argument("model", help="ONNX model file")
        p.add_argument("--include", help="regex: only sites whose node or weight name matches")
        p.add_argument("--exclude", help="regex: skip sites whose node or weight name matches")
        p.add_argument("--json", metavar="FILE", help="also write the listing as JSON ('-' for stdout)")
        p.add_argument("--force", action="store_true", help="overwrite an existing --json file")

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.workflows.listing import inspect_model

        listing = inspect_model(args.model, args.include, args.exclude)
        printer(args)(listing.format())
        if args.json:
            write_json(listing.to_dict(), args.json)
        return 0
