"""Which quantized kernel is fast on this CPU: one site in every form, time relative to fp32, per row count.

    python tools/bench_quant_kernels.py                         # 384x1536 and 1536x384, rows 1/128/4096, 1 thread
    python tools/bench_quant_kernels.py --shapes 384x384 --rows 1,32,4096 --threads 2 --json out.json
    python tools/bench_quant_kernels.py --merged                # merged vs separate corrections (q/k/v, gate/up)

Forms (each one-site model is built by the code compress writes its output with, cost.latency.one_site_model):
fp32 MatMul; ONNX Runtime `quantize_dynamic` int8 per channel; MatMulNBits int4 at block 32 and 128 with
accuracy_level 0 (float compute, the quantizer's default) and 4 (int8 activations, per block of K). Every model
runs in one process, in rounds that rotate their order; a round's time of each is divided by fp32's in the same
round, and the table gives the median ratio over rounds (p10-p90 in --json): a burst of load moves all of a
round alike.

`--merged`: corrections of sites that read one tensor, as separate pairs (X A_i B_i) against one merged first
factor (X [A_1 | ... | A_n], Split, B_i): quant.graph.rewrite writes both, so the timed graphs are the written
ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from onnx_fwlr.cost.latency import FP32, INT8, correction_form, machine_name, one_site_model
from onnx_fwlr.tables import format_table

FORMS = {  # label -> (latency form, rank): rank None = the form's dense op (for a correction form, its main branch)
    "fp32": (FP32, None),
    "int8 dynamic": (INT8, None),
    "int4 b32 acc0": (correction_form("int4 b32"), None),
    "int4 b32 acc4": (correction_form("int4 b32 acc4"), None),
    "int4 b128 acc0": (correction_form("int4 b128"), None),
    "int4 b128 acc4": (correction_form("int4 b128 acc4"), None),
}


def paired_ratios(models: dict, K: int, rows: int, threads: int, rounds: int, min_seconds: float,
                  reference: str = "fp32") -> dict[str, dict]:
    """Per model: median, p10, p90 over rounds of its time / the reference's time in the same round."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sessions = {label: ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for label, m in models.items()}
    feed = {"x": np.random.default_rng(0).standard_normal((rows, K)).astype(np.float32)}
    for session in sessions.values():
        session.run(None, feed)
    # runs per round: about 20 ms of the reference
    start = time.perf_counter()
    sessions[reference].run(None, feed)
    once = time.perf_counter() - start
    runs = max(1, min(200, int(0.02 / max(once, 1e-6))))
    labels = list(sessions)
    ratios: dict[str, list[float]] = {label: [] for label in labels}
    reference_seconds = []
    started, index = time.perf_counter(), 0
    while index < rounds or time.perf_counter() - started < min_seconds:
        shift = index % len(labels)
        seconds = {}
        for label in labels[shift:] + labels[:shift]:
            tick = time.perf_counter()
            for _ in range(runs):
                sessions[label].run(None, feed)
            seconds[label] = (time.perf_counter() - tick) / runs
        for label in labels:
            ratios[label].append(seconds[label] / seconds[reference])
        reference_seconds.append(seconds[reference])
        index += 1
    ms = 1000.0 * float(np.median(reference_seconds))
    return {label: {"ratio": float(np.median(v)), "p10": float(np.percentile(v, 10)),
                    "p90": float(np.percentile(v, 90)), "reference_ms": ms} for label, v in ratios.items()}


def kernel_table(shapes, rows_list, threads, rounds, min_seconds) -> list[dict]:
    results = []
    for K, N in shapes:
        models = {label: one_site_model(K, N, rank, form) for label, (form, rank) in FORMS.items()}
        for rows in rows_list:
            measured = paired_ratios(models, K, rows, threads, rounds, min_seconds)
            results.append({"K": K, "N": N, "rows": rows, "threads": threads, "forms": measured})
            line = ", ".join(f"{label} {m['ratio']:.2f}" for label, m in measured.items() if label != "fp32")
            print(f"  {K}x{N} rows {rows}: fp32 {measured['fp32']['reference_ms']:.3f} ms; {line}", file=sys.stderr)
    return results


