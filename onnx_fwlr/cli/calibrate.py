"""`onnx-fwlr calibrate`."""

from __future__ import annotations

from onnx_fwlr.cli.options import (
    CALIB_IN,
    MODEL_IN,
    calibration_arguments,
    distributed_arguments,
    executor,
    fisher_options,
    parse_shard,
    printer,
    shapes,
)
from onnx_fwlr.errors import FwlrError


class Calibrate:
    name = "calibrate"
    help = "measure activation (and with --fisher, gradient) statistics once, to reuse with compress --stats"
    inputs, outputs = MODEL_IN | CALIB_IN, {"output": ("-o", "file")}

    @staticmethod
    def add_arguments(p):
        p.add_argument("model", help="ONNX model file")
        p.add_argument("-o", "--output", required=True, help="statistics file (.npz)")
        calibration_arguments(p)
        p.add_argument("--fisher", action="store_true", help="also gradient statistics (for fwsvd, kfac, global)")
        p.add_argument("--shard", metavar="I/N", help="use only the I-th of N interleaved parts of the batches")
        p.add_argument("--include", help="regex: only sites whose node or weight name matches")
        p.add_argument("--exclude", help="regex: skip sites whose node or weight name matches")
        p.add_argument("--force", action="store_true", help="overwrite an existing output")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        distributed_arguments(p)

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.io.model import check_output_path
        from onnx_fwlr.pipeline.compress import calibrate

        output = check_output_path(args.output, [args.model], args.force)
        if args.calib is None:
            raise FwlrError("calibrate needs data; pass --calib DATA (.npz, a folder of .npz, or 'random').")
        stats = calibrate(args.model, args.calib, fisher=args.fisher, include=args.include, exclude=args.exclude,
                          batch_size=args.batch_size, mask_input=args.mask_input, shapes=shapes(args),
                          shard=parse_shard(args.shard), progress=not args.quiet, executor=executor(args),
                          **(fisher_options(args) if args.fisher else {}))
        stats.save(output)
        meta = stats.meta
        printer(args)(f"calibrated {len(stats.activations)} site input(s), {len(stats.gradients)} with gradients, on "
              f"{meta.get('samples', 0)} samples in {meta.get('batches', 0)} batches "
              f"({meta.get('seconds', 0):.1f} s); wrote {output}")
        return 0
