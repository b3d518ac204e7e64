"""`onnx-fwlr validate`."""

from __future__ import annotations

from onnx_fwlr.cli.options import (
    JSON_OUT,
    comparison_arguments,
    language_arguments,
    parse_batch_axes,
    parse_outputs,
    printer,
    report_language,
    report_validation,
    resolve_metric,
    tolerance_arguments,
    write_json,
)


class Validate:
    name = "validate"
    help = "compare a compressed model with its original on the same data; exit 1 when a tolerance fails"
    inputs = {"original": ("the original model", "model"), "compressed": ("the compressed model", "model"),
              "data": ("the --data", "data")}
    outputs = JSON_OUT

    @staticmethod
    def add_arguments(p):
        p.add_argument("original", help="the original ONNX model")
        p.add_argument("compressed", help="the compressed ONNX model")
        p.add_argument("--data", required=True, help=".npz (keys = input names, optional 'labels') or a folder")
        p.add_argument("--batch-size", type=int, default=32, help="samples per run (default 32)")
        tolerance_arguments(p)
        comparison_arguments(p)
        language_arguments(p)
        p.add_argument("--json", metavar="FILE", help="write the metrics as JSON ('-' for stdout)")
        p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.pipeline.compress import validate

        if resolve_metric(args, args.original) == "perplexity":
            from onnx_fwlr.evaluate.language import validate_language

            metrics = validate_language(args.original, args.compressed, args.data, batch_size=args.batch_size,
                                        logits=args.logits, progress=not args.quiet)
            code = report_language(metrics, args, printer(args))
            if args.json:
                write_json(metrics.to_dict(), args.json)
            return code
        validation = validate(args.original, args.compressed, args.data, batch_size=args.batch_size,
                              progress=not args.quiet, outputs=parse_outputs(args.outputs),
                              common_prefix=args.common_prefix, batch_axes=parse_batch_axes(args.batch_axis))
        code = report_validation(validation, args, printer(args))
        if args.json:
            write_json(validation.to_dict(), args.json)
        return code