def merged_models(K: int, N: int, sites: int, rank: int, scheme: str | None):
    """Separate and merged corrections of `sites` sites [K, N] reading one input (quant.graph.rewrite)."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_fwlr.quant.graph import SitePlan, rewrite
    from onnx_fwlr.quant.ortquant import scheme_from_label

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"], name=f"site{i}") for i in range(sites)]
    weights = [numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), f"W{i}") for i in range(sites)]
    graph = helper.make_graph(nodes, "sites", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", K])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["rows", N])
                               for i in range(sites)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    main = None if scheme is None else scheme_from_label(scheme)
    plans = {f"W{i}": SitePlan(main, rng.standard_normal((K, rank)) / np.sqrt(K),
                               rng.standard_normal((rank, N)) / np.sqrt(rank)) for i in range(sites)}
    return {"separate": rewrite(model, plans, {}, "float16", merge=False),
            "merged": rewrite(model, plans, {}, "float16", merge=True)}


def merged_table(configs, ranks, rows_list, threads, rounds, min_seconds) -> list[dict]:
    results = []
    for name, K, N, sites in configs:
        for scheme in ("int4 b32 acc4", "int8 dynamic"):
            for rank in ranks:
                models = merged_models(K, N, sites, rank, scheme)
                for rows in rows_list:
                    measured = paired_ratios(models, K, rows, threads, rounds, min_seconds, reference="separate")
                    results.append({"config": name, "K": K, "N": N, "sites": sites, "scheme": scheme, "rank": rank,
                                    "rows": rows, "threads": threads, "merged": measured["merged"]})
                    print(f"  {name} {scheme} rank {rank} rows {rows}: merged/separate "
                          f"{measured['merged']['ratio']:.3f}", file=sys.stderr)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="384x1536,1536x384", help="KxN site shapes, comma-separated")
    p.add_argument("--rows", default="1,128,4096", help="rows per run (tokens), comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--min-seconds", type=float, default=1.0, help="per table cell, at least")
    p.add_argument("--merged", action="store_true", help="merged against separate corrections instead")
    p.add_argument("--ranks", default="16,32,64", help="--merged: correction ranks")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    started = time.perf_counter()
    load = os.getloadavg()
    header = (f"{machine_name()}; onnxruntime {__import__('onnxruntime').__version__}; {args.threads} thread(s); "
              f"load {load[0]:.2f} at start")
    if args.merged:
        configs = [("q/k/v 384x384", 384, 384, 3), ("gate/up 384x1536", 384, 1536, 2)]
        results = merged_table(configs, [int(r) for r in args.ranks.split(",")], rows_list, args.threads,
                               args.rounds, args.min_seconds)
        lines = [[r["config"], r["scheme"], str(r["rank"]), str(r["rows"]),
                  f"{r['merged']['ratio']:.3f} ({r['merged']['p10']:.2f}-{r['merged']['p90']:.2f})"]
                 for r in results]
        table = format_table(["sites", "main branch", "rank", "rows", "merged / separate (p10-p90)"], lines,
                             align="lllrr")
    else:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        results = kernel_table(shapes, rows_list, args.threads, args.rounds, args.min_seconds)
        labels = [label for label in FORMS if label != "fp32"]
        lines = [[f"{r['K']}x{r['N']}", str(r["rows"]), f"{r['forms']['fp32']['reference_ms']:.3f}"]
                 + [f"{r['forms'][label]['ratio']:.2f}" for label in labels] for r in results]
        table = format_table(["site", "rows", "fp32 ms"] + labels, lines, align="lrr" + "r" * len(labels))
    load_end = os.getloadavg()
    print(header)
    print(table)
    print(f"({time.perf_counter() - started:.0f} s; load {load_end[0]:.2f} at the end; {platform.python_version()})")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_name(), "threads": args.threads,
                                               "load": [load[0], load_end[0]], "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
