"""methods.allocation.greedy, the one rule global_ranks and quant.budget.allocate spend budgets by, chooses what
the two separate greedy loops it replaced chose (their code kept here as the reference), on random spectra,
shapes, rank multiples, truncated spectra and budgets, and on random option sets."""

import heapq

import numpy as np
import pytest

from onnx_fwlr.methods.allocation import break_even_rank, global_ranks, greedy, rank_step, site_params
from onnx_fwlr.quant.budget import Option, allocate, by_bytes, lower_hull


def _reference_global_ranks(energies, shapes, budget, min_rank=1, multiple=None):
    """global_ranks as it was before greedy(): a heap of each site's next block or dense move."""
    steps = [rank_step(K, N, multiple) for K, N in shapes]
    ranks = [min(max(min_rank, step), break_even_rank(K, N)) for (K, N), step in zip(shapes, steps)]
    spent = float(sum(site_params(K, N, r) for (K, N), r in zip(shapes, ranks)))
    heap = []

    def push(i):
        rank, energy, step = ranks[i], energies[i], steps[i]
        K, N = shapes[i]
        if rank + step > break_even_rank(K, N):
            heapq.heappush(heap, (-float(np.sum(energy[rank:])) / (K * N - rank * (K + N)), i))
        elif rank < len(energy):
            heapq.heappush(heap, (-float(np.sum(energy[rank:rank + step])) / (step * (K + N)), i))

    for i in range(len(shapes)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        K, N = shapes[i]
        rank, step = ranks[i], steps[i]
        if rank + step > break_even_rank(K, N):
            cost = K * N - rank * (K + N)
            if spent + cost <= budget:
                ranks[i], spent = None, spent + cost
            continue
        if spent + step * (K + N) > budget:
            continue
        ranks[i], spent = rank + step, spent + step * (K + N)
        push(i)
    return ranks


def _reference_allocate(choices, available, cost=by_bytes):
    """quant.budget.allocate as it was: every hull step sorted once by gain per cost."""
    hulls = [lower_hull(options, cost) for options in choices]
    spent = sum(cost(h[0]) for h in hulls)
    if spent > available:
        return None
    position, steps, blocked = [0] * len(hulls), [], set()
    for i, hull in enumerate(hulls):
        for j in range(1, len(hull)):
            steps.append(((hull[j - 1].loss - hull[j].loss) / (cost(hull[j]) - cost(hull[j - 1])), i, j))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    for _, i, j in steps:
        if i in blocked or position[i] != j - 1:
            continue
        extra = cost(hulls[i][j]) - cost(hulls[i][j - 1])
        if spent + extra > available:
            blocked.add(i)
            continue
        position[i], spent = j, spent + extra
    return [hull[p] for hull, p in zip(hulls, position)]


@pytest.mark.parametrize("seed", range(40))
def test_global_ranks_choose_what_the_old_loop_chose(seed):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(2, 90)), int(rng.integers(2, 90))) for _ in range(int(rng.integers(1, 7)))]
    energies = []
    for K, N in shapes:
        spectrum = np.sort(rng.gamma(0.5, size=min(K, N)))[::-1] ** rng.uniform(1, 4)
        energies.append(spectrum[:int(rng.integers(1, len(spectrum) + 1))] if rng.random() < 0.3 else spectrum)
    budget = rng.uniform(0.05, 1.1) * sum(K * N for K, N in shapes)
    multiple = [None, 2, 4, 16][seed % 4]
    min_rank = int(rng.integers(1, 4))
    expected = _reference_global_ranks(energies, shapes, budget, min_rank, multiple)
    assert global_ranks(energies, shapes, budget, min_rank, multiple) == expected


@pytest.mark.parametrize("seed", range(40))
def test_allocate_chooses_what_the_old_loop_chose(seed):
    rng = np.random.default_rng(seed)
    choices = [[Option("x", r, int(rng.integers(1, 1000)), float(rng.gamma(1.0)) * 10) for r in range(
        int(rng.integers(1, 8)))] for _ in range(int(rng.integers(1, 8)))]
    available = rng.uniform(0.2, 1.2) * sum(max(o.bytes for o in options) for options in choices)
    assert allocate(choices, available) == _reference_allocate(choices, available)


def test_greedy_takes_the_best_gain_per_cost_that_fits():
    chains = [[(10, 50.0), (10, 5.0)], [(4, 12.0), (30, 30.0)]]  # per-cost gains 5, 0.5 | 3, 1
    assert greedy(chains, 0, 14) == [1, 1]
    assert greedy(chains, 0, 44) == [1, 2]  # then 30 for 30 (1 per unit) before 10 for 5 (0.5)
    assert greedy(chains, 0, 54) == [2, 2]
    assert greedy(chains, 10, 14) == [0, 1]  # the 10-unit upgrade no longer fits; the 4-unit one does
