"""Latency against fidelity of compressed transformers, beside ONNX Runtime's own quantizations.

For each model (the synthetic BERT-style encoder of tools/synthetic_transformer.py, and all-MiniLM-L6-v2 when
.cache/minilm/minilm.onnx exists) and each timed batch (--batches, x --seq tokens) and thread count (--threads):

  - ORT int8 `quantize_dynamic` per channel and int4 `MatMulNBits` block 32 of the original (measured only);
  - kfac + global allocation at each --ratios value, with ranks in steps of 1 (any rank, --rank-multiple 1) and
    of 16 (the default), and rounded by the measured latency model ("auto" = compress --rank-multiple auto);
  - kfac under a latency budget at each --targets value (compress --target-latency F).

Every low-rank row is measured by `profile ORIGINAL --compare COMPRESSED` (onnx_fwlr.cost.limits.
compare_speed): the achievable ratio from ONNX Runtime's profiler, the measured ratio as the median of
alternating pairs with its p10-p90, and their quotient. Baselines are timed the same way (alternating pairs).
Fidelity: mean cosine of the judged output with the original's on held-out data (MiniLM: eval.npz, never
used for calibration; synthetic: fresh random sequences). A second table puts each --target-latency model
beside the --ratio models of equal measured latency (linear interpolation of their fidelity along their
measured latency). The load average (`uptime`) is printed before and after; on a shared machine the
measured ratios are only meaningful next to it.

    python tools/bench_speed.py [--models minilm] [--ratios 0.9,0.7,0.5] [--targets 0.8,0.6,0.5] \
        [--batches 32,1] [--threads 2] [--roundings 1,16,auto] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads next to ORT's slow both down

ROOT = Path(__file__).resolve().parent.parent

import numpy as np
import onnx
from synthetic_transformer import build_transformer, make_token_batch

from onnx_fwlr.api import Budget, build, choose_ranks, fidelity, latency_budget_ranks, prepare, round_for_speed
from onnx_fwlr.cost.latency import MeasuredLatency
from onnx_fwlr.cost.limits import compare_speed, paired_ratio
from onnx_fwlr.io.model import save_model
from onnx_fwlr.methods.registry import get_method
from onnx_fwlr.quant.ortquant import ort_baseline
from onnx_fwlr.tables import format_table

MINILM = ROOT / ".cache" / "minilm"
OUTPUT = "sentence_embedding"
VOCAB = 1000
BASELINES = {"ORT int8 dynamic": "ORT int8 dynamic per-channel", "ORT int4 b32": "ORT int4 b32 (MatMul only)"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=384, help="synthetic model width (MiniLM: 384)")
    p.add_argument("--layers", type=int, default=2, help="synthetic model layers (MiniLM: 6)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence in the timed batches")
    p.add_argument("--ratios", default="0.9,0.7,0.5")
    p.add_argument("--targets", default="0.8,0.6,0.5", help="--target-latency values ('' for none)")
    p.add_argument("--roundings", default="1,16,auto",
                   help="rank steps of the ratio rows (1: any rank; 16: the default) and auto (measured rounding)")
    p.add_argument("--batches", default="32,1")
    p.add_argument("--threads", default="2")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model and alternating pairs")
    p.add_argument("--calib", type=int, default=256, help="calibration sequences")
    p.add_argument("--eval", type=int, default=512, help="held-out sequences for fidelity")
    p.add_argument("--no-baselines", action="store_true", help="skip ONNX Runtime's int8/int4 rows")
    p.add_argument("--cache", default=str(ROOT / ".cache" / "latency"), help="latency table folder")
    p.add_argument("--models", default="synthetic,minilm", help="which of synthetic,minilm (MiniLM when exported)")
    p.add_argument("--json", metavar="FILE", help="write every number as JSON")
    return p.parse_args()


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def split(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def models(args, folder: Path):
    """[(name, path, calibration .npz, held-out .npz)] for the synthetic transformer and MiniLM when present."""
    h, chosen, found = args.hidden, args.models.split(","), []
    if "synthetic" in chosen:
        synthetic = build_transformer(hidden=h, layers=args.layers, heads=max(1, h // 64), ffn=4 * h, vocab=VOCAB,
                                      max_len=args.seq, seed=0)
        path = save_model(synthetic, folder / "synthetic.onnx")
        np.savez(folder / "synthetic_calib.npz", **make_token_batch(args.calib, args.seq, VOCAB, seed=1))
        np.savez(folder / "synthetic_eval.npz", **make_token_batch(args.eval, args.seq, VOCAB, seed=2))
        found.append((f"synthetic-h{h}-L{args.layers}", path, folder / "synthetic_calib.npz",
                      folder / "synthetic_eval.npz"))
    if "minilm" in chosen and (MINILM / "minilm.onnx").is_file():
        data = {k: v[: args.calib] for k, v in np.load(MINILM / "calib.npz").items()}
        np.savez(folder / "minilm_calib.npz", **data)
        held_out = {k: v[: args.eval] for k, v in np.load(MINILM / "eval.npz").items()}
        np.savez(folder / "minilm_eval.npz", **held_out)
        found.append(("MiniLM-L6", MINILM / "minilm.onnx", folder / "minilm_calib.npz", folder / "minilm_eval.npz"))
    return found


def timing_feed(batch: int, seq: int) -> dict:
    """A full-length token batch (timing does not depend on the ids)."""
    ids = np.random.default_rng(batch).integers(1, VOCAB, size=(batch, seq), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


class Bench:
    """One model: its prepared statistics, the models built so far (by label) and their fidelity."""

    def __init__(self, args, name, original, calib, held_out, folder: Path):
        self.args, self.name, self.original, self.held_out, self.folder = args, name, str(original), held_out, folder
        start = time.perf_counter()
        self.prepared = prepare(str(original), method="kfac", calibration=str(calib), batch_size=16,
                                fisher_options={"output": OUTPUT, "loss": "gaussian"}, progress=False)
        print(f"{name}: statistics and sites in {time.perf_counter() - start:.1f} s", flush=True)
        self.bias = get_method("kfac").bias_correction
        self.cosines: dict[str, float] = {}

    def save(self, label: str, ranks, budget) -> str:
        path = self.folder / f"{self.name}_{label.replace(' ', '_')}.onnx"
        if not path.is_file():
            save_model(build(self.prepared, ranks, "global", budget, self.bias)[0], path)
        return str(path)

    def baseline(self, label: str) -> str:
        path = self.folder / f"{self.name}_{label.replace(' ', '_')}.onnx"
        if not path.is_file():
            save_model(ort_baseline(onnx.load(self.original), BASELINES[label]), path)
        return str(path)

    def cosine(self, path: str) -> float:
        if path not in self.cosines:
            self.cosines[path] = fidelity(self.original, path, str(self.held_out), 32, judge=OUTPUT)["mean_cosine"]
        return self.cosines[path]


def low_rank_row(bench: Bench, kind: str, label: str, path: str, feed, threads: int, extra: dict) -> dict:
    speed = compare_speed(bench.original, path, feed, runs=bench.args.runs, warmup=3, threads=threads)
    limits, paired = speed["limits"], speed["paired"]
    return {"kind": kind, "config": label, "achievable": limits["achievable_ratio"],
            "measured_p50": paired["ratio_p50"], "measured_p10": paired["ratio_p10"],
            "measured_p90": paired["ratio_p90"], "site_share": limits["site_share"],
            "sites_time_ratio": limits["sites_time_ratio"], "sites_flop_ratio": limits["sites_flop_ratio"],
            "original_p50_ms": paired["original_p50_ms"], "compressed_p50_ms": paired["compressed_p50_ms"],
            "mean_cosine": bench.cosine(path), "mb": os.path.getsize(path) / 1e6, **extra}


def baseline_row(bench: Bench, label: str, feed, threads: int) -> dict:
    path = bench.baseline(label)
    paired = paired_ratio(bench.original, path, feed, runs=bench.args.runs, threads=threads)
    return {"kind": "baseline", "config": label, "achievable": None, "measured_p50": paired["ratio_p50"],
            "measured_p10": paired["ratio_p10"], "measured_p90": paired["ratio_p90"],
            "original_p50_ms": paired["original_p50_ms"], "compressed_p50_ms": paired["compressed_p50_ms"],
            "mean_cosine": bench.cosine(path), "mb": os.path.getsize(path) / 1e6}


# Long: one loop per kind of configuration, each a few lines, in the order the table shows them.
def measure(bench: Bench, batch: int, threads: int) -> list[dict]:
    args, prepared, rows = bench.args, bench.prepared, []
    feed = timing_feed(batch, args.seq)
    latency = MeasuredLatency(threads=threads, cache_dir=args.cache)
    where = {"model": bench.name, "batch": batch, "threads": threads}

    def report(row):
        rows.append({**where, **row})
        ach = "" if row["achievable"] is None else f"achievable {row['achievable']:.3f}, "
        print(f"  {bench.name} b{batch} t{threads} {row['config']}: {ach}measured {row['measured_p50']:.3f} "
              f"({row['measured_p10']:.3f}-{row['measured_p90']:.3f}), cos {row['mean_cosine']:.4f}", flush=True)

    if not args.no_baselines:
        for label in BASELINES:
            report(baseline_row(bench, label, feed, threads))
    for ratio in split(args.ratios, float):
        budget = Budget(ratio=ratio)
        for rounding in split(args.roundings):
            extra = {"ratio": ratio, "rounding": rounding}
            if rounding == "auto":  # compress --rank-multiple auto: the default steps, then measured rounding
                start = time.perf_counter()
                chosen, info = round_for_speed(prepared, choose_ranks(prepared, budget, "global"), "auto", latency,
                                               feed)
                extra.update(rank_multiple=info["rank_multiple"], moved=len(info["rounded"]),
                             kept_dense=info.get("kept_dense", []), table_seconds=time.perf_counter() - start)
                label = f"ratio {ratio:g} auto (x{info['rank_multiple']}) b{batch}t{threads}"
            else:  # compress --rank-multiple N: ranks allocated in steps of N (16 is the default, 1 any rank)
                chosen, label = choose_ranks(prepared, budget, "global", int(rounding)), f"ratio {ratio:g} steps {rounding}"
            report(low_rank_row(bench, "ratio", label, bench.save(label, chosen, budget), feed, threads, extra))
    for target in split(args.targets, float):
        ranks, info = latency_budget_ranks(prepared, target, {}, latency, feed)
        label = f"target {target:g} b{batch}t{threads}"
        path = bench.save(label, ranks, Budget(target_latency=target))
        report(low_rank_row(bench, "target", label, path, feed, threads,
                            {"target": target, "predicted": info["predicted_ratio"]}))
    return rows


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of (latency, cosine) points at latency x; None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def equal_latency(rows: list[dict]) -> list[dict]:
    """Each target row beside the ratio rows (per rounding) of the same model, batch and threads, interpolated
    at the target row's measured latency."""
    out = []
    for row in (r for r in rows if r["kind"] == "target"):
        same = [r for r in rows if r["kind"] == "ratio" and all(r[k] == row[k] for k in ("model", "batch", "threads"))]
        entry = {k: row[k] for k in ("model", "batch", "threads", "target", "predicted", "measured_p50", "mean_cosine")}
        for rounding in sorted({r["rounding"] for r in same}):
            points = [(r["measured_p50"], r["mean_cosine"]) for r in same if r["rounding"] == rounding]
            entry[f"ratio_cosine_{rounding}"] = interpolate(points, row["measured_p50"])
        out.append(entry)
    return out


