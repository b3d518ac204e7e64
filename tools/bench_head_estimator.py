"""How well the LM head's output-side estimator (rank-r factor + exact diagonal) stands in for the exact K-FAC
Gram, on a decoder small enough for the exact vocabulary × vocabulary Gram to be formed.

For each sketch rank r it measures, on the LM head (the widest site):
- the estimate's relative error ‖Ĝ − G‖_F / ‖G‖_F (Ĝ = Sᵀ S + residual diagonal);
- the head factorised at ranks K/8, K/4, K/2 under Ĝ, judged in the exact metric: its weighted error
  ‖(W − A B) G^½‖² relative to that of the exact K-FAC factors at the same rank (1.0 = as good as exact);
- the bytes of the stored statistic (exact: N² float64).

    python tools/bench_head_estimator.py --model sample_models/decoder/decoder.onnx \
        --calib sample_models/decoder/calib.npz --ranks 0,8,32,64,128,256
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from onnx_fwlr.io.data import open_data
from onnx_fwlr.io.model import load_model
from onnx_fwlr.methods import lowrank
from onnx_fwlr.methods.registry import input_scaling, output_scaling
from onnx_fwlr.sites.find import find_sites, weight_matrix
from onnx_fwlr.stats.fisher import collect_fisher_stats


def exact_metric_error(W, A, B, gram):
    E = W - A @ B
    return float(np.einsum("kn,kn->", E @ gram, E))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sample_models/decoder/decoder.onnx")
    parser.add_argument("--calib", default="sample_models/decoder/calib.npz")
    parser.add_argument("--ranks", default="0,8,32,64,128,256")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = load_model(args.model)
    sites, _ = find_sites(model)
    head = max(sites, key=lambda s: s.N)
    batches = open_data(args.calib, model, batch_size=args.batch_size)
    start = time.perf_counter()
    exact = collect_fisher_stats(model, [head], batches, loss="lm", progress=False, sketch_min_dim=1 << 30)
    exact_seconds = time.perf_counter() - start
    W = weight_matrix(model, head)
    gram = exact.output_grad_gram(head)
    left = input_scaling("kfac", head, exact)
    exact_dec = lowrank.weighted_svd(W, left, output_scaling("kfac", head, exact))
    damped = gram + 1e-4 * float(np.mean(np.diag(gram))) * np.eye(head.N)
    cut_ranks = [max(1, head.K // d) for d in (8, 4, 2)]
    baseline = {r: exact_metric_error(W, *exact_dec.factors(r), damped) for r in cut_ranks}
    rows = [{"estimator": f"exact ({head.N}² Gram)", "bytes": 8 * head.N ** 2, "gram_rel_error": 0.0,
             "seconds": exact_seconds, **{f"error_ratio_r{r}": 1.0 for r in cut_ranks}}]
    for rank in [int(r) for r in args.ranks.split(",")]:
        start = time.perf_counter()
        stats = collect_fisher_stats(model, [head], batches, loss="lm", progress=False, sketch_min_dim=1,
                                     sketch_rank=max(rank, 1) if rank else 1)
        seconds = time.perf_counter() - start
        factor, diagonal = stats.output_grad_sketch(head)
        if rank == 0:
            factor = factor[:0]
        estimate = factor.T @ factor
        estimate[np.diag_indices_from(estimate)] = np.maximum(diagonal, np.diag(estimate))
        dec = lowrank.weighted_svd(W, left, lowrank.low_rank_diagonal_scaling(factor, diagonal))
        row = {"estimator": "diagonal only" if rank == 0 else f"rank {rank} + diagonal",
               "bytes": 8 * (factor.shape[0] * head.N + head.N),
               "gram_rel_error": float(np.linalg.norm(estimate - gram) / np.linalg.norm(gram)), "seconds": seconds}
        for r in cut_ranks:
            row[f"error_ratio_r{r}"] = exact_metric_error(W, *dec.factors(r), damped) / baseline[r]
        rows.append(row)
    print(f"model {args.model}: LM head {head.name} [{head.K} x {head.N}], "
          f"{exact.meta['samples']} calibration rows")
    header = ["estimator", "bytes", "gram_rel_error"] + [f"error_ratio_r{r}" for r in cut_ranks] + ["seconds"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{row[h]:.4g}" if isinstance(row[h], float) else str(row[h]) for h in header) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
