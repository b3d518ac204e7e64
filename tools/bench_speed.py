"""Achievable vs measured latency ratio of compressed transformers, before and after rank rounding.

For each model (the synthetic BERT-style encoder of tools/synthetic_transformer.py, and MiniLM when
.cache/minilm/minilm.onnx exists), kfac + global allocation at each --ratios value, then for each batch
(--batches, x --seq tokens) and thread count (--threads): the model as allocated, and the model with its ranks
rounded by the measured latency model (compress --rank-multiple auto: tables timed here and cached in
--cache). Each pair is measured by `profile ORIGINAL --compare COMPRESSED` (onnx_fwlr.evaluate.limits.
compare_speed): the achievable ratio from ONNX Runtime's profiler, the measured ratio as the median of
alternating pairs with its p10-p90, and their quotient. The load average (`uptime`) is printed before and after.

    python tools/bench_speed.py [--layers 2] [--ratios 0.7,0.5] [--batches 1,32] [--threads 1,2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import numpy as np  # noqa: E402
from synthetic_transformer import build_transformer, make_token_batch  # noqa: E402

from onnx_fwlr.evaluate.latency import MeasuredLatency  # noqa: E402
from onnx_fwlr.evaluate.limits import compare_speed  # noqa: E402
from onnx_fwlr.io.model import save_model  # noqa: E402
from onnx_fwlr.methods.registry import get_method  # noqa: E402
from onnx_fwlr.pipeline.budget import Budget, choose_ranks  # noqa: E402
from onnx_fwlr.pipeline.build import build  # noqa: E402
from onnx_fwlr.pipeline.prepare import prepare  # noqa: E402
from onnx_fwlr.pipeline.speed import round_for_speed  # noqa: E402
from onnx_fwlr.tables import format_table

MINILM = ROOT / ".cache" / "minilm"
OUTPUT = "sentence_embedding"
VOCAB = 1000


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=384, help="synthetic model width (MiniLM: 384)")
    p.add_argument("--layers", type=int, default=2, help="synthetic model layers (MiniLM: 6)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence in the timed batches")
    p.add_argument("--ratios", default="0.7,0.5")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model and alternating pairs")
    p.add_argument("--calib", type=int, default=64, help="calibration sequences")
    p.add_argument("--cache", default=str(ROOT / ".cache" / "latency"), help="latency table folder")
    p.add_argument("--models", default="synthetic,minilm", help="which of synthetic,minilm (MiniLM when exported)")
    p.add_argument("--json", metavar="FILE", help="write every number as JSON")
    return p.parse_args()


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def models(args, folder: Path):
    """[(name, path, calibration .npz)] for the synthetic transformer and MiniLM when present."""
    h = args.hidden
    synthetic = build_transformer(hidden=h, layers=args.layers, heads=max(1, h // 64), ffn=4 * h, vocab=VOCAB,
                                  max_len=args.seq, seed=0)
    path = save_model(synthetic, folder / "synthetic.onnx")
    calib = folder / "synthetic_calib.npz"
    np.savez(calib, **make_token_batch(args.calib, args.seq, VOCAB, seed=1))
    chosen = args.models.split(",")
    found = [(f"synthetic h{h} L{args.layers}", path, calib)] if "synthetic" in chosen else []
    if "minilm" in chosen and (MINILM / "minilm.onnx").is_file():
        data = {k: v[: args.calib] for k, v in np.load(MINILM / "calib.npz").items()}
        np.savez(folder / "minilm_calib.npz", **data)
        found.append(("MiniLM-L6", MINILM / "minilm.onnx", folder / "minilm_calib.npz"))
    return found


def timing_feed(batch: int, seq: int) -> dict:
    """A full-length token batch (timing does not depend on the ids)."""
    ids = np.random.default_rng(batch).integers(1, VOCAB, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def measure(args, name, original, prepared, folder: Path) -> list[dict]:
    rows = []
    bias = get_method("kfac").bias_correction
    for ratio in [float(r) for r in args.ratios.split(",")]:
        budget = Budget(ratio=ratio)
        ranks = choose_ranks(prepared, budget, "global")
        plain_path = save_model(build(prepared, ranks, "global", budget, bias)[0], folder / f"{name}_{ratio}.onnx")
        for batch in [int(b) for b in args.batches.split(",")]:
            feed = timing_feed(batch, args.seq)
            for threads in [int(t) for t in args.threads.split(",")]:
                latency = MeasuredLatency(threads=threads, cache_dir=args.cache)
                start = time.perf_counter()
                rounded, info = round_for_speed(prepared, ranks, "auto", latency, feed)
                table_seconds = time.perf_counter() - start
                rounded_path = save_model(build(prepared, rounded, "global", budget, bias)[0],
                                          folder / f"{name}_{ratio}_b{batch}_t{threads}.onnx")
                for rounding, path in (("none", plain_path), ("auto", rounded_path)):
                    speed = compare_speed(original, path, feed, runs=args.runs, warmup=3, threads=threads)
                    limits, paired = speed["limits"], speed["paired"]
                    rows.append({
                        "model": name, "ratio": ratio, "batch": batch, "threads": threads, "rounding": rounding,
                        "rank_multiple": info["rank_multiple"] if rounding == "auto" else None,
                        "moved": len(info["rounded"]) if rounding == "auto" else 0,
                        "kept_dense": info.get("kept_dense", []) if rounding == "auto" else [],
                        "table_seconds": table_seconds if rounding == "auto" else None,
                        "achievable": limits["achievable_ratio"], "measured_p50": paired["ratio_p50"],
                        "measured_p10": paired["ratio_p10"], "measured_p90": paired["ratio_p90"],
                        "kernel_ratio": limits["kernel_ratio"], "sites_time_ratio": limits["sites_time_ratio"],
                        "sites_flop_ratio": limits["sites_flop_ratio"], "site_share": limits["site_share"],
                        "original_p50_ms": paired["original_p50_ms"], "compressed_p50_ms": paired["compressed_p50_ms"],
                    })
                    row = rows[-1]
                    print(f"  {name} ratio {ratio} batch {batch} threads {threads} rounding {rounding}: achievable "
                          f"{row['achievable']:.3f}, measured {row['measured_p50']:.3f} "
                          f"({row['measured_p10']:.3f}-{row['measured_p90']:.3f})", flush=True)
    return rows


def table(rows) -> str:
    body = [[r["model"], f"{r['ratio']:g}", str(r["batch"]), str(r["threads"]),
             r["rounding"] + (f" (x{r['rank_multiple']}, {r['moved']} moved)" if r["rounding"] == "auto" else ""),
             f"{100 * r['site_share']:.0f}%", f"{r['achievable']:.3f}", f"{r['measured_p50']:.3f}",
             f"{r['measured_p10']:.3f}-{r['measured_p90']:.3f}", f"{r['measured_p50'] / r['achievable']:.2f}",
             f"{r['sites_time_ratio']:.3f}/{r['sites_flop_ratio']:.3f}"] for r in rows]
    headers = ["model", "ratio", "batch", "threads", "rounding", "site share", "achievable", "measured p50",
               "p10-p90", "meas/ach", "sites time/FLOP"]
    return format_table(headers, body, align="lrrrlrrrrrr")


def main():
    args = parse_args()
    load_before = load_average()
    print(f"load average before: {load_before}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        folder = Path(tmp)
        for name, path, calib in models(args, folder):
            start = time.perf_counter()
            prepared = prepare(str(path), method="kfac", calibration=str(calib), batch_size=16,
                               fisher_options={"output": OUTPUT, "loss": "gaussian"}, progress=False)
            print(f"{name}: statistics and sites in {time.perf_counter() - start:.1f} s", flush=True)
            rows += measure(args, name.split()[0], str(path), prepared, folder)
    load_after = load_average()
    print()
    print(table(rows))
    print(f"\nload average before {load_before}, after {load_after}")
    if args.json:
        Path(args.json).write_text(json.dumps({"load_before": load_before, "load_after": load_after,
                                               "args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
