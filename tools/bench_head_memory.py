"""What `--quantize`'s options hold for one vocabulary-wide head: numpy's allocations (tracemalloc) while
quant.plan.site_options makes a head's options (low rank and three MatMulNBits schemes, K-FAC weighting: a
Cholesky factor on the input side, low rank plus diagonal on the output side) and while the tied table's loss of
one scheme is priced. Random numbers of the head's shape; allocations, not times, are the point.

    python tools/bench_head_memory.py                 # SmolLM2's head, 576 x 49,152
    python tools/bench_head_memory.py --shape 64 8192 --json head.json

Runs against older checkouts too (`PYTHONPATH=CHECKOUT`; before TableStats.head_loss the table's loss is priced as
they priced it), for before/after tables. ONNX Runtime's own allocations (its quantizer's protobuf copies) are
not traced: RSS sees more.
"""

import argparse
import json
import time
import tracemalloc

import numpy as np
from threadpoolctl import threadpool_limits

from onnx_fwlr.methods.lowrank import gram_scaling, low_rank_diagonal_scaling
from onnx_fwlr.quant import compensate, plan
from onnx_fwlr.quant.embedding import TableStats
from onnx_fwlr.quant.ortquant import nbits


def head(K: int, N: int, seed: int = 0):
    """A float32 head [K, N], its weighting (rank-256 output sketch) and a table's statistics (3,000 used rows)."""
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    X = rng.standard_normal((4 * K, K))
    sketch = rng.standard_normal((min(256, N), N)) * 0.01
    metric = plan.Metric(gram_scaling(X.T @ X), low_rank_diagonal_scaling(sketch, np.einsum("rn,rn->n", sketch,
                                                                                            sketch) + 1e-3))
    counts = np.bincount(rng.integers(0, N, 3000), minlength=N).astype(float)
    return W, metric, TableStats(counts, np.eye(K) * 1e-3, float(counts.sum()), 8.0)


def traced(fn) -> tuple[float, float, object]:
    """(peak MiB of allocations made during fn, seconds, its result)."""
    tracemalloc.start()
    try:
        start, base = time.perf_counter(), tracemalloc.get_traced_memory()[0]
        result = fn()
        return (tracemalloc.get_traced_memory()[1] - base) / 2**20, time.perf_counter() - start, result
    finally:
        tracemalloc.stop()


def table_loss(stats: TableStats, W: np.ndarray, scheme) -> float:
    deq = plan.dequantized(W, scheme, np.float32, float64=False)
    if hasattr(stats, "head_loss"):
        return stats.head_loss(W, deq)
    return stats.loss(compensate.residual(W, deq).T)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(576, 49152), metavar=("K", "N"))
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    K, N = args.shape
    W, metric, stats = head(K, N)
    schemes = [nbits(4, 32), nbits(4, 128), nbits(8, 32)]
    with threadpool_limits(limits=1, user_api="blas"):  # as the quantized path runs it
        for scheme in schemes:  # imports and ONNX Runtime's first calls, not counted
            plan.dequantized(np.ascontiguousarray(W[:, :256]), scheme, np.float32, float64=False)
        options = traced(lambda: plan.site_options(W, metric, schemes, dense=True, low_rank=True, factor_bytes=2))
        table = traced(lambda: table_loss(stats, W, schemes[0]))
    rows = [{"what": "site_options (low rank + 3 schemes)", "peak_mib": options[0], "seconds": options[1],
             "check": sum(o.loss for o in options[2])},
            {"what": "tied table's loss (int4 b32)", "peak_mib": table[0], "seconds": table[1], "check": table[2]}]
    print(f"head {K} x {N}: float32 weight {W.nbytes / 2**20:.0f} MiB, one float64 copy {2 * W.nbytes / 2**20:.0f} MiB")
    print("| what | peak MiB above the weight | s | check (sum of predicted losses) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['what']} | {row['peak_mib']:.0f} | {row['seconds']:.1f} | {row['check']!r} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"shape": [K, N], "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
