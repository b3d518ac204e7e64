"""`onnx-fwlr profile`."""

from __future__ import annotations

from onnx_fwlr.cli.options import JSON_OUT, MODEL_IN, printer, shapes, write_json


class Profile:
    name = "profile"
    help = ("ONNX Runtime latency, memory, size, FLOPs and per-op time; --compare for a side-by-side table with "
            "the achievable and the measured latency ratio")
    inputs = MODEL_IN | {"compare": ("the --compare model", "model"), "data": ("the --data", "data")}
    outputs = {"save_test_data": ("--save-test-data", "folder")} | JSON_OUT

    @staticmethod
    def add_arguments(p):
        p.add_argument("model", help="ONNX model file")
        p.add_argument("--compare", metavar="OTHER", help="a second model (e.g. the compressed one) to compare")
        p.add_argument("--data", help=".npz whose first batch is the input (else --shape and synthetic inputs)")
        p.add_argument("--shape", action="append", default=[], metavar="NAME:D0,D1",
                       help="input sizes for synthetic inputs; repeatable")
        p.add_argument("--batch-size", type=int, default=32, help="batch taken from --data (default 32)")
        p.add_argument("--runs", type=int, default=100, help="timed runs (default 100)")
        p.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs (default 10)")
        p.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's choice)")
        p.add_argument("--providers", default="CPUExecutionProvider",
                       help="comma-separated execution providers (e.g. CUDAExecutionProvider,CPUExecutionProvider)")
        p.add_argument("--save-test-data", metavar="DIR",
                       help="write ONNX Runtime's test_data_set_0 layout (inputs and the original's outputs)")
        p.add_argument("--json", metavar="FILE", help="write the numbers as JSON ('-' for stdout)")
        p.add_argument("--force", action="store_true", help="overwrite an existing --json file")

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.cost.limits import compare_speed, format_speed
        from onnx_fwlr.cost.profiling import (
            format_comparison,
            format_profile,
            profile_model,
            save_test_data,
            symbolic_defaults,
            synthetic_feed,
        )
        from onnx_fwlr.io.data import open_data
        from onnx_fwlr.io.model import load_model

        structure = load_model(args.model)
        out = printer(args)
        if args.data:
            feed, _ = next(iter(open_data(args.data, structure, batch_size=args.batch_size)))
        else:
            _, defaulted = symbolic_defaults(structure, shapes(args))
            if defaulted:
                out(f"symbolic axes set to 1: {', '.join(defaulted)} (choose sizes with --shape NAME:D0,D1,...)")
            feed = synthetic_feed(structure, shapes(args))
        providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
        options = {"runs": args.runs, "warmup": args.warmup, "threads": args.threads, "providers": providers}
        if args.compare:
            speed = compare_speed(args.model, args.compare, feed, **options)
            first = speed["original"]
            data = {"model": first, "compare": speed["compressed"], "ratios": speed["ratios"],
                    "limits": speed["limits"], "paired": speed["paired"]}
            out(format_comparison(first, speed["compressed"], paired=speed["paired"]))
            out()
            out(format_speed(speed["limits"], speed["paired"]))
        else:
            first = profile_model(args.model, feed, **options)
            data = {"model": first}
            out(format_profile(first))
        if args.save_test_data:
            folder = save_test_data(args.model, feed, args.save_test_data)
            out(f"wrote ONNX Runtime test data to {folder}")
        if args.json:
            write_json(data, args.json)
        return 0