def main_table(rows) -> str:
    def f(v, d=3):
        return "n/a" if v is None else f"{v:.{d}f}"

    body = [[r["model"], str(r["batch"]), str(r["threads"]), r["config"], f(r["mb"], 1), f(r.get("site_share"), 2),
             f(r["achievable"]), f(r["measured_p50"]), f"{f(r['measured_p10'])}-{f(r['measured_p90'])}",
             f(r["measured_p50"] / r["achievable"], 2) if r["achievable"] else "", f(r["mean_cosine"], 4)]
            for r in rows]
    headers = ["model", "batch", "threads", "configuration", "MB", "site share", "achievable", "measured p50",
               "p10-p90", "meas/ach", "mean cos"]
    return format_table(headers, body, align="lrrlrrrrrrr")


def equal_table(entries) -> str:
    roundings = sorted({k[len("ratio_cosine_"):] for e in entries for k in e if k.startswith("ratio_cosine_")})
    body = [[e["model"], str(e["batch"]), str(e["threads"]), f"{e['target']:g}", f"{e['predicted']:.3f}",
             f"{e['measured_p50']:.3f}", f"{e['mean_cosine']:.4f}",
             *["n/a" if e.get(f"ratio_cosine_{r}") is None else f"{e[f'ratio_cosine_{r}']:.4f}" for r in roundings]]
            for e in entries]
    headers = ["model", "batch", "threads", "target", "predicted", "measured", "target cos",
               *[f"ratio cos ({r}) at equal latency" for r in roundings]]
    return format_table(headers, body, align="lrrrrrr" + "r" * len(roundings))


def main():
    args = parse_args()
    load_before = load_average()
    print(f"load average before: {load_before}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        for name, path, calib, held_out in models(args, Path(tmp)):
            bench = Bench(args, name, path, calib, held_out, Path(tmp))
            for batch in split(args.batches, int):
                for threads in split(args.threads, int):
                    rows += measure(bench, batch, threads)
    load_after = load_average()
    entries = equal_latency(rows)
    print()
    print(main_table(rows))
    if entries:
        print()
        print(equal_table(entries))
    print(f"\nload average before {load_before}, after {load_after}")
    if args.json:
        Path(args.json).write_text(json.dumps({"load_before": load_before, "load_after": load_after,
                                               "args": vars(args), "rows": rows, "equal_latency": entries},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
