"""Choosing a rank per site under one parameter budget (numpy only).

A rank of None means "keep the weight dense": factorising at rank r costs r (K + N) parameters and pays
only while that is below K N.
"""

from __future__ import annotations

import heapq

import numpy as np


def break_even_rank(K: int, N: int) -> int:
    """Largest rank that still stores fewer parameters than the dense weight."""
    return (K * N - 1) // (K + N)


def clamp_rank(K: int, N: int, rank: int) -> int | None:
    """A requested rank made valid: at least 1, None (dense) once it no longer pays."""
    rank = max(1, int(rank))
    return rank if rank <= break_even_rank(K, N) else None


def uniform_ranks(shapes: list[tuple[int, int]], ratio: float) -> list[int | None]:
    """Each site keeps about `ratio` of its own parameters: r = ⌊ratio · K N / (K + N)⌋."""
    return [clamp_rank(K, N, int(np.floor(ratio * K * N / (K + N)))) for K, N in shapes]


def site_params(K: int, N: int, rank: int | None) -> int:
    return K * N if rank is None else rank * (K + N)


def global_ranks(
    energies: list[np.ndarray], shapes: list[tuple[int, int]], budget: float, min_rank: int = 1
) -> list[int | None]:
    """Greedy over all sites: keep the component with the most weighted energy per parameter next.

    energies[i] holds site i's σ² in descending order, all in one currency (loss units for Fisher/K-FAC
    weighting). Every site starts at `min_rank`. When a site's next component would pass break-even, the
    site turns dense instead (that costs less than the component would) and takes no more components.
    """
    ranks: list[int | None] = [min(min_rank, break_even_rank(K, N)) for K, N in shapes]
    spent = float(sum(site_params(K, N, r) for (K, N), r in zip(shapes, ranks)))
    heap = []
    for i, ((K, N), energy) in enumerate(zip(shapes, energies)):
        if ranks[i] < len(energy):
            heapq.heappush(heap, (-float(energy[ranks[i]]) / (K + N), i))
    while heap:
        _, i = heapq.heappop(heap)
        K, N = shapes[i]
        rank = ranks[i]
        if rank + 1 > break_even_rank(K, N):
            cost = K * N - rank * (K + N)
            if spent + cost <= budget:
                ranks[i], spent = None, spent + cost
            continue
        if spent + (K + N) > budget:
            continue  # smaller sites may still fit
        ranks[i], spent = rank + 1, spent + (K + N)
        if rank + 1 < len(energies[i]):
            heapq.heappush(heap, (-float(energies[i][rank + 1]) / (K + N), i))
    return ranks
