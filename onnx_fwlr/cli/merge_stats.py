"""`onnx-fwlr merge-stats`."""

from __future__ import annotations


class MergeStats:
    name = "merge-stats"
    help = "add statistics computed on different data (shards) into one file"
    inputs, outputs = {"inputs": ("the statistics file", "file")}, {"output": ("-o", "file")}

    @staticmethod
    def add_arguments(p):
        p.add_argument("inputs", nargs="+", help="statistics files from `onnx-fwlr calibrate`")
        p.add_argument("-o", "--output", required=True, help="merged statistics file")
        p.add_argument("--force", action="store_true", help="overwrite an existing output")

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.io.model import check_output_path
        from onnx_fwlr.stats.store import Statistics

        output = check_output_path(args.output, args.inputs, args.force)
        merged = Statistics.load(args.inputs[0])
        for path in args.inputs[1:]:
            merged.merge(Statistics.load(path))
        merged.save(output)
        print(f"merged {len(args.inputs)} file(s), {merged.meta.get('samples', 0)} samples; wrote {output}")
        return 0
