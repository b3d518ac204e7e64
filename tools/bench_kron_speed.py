"""Doped Kronecker vs the dense MatMul in ONNX Runtime: is the structured form faster, and in which ONNX form?

Run from the repository root:
    python tools/bench_kron_speed.py [--threads 1,2] [--tokens 1024,32,1] [--json FILE]
    python tools/bench_kron_speed.py --goals [--json FILE]     # issue 29's goals, printed PASS/FAIL

--goals: `compress --method kron --dope 0.001 --ratio 0.1` with default shapes (timed at one thread, fresh latency
cache, so the fit's wall time includes the timing) on a 1024 x 1024 MatMul, for a trained-like weight (decaying
spectrum plus noise) and a Gaussian one; then the written model, the balanced shape's (`--kron-shape balanced`,
yesterday's default) and the dense original, timed back to back (ratios of interleaved rounds) at T = 1024 and
T = 32 rows on one thread. Goals: the default below 1.0x dense at both row counts, its relative error at most
1.1x the balanced shape's, the fit under 30 s. The load average is printed next to every latency.

A 1024 x 1024 MatMul weight replaced by Σ_s A_s ⊗ B_s + D at several shapes, term counts and doping shares,
each at >= 8x compression (stored numbers: factor entries + 3 per doping entry). For each configuration,
row count (1024 = batch 32 x 32 tokens, 32 = one sequence, 1 = one token) and intra-op thread count, the
forms of onnx_fwlr.cost.forms are timed against the dense MatMul with interleaved repeats (OrtFormTimer:
every model runs in each round, rounds in rotating order, medians over rounds), and the table shows the default
form (fewest multiply-adds, stacked, ScatterND doping), the fastest form and the dense time. Values are random:
the time does not depend on them. Doping supports are random, or concentrated in a few rows ("rows" column),
as the whitened top-k picks them when a few input features carry large activations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnxruntime as ort

from onnx_fwlr.cost.forms import DENSE, OrtFormTimer, choose_form, dense_model, site_model
from onnx_fwlr.methods.structured import Coo, KronSum, Structured
from onnx_fwlr.rewrite.structured import Form

K = N = 1024
# (m1, m2, n1, n2, terms, doping fraction, rows the doping touches or None for a random support)
CONFIGS = [
    (32, 32, 32, 32, 48, 0.01, None),  # the most balanced shape (what the fit prefers), 8.1x
    (4, 256, 256, 4, 56, 0.002, None),  # few multiply-adds per stored number, random support, 8.7x
    (8, 128, 128, 8, 48, 0.003, None),  # 9.7x
    (4, 256, 256, 4, 48, 0.01, 64),  # doping concentrated in 64 input rows, 8.1x
    (4, 256, 256, 4, 24, 0.003, None),  # 17.9x
]


def random_site(m1, m2, n1, n2, terms, dope, rows_touched, seed=0) -> Structured:
    rng = np.random.default_rng(seed)
    A, B = rng.standard_normal((terms, m1, n1)), rng.standard_normal((terms, m2, n2))
    k = int(round(dope * K * N))
    pool = K if rows_touched is None else rows_touched
    rows_chosen = np.sort(rng.choice(K, pool, replace=False))
    flat = np.sort(rng.choice(pool * N, k, replace=False))
    coo = Coo(rows_chosen[flat // N], flat % N, rng.standard_normal(k), (K, N))
    return Structured(KronSum(A, B), coo)


def stored(rep: Structured) -> int:
    return rep.params


def measure(rep: Structured, tokens: int, threads: int, timer_options) -> dict:
    timer = OrtFormTimer(threads=threads, **timer_options)
    choice = choose_form(rep, tokens, timer)
    # the dense weight, the default form and the chosen form, in interleaved rounds of their own
    models = {DENSE: dense_model((K, N)), "default": site_model(rep, Form()), "chosen": site_model(rep, choice.form)}
    final = timer(models, K, tokens)
    return {"form": choice.form.label(True, rep.nnz > 0), "default_ms": final["default"], "chosen_ms": final["chosen"],
            "dense_ms": final[DENSE], "speedup": final[DENSE] / final["chosen"], "timings": choice.timings}


def table(rows) -> str:
    header = (f"{'structure':<22} {'terms':>5} {'dope':>6} {'rows':>5} {'compr.':>6} {'T':>5} {'thr':>3} "
              f"{'dense ms':>9} {'default ms':>10} {'best ms':>9} {'best/dense':>10}  best form")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['structure']:<22} {r['terms']:>5} {100 * r['dope']:>5.2f}% {r['rows_touched']:>5} "
                     f"{r['compression']:>6.1f} {r['tokens']:>5} {r['threads']:>3} {r['dense_ms']:>9.3f} "
                     f"{r['default_ms']:>10.3f} {r['chosen_ms']:>9.3f} {r['chosen_ms'] / r['dense_ms']:>10.2f}  "
                     f"{r['form']}")
    return "\n".join(lines)


def goal_weight(kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal((K, N)) / np.sqrt(K)
    U, _ = np.linalg.qr(rng.standard_normal((K, K)))
    V, _ = np.linalg.qr(rng.standard_normal((N, N)))
    return (U / (1.0 + np.arange(K) / 20.0)) @ V.T + 0.002 * rng.standard_normal((K, N))


def load() -> str:
    return "load " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def goals(rounds: int) -> dict:
    """Issue 29's goals on both weights; returns the rows for --json."""
    import tempfile
    import time

    from onnx_fwlr import compress
    from onnx_fwlr.cost.latency import MeasuredLatency

    results = []
    for kind in ("trained-like", "gaussian"):
        model = dense_model(goal_weight(kind).astype(np.float32))
        with tempfile.TemporaryDirectory() as cache:
            start, load_before = time.perf_counter(), load()
            fast, fast_report = compress(model, ratio=0.1, method="kron", dope=0.001, progress=False,
                                         latency=MeasuredLatency(threads=1, cache_dir=cache))
            fit_s = time.perf_counter() - start
        start = time.perf_counter()
        balanced, balanced_report = compress(model, ratio=0.1, method="kron", dope=0.001, kron_shape="balanced",
                                             progress=False)
        balanced_s = time.perf_counter() - start
        (site,), (old,) = fast_report.sites, balanced_report.sites
        row = {"weight": kind, "default": site.note.split(",")[0], "balanced": old.note.split(",")[0],
               "error": site.relative_error, "balanced_error": old.relative_error, "fit_s": fit_s,
               "balanced_fit_s": balanced_s, "fit_load": load_before, "latency": {}}
        timer = OrtFormTimer(threads=1, rounds=rounds)
        for tokens in (1024, 32):
            before = load()
            times = timer({DENSE: model, "default": fast, "balanced": balanced}, K, tokens)
            row["latency"][tokens] = {"dense_ms": times[DENSE], "default": times["default"] / times[DENSE],
                                      "balanced": times["balanced"] / times[DENSE], "load": f"{before} / {load()}"}
        results.append(row)
    print(f"\n1024x1024 MatMul, ratio 0.1, dope 0.001; ONNX Runtime {ort.__version__} CPU, 1 thread; ratios of "
          "back-to-back interleaved rounds (medians)")
    for row in results:
        print(f"\n{row['weight']} weight")
        print(f"  default : {row['default']:<42} rel. error {row['error']:.4f}  fit {row['fit_s']:.1f} s "
              f"(timing included, {row['fit_load']})")
        print(f"  balanced: {row['balanced']:<42} rel. error {row['balanced_error']:.4f}  fit "
              f"{row['balanced_fit_s']:.1f} s")
        for tokens, lat in row["latency"].items():
            print(f"  T={tokens:<5} dense {lat['dense_ms']:8.3f} ms   default {lat['default']:.2f}x   balanced "
                  f"{lat['balanced']:.2f}x dense   ({lat['load']})")
        checks = [(f"default below 1.0x dense at T={t}", lat["default"] < 1.0) for t, lat in row["latency"].items()]
        checks.append(("relative error at most 1.1x the balanced shape's", row["error"] <= 1.1 * row["balanced_error"]))
        checks.append(("fit under 30 s", row["fit_s"] < 30.0))
        row["goals"] = {name: ok for name, ok in checks}
        for name, ok in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    return {"onnxruntime": ort.__version__, "goals": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts (comma-separated)")
    parser.add_argument("--tokens", default="1024,32,1", help="rows per run (comma-separated)")
    parser.add_argument("--configs", help="indices into CONFIGS to run (comma-separated; default all)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per measurement")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--goals", action="store_true", help="issue 29's goals, PASS/FAIL (see the docstring)")
    args = parser.parse_args(argv)
    if args.goals:
        data = goals(max(args.rounds, 15))
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
        return 0 if all(all(r["goals"].values()) for r in data["goals"]) else 1
    configs = CONFIGS if not args.configs else [CONFIGS[int(i)] for i in args.configs.split(",")]
    rows = []
    for m1, m2, n1, n2, terms, dope, touched in configs:
        rep = random_site(m1, m2, n1, n2, terms, dope, touched)
        for tokens in [int(t) for t in args.tokens.split(",")]:
            for threads in [int(t) for t in args.threads.split(",")]:
                result = measure(rep, tokens, threads, {"rounds": args.rounds})
                rows.append({"structure": f"{m1}x{n1} ⊗ {m2}x{n2}", "terms": terms, "dope": dope,
                             "rows_touched": touched or K, "compression": K * N / stored(rep), "tokens": tokens,
                             "threads": threads, **result})
                print(f"  {rows[-1]['structure']} s={terms} dope={dope} T={tokens} threads={threads}: "
                      f"{result['chosen_ms']:.3f} ms vs dense {result['dense_ms']:.3f} ms ({result['form']})",
                      file=sys.stderr)
    print(f"\n1024x1024 MatMul, ONNX Runtime {ort.__version__} CPU; ms = median over interleaved rounds")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"onnxruntime": ort.__version__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
