"""`onnx-fwlr sweep`."""

from __future__ import annotations

from onnx_fwlr.cli.options import (
    CALIB_IN,
    JSON_OUT,
    MODEL_IN,
    VAL_IN,
    distributed_arguments,
    executor,
    printer,
    write_json,
)
from onnx_fwlr.errors import FwlrError


class Sweep:
    name = "sweep"
    help = "evaluate many budgets and methods from one calibration: table, JSON and PNG plots"
    inputs, outputs = MODEL_IN | CALIB_IN | VAL_IN, {"output": ("-o", "folder")} | JSON_OUT

    @staticmethod
    def add_arguments(p):
        p.add_argument("model", help="ONNX model file")
        p.add_argument("--calib", metavar="DATA", help="calibration data (needed by every method but svd)")
        p.add_argument("--val", metavar="DATA", required=True, help="validation data the budgets are judged on")
        p.add_argument("--ratios", help="comma-separated parameter ratios of the low-rank configurations (default "
                                        "0.9,0.7,0.5,0.3; none with --quantize unless --ratios or --methods is given)")
        p.add_argument("--methods", help="comma-separated methods (default: svd,whiten,kfac with --calib, else svd)")
        p.add_argument("--allocations",
                       help="comma-separated: uniform, global (default: global for fwsvd/kfac, uniform for the "
                            "others); "
                            "pairs that cannot run (global without gradients) are listed")
        p.add_argument("--quantize", metavar="MODES",
                       help="comma-separated int4, int8, auto: ONNX Runtime's quantizer plus a kfac low-rank "
                            "correction under each byte budget of --sizes (needs --calib); adds --baselines")
        p.add_argument("--sizes", metavar="LIST",
                       help="byte budgets of --quantize: sizes (20MB) or multiples of ONNX Runtime's int8 model "
                            "(0.8x); default 0.7x,0.8x,0.9x,1x")
        p.add_argument("--block-size", type=int, default=32,
                       help="block of K per int4 scale for --quantize (default 32)")
        p.add_argument("--baselines", action="store_true",
                       help="add ONNX Runtime's int8 per-channel and int4 block 32/128 models of the original "
                            "(on with --quantize or --latency)")
        p.add_argument("--fisher-output", metavar="NAME", help="output the Fisher loss is defined on (default: first "
                                                                "float one)")
        p.add_argument("--output-name", metavar="NAME",
                       help="output the table's cosines are measured on (default: --fisher-output, else the first)")
        p.add_argument("--loss", choices=["ce", "mc", "gaussian", "lm"], help="Fisher loss (default: by the output)")
        p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for sweep.json and the plots")
        p.add_argument("--batch-size", type=int, default=32, help="samples per run (default 32)")
        p.add_argument("--mask-input", metavar="NAME", help="input whose zeros mark padding")
        p.add_argument("--latency", action="store_true",
                       help="also measure each model's latency against the original's (median of alternating pairs "
                            "on the first --val batch) and mark the latency frontier; adds --baselines")
        p.add_argument("--save-models", action="store_true", help="keep every compressed model in DIR")
        p.add_argument("--workers", type=int, default=1, help="processes for the per-site decompositions (default 1)")
        p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
        distributed_arguments(p)
        p.add_argument("--force", action="store_true", help="write into a folder that already holds files")
        p.add_argument("--json", metavar="FILE", help="also write the results as JSON here ('-' for stdout)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.workflows.sweep import sweep, write_outputs

        split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
        default = None if args.quantize and not args.methods else "0.9,0.7,0.5,0.3"
        try:
            ratios = [float(r) for r in split(args.ratios or default or "")]
        except ValueError:
            raise FwlrError(f"--ratios '{args.ratios}' is not a comma-separated list of numbers.") from None
        sizes, fractions = _budgets(split(args.sizes) if args.sizes else [])
        result = sweep(args.model, args.calib, args.val, ratios=ratios,
                       methods=split(args.methods) if args.methods else None,
                       allocations=split(args.allocations) if args.allocations else None, out_dir=args.output,
                       batch_size=args.batch_size, mask_input=args.mask_input, latency=args.latency,
                       save_models=args.save_models, workers=args.workers, progress=not args.quiet, force=args.force,
                       quantize=split(args.quantize) if args.quantize else None, sizes=sizes, int8_fractions=fractions,
                       baselines=True if args.baselines else None, block_size=args.block_size,
                       fisher_options={"output": args.fisher_output, "loss": args.loss}, judge=args.output_name,
                       executor=executor(args))
        out = printer(args)
        out(result.format())
        try:
            written = write_outputs(result, args.output, plots=not args.no_plots)
        except FwlrError as exc:  # no matplotlib: the table and JSON still count
            written = write_outputs(result, args.output, plots=False)
            out(f"note: {exc}")
        out("wrote " + ", ".join(written))
        if args.json:
            write_json(result.to_dict(), args.json)
        return 0


def _budgets(items: list[str]) -> tuple[list[int] | None, list[float] | None]:
    """--sizes entries: byte sizes (20MB), and multiples of ONNX Runtime's int8 model (0.8x)."""
    from onnx_fwlr.cli.options import parse_size

    sizes, fractions = [], []
    for item in items:
        if item.lower().endswith("x"):
            try:
                fractions.append(float(item[:-1]))
            except ValueError:
                raise FwlrError(f"--sizes entry '{item}' is not a multiple such as 0.8x.") from None
        else:
            sizes.append(parse_size(item, "--sizes entry"))
    return sizes or None, fractions or None
