"""Cost of Fisher calibration relative to plain inference, on the synthetic BERT-style transformer.

Times, on the same padded token batches of tools/synthetic_transformer.py:
  (a) plain ONNX Runtime inference of the model (`session.run`, every output fetched),
  (b) `onnx_fwlr.api.calibrate(model, data)`: activation statistics only (whiten/asvd),
  (c) `onnx_fwlr.api.calibrate(model, data, fisher=True)`: forward with intermediates exposed, the numpy
      backward pass from Gaussian seeds on the first float output, and per-sample Fisher sums for every site,
and prints (b)/(a) and (c)/(a) (issue 4 targets (c)/(a) <= 5x) and the process's peak RSS after each.

    python tools/bench_fisher.py [--hidden 256 --layers 4 --seq 64 --batch 16] [--json out.json]

Per batch the fastest of --repeats runs counts (see tools/bench_calibration.py: on a shared machine other
loads only add time); warm-up batches are left out. The per-sample Fisher sums are numpy BLAS products run
between ONNX Runtime calls: on a busy machine OpenBLAS's own threads can slow them many times over, so
compare with `OPENBLAS_NUM_THREADS=1 python tools/bench_fisher.py` (the setting is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from bench_calibration import TimedReader, best_total, time_plain
from synthetic_transformer import build_transformer, make_token_batch

from onnx_fwlr import api

VOCAB = 1000


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_calibrate(model, feeds: list[dict], fisher: bool) -> list[float]:
    """Seconds per batch inside api.calibrate (graph building and session creation excluded)."""
    reader = TimedReader(feeds)
    stats = api.calibrate(model, reader, fisher=fisher, progress=False)
    assert stats.meta["batches"] == len(feeds)
    assert bool(stats.gradients) == fisher
    return reader.per_batch()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up batches excluded from every timing")
    parser.add_argument("--measured", type=int, default=8, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; per batch the fastest counts")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    model = build_transformer(hidden=args.hidden, layers=args.layers, heads=args.heads, ffn=4 * args.hidden,
                              vocab=VOCAB, max_len=args.seq, seed=0)
    feeds = [make_token_batch(args.batch, args.seq, VOCAB, seed=1 + i) for i in range(args.warmup + args.measured)]
    real = float(np.mean([f["attention_mask"].mean() for f in feeds]))

    runs = {"plain": [], "activations": [], "fisher": []}
    peaks = {}
    for _ in range(args.repeats):  # whole runs alternate, so other loads on the machine hit every side alike
        runs["plain"].append(time_plain(model, feeds))
        peaks.setdefault("plain", peak_rss_mib())
        runs["activations"].append(time_calibrate(model, feeds, fisher=False))
        peaks.setdefault("activations", peak_rss_mib())
        runs["fisher"].append(time_calibrate(model, feeds, fisher=True))
        peaks.setdefault("fisher", peak_rss_mib())

    ms = {key: 1e3 * best_total(r, args.warmup) / args.measured for key, r in runs.items()}
    ratio = {key: ms[key] / ms["plain"] for key in ms}
    run_ratios = [sum(f[args.warmup:]) / sum(p[args.warmup:]) for f, p in zip(runs["fisher"], runs["plain"])]
    config = {"hidden": args.hidden, "ffn": 4 * args.hidden, "layers": args.layers, "heads": args.heads,
              "seq": args.seq, "batch": args.batch, "real_token_share": real, "warmup": args.warmup,
              "measured": args.measured, "repeats": args.repeats, "sites": 6 * args.layers,
              "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "load_average_1min": os.getloadavg()[0]}

    print(f"synthetic transformer: hidden {args.hidden}, FFN {4 * args.hidden}, {args.layers} layers, "
          f"{6 * args.layers} MatMul sites; batch {args.batch} x seq {args.seq}, {100 * real:.0f}% real tokens")
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"{args.measured} batches after {args.warmup} warm-up; per batch the fastest of {args.repeats} runs; "
          f"OPENBLAS_NUM_THREADS {blas}; load average {os.getloadavg()[0]:.1f}\n")
    labels = {"plain": "plain ORT inference", "activations": "calibrate (activations)",
              "fisher": "calibrate (fisher=True)"}
    print(f"{'':28s}{'ms/batch':>10s}{'x plain':>9s}{'peak RSS after':>16s}")
    for key, label in labels.items():
        print(f"{label:28s}{ms[key]:10.1f}{ratio[key]:8.2f}x{peaks[key]:12.0f} MiB")
    print(f"\nFisher calibration / plain inference: {ratio['fisher']:.2f}x (target <= 5x; "
          f"each run's own ratio {min(run_ratios):.2f}-{max(run_ratios):.2f}x)")
    if args.json:
        result = {"config": config, "ms_per_batch": ms, "ratio": ratio, "fisher_run_ratios": run_ratios,
                  "peak_rss_mib_after": peaks, "target_ratio": 5.0, "seconds_per_batch": runs}
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
