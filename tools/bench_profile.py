"""Latency of compressed models against the FLOPs they save: `onnx-fwlr profile ORIGINAL --compare COMPRESSED`.

Cases:
  digits       sample_models/digits_mlp.onnx, kfac + global allocation at ratio 0.3 (calibrated on
               sample_models/digits_calib.npz, labels included), timed on a batch of digits_test.npz;
  transformer  the BERT-style model of tools/synthetic_transformer.py, whiten at ratios 0.7 / 0.5 / 0.3
               (one calibration on a few make_token_batch batches), timed on one padded token batch.

Each model is measured by onnx_fwlr.profile.profile_model (a fresh child process: warm-up, then p50 over the
runs, MatMul FLOPs from the shapes seen, per-op-type kernel time from ONNX Runtime's profiler). Printed per
compressed model: p50 latency, the latency ratio next to the MatMul FLOP ratio and their quotient (the project's
target: latency ratio within 1.1x of the FLOP ratio), and the MatMul/Gemm rows of the per-op-type table.

    python tools/bench_profile.py [--cases digits transformer] [--runs 50] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from synthetic_transformer import build_transformer, make_token_batch

from onnx_fwlr import api
from onnx_fwlr.cost.profiling import compare_profiles, profile_model
from onnx_fwlr.io.data import open_data
from onnx_fwlr.io.model import load_model, save_model
from onnx_fwlr.tables import format_table

SAMPLES = ROOT / "sample_models"
MATRIX_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")
TARGET_QUOTIENT = 1.1
VOCAB = 1000


def digits_case(folder: Path, args) -> tuple[Path, dict, list[tuple[str, Path]]]:
    """(original path, feed, [(label, compressed path)]) for the digits MLP."""
    original = SAMPLES / "digits_mlp.onnx"
    compressed, _ = api.compress(str(original), method="kfac", allocation="global", ratio=0.3,
                                 calibration=str(SAMPLES / "digits_calib.npz"), progress=False)
    path = save_model(compressed, folder / "digits_kfac_global_0.3.onnx")
    feed, _ = next(iter(open_data(str(SAMPLES / "digits_test.npz"), load_model(str(original)),
                                  batch_size=args.digits_batch)))
    return original, feed, [("kfac global 0.3", path)]


def transformer_case(folder: Path, args) -> tuple[Path, dict, list[tuple[str, Path]]]:
    """(original path, feed, [(label, compressed path)]) for the synthetic transformer at three ratios."""
    h = args.hidden
    model = build_transformer(hidden=h, layers=args.layers, heads=max(1, h // 64), ffn=4 * h, vocab=VOCAB,
                              max_len=args.seq, seed=0)
    original = save_model(model, folder / "transformer.onnx")
    calibration = [make_token_batch(8, args.seq, VOCAB, seed=100 + i) for i in range(args.calib_batches)]
    stats = api.calibrate(model, calibration, progress=False)
    compressed = []
    for ratio in (0.7, 0.5, 0.3):
        small, _ = api.compress(model, method="whiten", ratio=ratio, stats=stats, progress=False)
        compressed.append((f"whiten {ratio}", save_model(small, folder / f"transformer_whiten_{ratio}.onnx")))
    feed = make_token_batch(args.tf_batch, args.seq, VOCAB, seed=1)
    return original, feed, compressed


def matrix_op_rows(label: str, comparison: dict) -> list[list[str]]:
    rows = []
    for op, times in comparison.get("op_types", {}).items():
        if op in MATRIX_OPS:
            ratio = "" if times["ratio"] is None else f"{times['ratio']:.3f}"
            rows.append([label, op, f"{times['a']:.3f}", f"{times['b']:.3f}", ratio,
                         f"{100 * times['a_share']:.0f}%", f"{100 * times['b_share']:.0f}%"])
    return rows


def matrix_time_ratio(comparison: dict) -> float:
    """Compressed / original kernel time of the MatMul/Gemm op types: does the matrix work shrink with its FLOPs?"""
    ops = [times for op, times in comparison["op_types"].items() if op in MATRIX_OPS]
    return sum(t["b"] for t in ops) / sum(t["a"] for t in ops)


def run_case(name: str, build, args) -> dict:
    options = dict(runs=args.runs, warmup=args.warmup, threads=args.threads)
    with tempfile.TemporaryDirectory(prefix=f"bench_profile_{name}_") as tmp:
        original, feed, compressed = build(Path(tmp), args)
        base = profile_model(original, feed, **options)
        rows, results = [], []
        for label, path in compressed:
            other = profile_model(path, feed, **options)
            comparison = compare_profiles(base, other)
            latency = comparison["latency_50_percentile"]["ratio"]
            flops = comparison["matmul_flops"]["ratio"]
            params = comparison["parameters"]["ratio"]
            kernels = matrix_time_ratio(comparison)
            results.append({"label": label, "profile": other, "comparison": comparison, "latency_ratio_p50": latency,
                            "flop_ratio": flops, "parameter_ratio": params, "quotient": latency / flops,
                            "matmul_time_ratio": kernels})
            rows.append([label, f"{other['latency_50_percentile']:.3f}", f"{params:.3f}", f"{flops:.3f}",
                         f"{latency:.3f}", f"{latency / flops:.2f}", f"{kernels:.3f}"])
    shape = ", ".join(f"{k} {list(v.shape)}" for k, v in feed.items())
    print(f"\n{name}: original p50 {base['latency_50_percentile']:.3f} ms ({shape}; {args.runs} runs after "
          f"{args.warmup} warm-up, threads {args.threads or 'ORT default'})")
    print(format_table(["compressed", "p50 ms", "param ratio", "FLOP ratio", "latency ratio", "latency/FLOP",
                        "MatMul time ratio"], rows, align="lrrrrrr"))
    op_rows = [row for result in results for row in matrix_op_rows(result["label"], result["comparison"])]
    print(
        f"MatMul/Gemm kernel time per run, original vs compressed ({base['op_profile']['profiled_runs']} profiled runs)"
    )
    print(
        format_table(
            ["compressed", "op type", "orig ms", "comp ms", "ratio", "orig share", "comp share"],
            op_rows,
            align="llrrrrr",
        )
    )
    return {"original": base, "compressed": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["digits", "transformer"], choices=["digits", "transformer"])
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ORT's choice)")
    parser.add_argument("--digits-batch", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--tf-batch", type=int, default=8)
    parser.add_argument("--calib-batches", type=int, default=4, help="transformer calibration batches of 8")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    builders = {"digits": digits_case, "transformer": transformer_case}
    results = {name: run_case(name, builders[name], args) for name in args.cases}
    print(
        f"\n(latency/FLOP = p50 latency ratio / MatMul FLOP ratio, target <= {TARGET_QUOTIENT}; MatMul time ratio ="
        f" MatMul/Gemm kernel time compressed / original, from ONNX Runtime's profiler;\n"
        f"load average {os.getloadavg()[0]:.1f})"
    )
    if args.json:
        results["load_average_1min"] = os.getloadavg()[0]
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
