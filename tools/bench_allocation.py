"""How well each spending rule of the one allocator (methods.allocation.allocate) spends a budget: the loss it
leaves against the exact optimum (every combination of options), on random cases — the measurement behind the
rule latency budgets use (docs/architecture.md "One allocator").

    python tools/bench_allocation.py                  # 100 latency cases, 300 byte-option cases
    python tools/bench_allocation.py --json out.json

Rules: "greedy" (upgrades along each site's lower hull, going on past a misfit: parameter and byte budgets),
"search" (the same greedy up to its first misfit, then the leftover spent one site at a time on any option:
latency budgets, allocate_ms), and "greedy+search" (greedy past misfits, then the same leftover search).
Latency cases: 2-4 sites, each a table of measured-looking times (the FLOP share, a penalty off the rank
multiple, a fixed overhead, ±10 % noise per rank) and a random decaying spectrum; the budget between the fastest
choices and dense. Byte cases: 2-4 sites of 2-8 options with random costs and falling losses.
"""

import argparse
import itertools
import json
from types import SimpleNamespace

import numpy as np

from onnx_fwlr.methods.allocation import (
    Option,
    allocate,
    by_bytes,
    by_ms,
    latency_options,
    spend_leftover,
)
from onnx_fwlr.tables import format_table

RULES = ("search", "greedy", "greedy+search")


def latency_case(seed: int):
    """(energies, tables, target ms) of one random latency case."""
    rng = np.random.default_rng(seed)
    tables, energies = [], []
    for _ in range(int(rng.integers(2, 5))):
        K, N = (int(rng.choice([32, 48, 64, 96, 128])) for _ in range(2))
        dense = 2 * 64 * K * N / 1e6
        multiple, penalty, overhead = int(rng.choice([8, 16])), rng.uniform(0, 0.3), rng.uniform(0, 0.12) * dense
        ranks = sorted({1, *range(8, K * N // (K + N) + 1, 8), *range(9, K * N // (K + N) + 1, 8)})
        ms = [(2 * 64 * r * (K + N) / 1e6 * (1 + (penalty if r % multiple else 0)) + overhead)
              * rng.uniform(0.9, 1.1) for r in ranks]
        tables.append(SimpleNamespace(dense_ms=dense, ranks=ranks, factored_ms=ms))
        energies.append(np.sort(rng.gamma(0.5, size=min(K, N)))[::-1] ** rng.uniform(1, 4) * rng.uniform(0.1, 10))
    fastest = sum(min([t.dense_ms, *t.factored_ms]) for t in tables)
    target = fastest + rng.uniform(0.02, 0.98) * (sum(t.dense_ms for t in tables) - fastest)
    return energies, tables, target


def byte_case(seed: int):
    """(choices, available bytes) of one random byte-option case."""
    rng = np.random.default_rng(seed)
    choices = []
    for _ in range(int(rng.integers(2, 5))):
        n = int(rng.integers(2, 9))
        costs, losses = np.sort(rng.uniform(1, 100, n)), np.sort(rng.gamma(1.0, size=n))[::-1] * 10
        if rng.random() < 0.5:
            losses[-1] = 0.0
        choices.append([Option("x", k, float(c), float(loss)) for k, (c, loss) in enumerate(zip(costs, losses))])
    low, high = (sum(f(o.bytes for o in options) for options in choices) for f in (min, max))
    return choices, low + rng.uniform(0.05, 0.95) * (high - low)


def spend(choices, available: float, cost, rule: str) -> list[Option]:
    """One rule's choice (every case here fits at its cheapest options)."""
    if rule == "search":
        return allocate(choices, available, cost=cost, search=True)
    picked = allocate(choices, available, cost=cost)
    return spend_leftover(choices, picked, available, cost) if rule == "greedy+search" else picked


def optimum(choices, available: float, cost) -> float:
    return min(sum(o.loss for o in combo) for combo in itertools.product(*choices)
               if sum(cost(o) for o in combo) <= available)


def compare(cases: list[tuple[list, float]], cost) -> dict:
    """Per rule: how many cases it solves optimally, and its mean and largest excess loss over the optimum."""
    found = {rule: [] for rule in RULES}
    for choices, available in cases:
        best = optimum(choices, available, cost)
        for rule in RULES:
            picked = spend(choices, available, cost, rule)
            assert sum(cost(o) for o in picked) <= available
            loss = sum(o.loss for o in picked)
            found[rule].append(loss / best - 1.0 if best > 0 else 0.0)
    return {rule: {"cases": len(excess), "optimal": int(sum(e <= 1e-12 for e in excess)),
                   "mean_excess": float(np.mean(excess)), "max_excess": float(np.max(excess))}
            for rule, excess in found.items()}


def latency_cases(n: int) -> list[tuple[list, float]]:
    cases = []
    for seed in range(n):
        energies, tables, target = latency_case(seed)
        cases.append(([latency_options(e, float(np.sum(e)), t, len(e)) for e, t in zip(energies, tables)], target))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-cases", type=int, default=100)
    parser.add_argument("--byte-cases", type=int, default=300)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    results = {"latency": compare(latency_cases(args.latency_cases), by_ms),
               "bytes": compare([byte_case(seed) for seed in range(args.byte_cases)], by_bytes)}
    rows = [[currency, rule, f"{r['optimal']}/{r['cases']}", f"{100 * r['mean_excess']:.2f} %",
             f"{100 * r['max_excess']:.1f} %"] for currency, table in results.items() for rule, r in table.items()]
    print(format_table(["cases", "rule", "optimal", "mean excess loss", "max excess loss"], rows, align="llrrr"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
