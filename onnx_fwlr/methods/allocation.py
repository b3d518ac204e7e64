"""Choosing a rank per site under one parameter budget (numpy only).

A rank of None means "keep the weight dense": factorising at rank r costs r (K + N) parameters and pays
only while that is below K N.
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np


def break_even_rank(K: int, N: int) -> int:
    """Largest rank that still stores fewer parameters than the dense weight."""
    return (K * N - 1) // (K + N)


def clamp_rank(K: int, N: int, rank: int) -> int | None:
    """A requested rank made valid: at least 1, None (dense) once it no longer pays."""
    rank = max(1, int(rank))
    return rank if rank <= break_even_rank(K, N) else None


# Ranks the kernels run at their FLOP share: in ONNX Runtime on a CPU a factored pair one rank past a multiple of
# 16 costs 4-21 % more than at the multiple (docs/speed.md), so wide sites get ranks in steps of this many.
DEFAULT_RANK_MULTIPLE = 16


def rank_step(K: int, N: int, multiple: int | None) -> int:
    """The rank granularity of a [K, N] site: `multiple` when the site is wide enough for it to matter (its
    break-even rank holds at least 4 steps), else 1 (a narrow site keeps fine-grained ranks)."""
    if not multiple or multiple <= 1:
        return 1
    return multiple if break_even_rank(K, N) >= 4 * multiple else 1


def uniform_ranks(shapes: list[tuple[int, int]], ratio: float, multiple: int | None = None) -> list[int | None]:
    """Each site keeps about `ratio` of its own parameters: r = ⌊ratio · K N / (K + N)⌋. With `multiple`, each
    rank moves to the nearest multiple of its site's rank_step (at least one step, at most break-even), then
    the sites rounded up give a step back, widest first, until the ratio's parameter budget holds again."""
    ranks = [clamp_rank(K, N, int(np.floor(ratio * K * N / (K + N)))) for K, N in shapes]
    steps = [rank_step(K, N, multiple) for K, N in shapes]
    if all(step == 1 for step in steps):
        return ranks
    plain = list(ranks)
    for i, ((K, N), rank, step) in enumerate(zip(shapes, plain, steps)):
        if step > 1 and rank is not None:
            ranks[i] = min(max(step, int(np.floor(rank / step + 0.5)) * step), break_even_rank(K, N) // step * step)
    budget = ratio * sum(K * N for K, N in shapes)
    raised = sorted((i for i in range(len(shapes)) if plain[i] is not None and ranks[i] > plain[i]),
                    key=lambda i: (-(shapes[i][0] + shapes[i][1]), i))
    for i in raised:
        if sum(site_params(K, N, r) for (K, N), r in zip(shapes, ranks)) <= budget:
            break
        if ranks[i] > steps[i]:
            ranks[i] -= steps[i]
    return ranks


# Below this rank one factorised layer alone costs most of a model's quality (measured in docs/defaults.md:
# digits head, fc1, fc2 and the synthetic transformer's projections all fall off between rank 6 and 8).
MIN_UNIFORM_RANK = 8


def floored_uniform_ranks(shapes: list[tuple[int, int]], ratio: float, floor: int = MIN_UNIFORM_RANK,
                          multiple: int | None = None) -> tuple[list[int | None], list[int]]:
    """uniform_ranks, except that a site whose rank would fall below `floor` stays dense and pays for it
    from the other sites' share: they split what is left of the budget uniformly.

    Returns (ranks, indices kept dense by the floor). When the budget cannot pay for that while the other
    sites stay at or above the floor, the plain uniform ranks come back with no index: the caller warns.
    """
    plain = uniform_ranks(shapes, ratio, multiple)
    budget = ratio * sum(K * N for K, N in shapes)
    floored: set[int] = set()
    while True:
        free = [i for i in range(len(shapes)) if i not in floored]
        left = budget - sum(shapes[i][0] * shapes[i][1] for i in floored)
        free_params = sum(shapes[i][0] * shapes[i][1] for i in free)
        if not free or left <= 0:
            return plain, []
        ranks = dict(zip(free, uniform_ranks([shapes[i] for i in free], min(left / free_params, 1.0), multiple)))
        low = {i for i, r in ranks.items() if r is not None and r < floor}
        if not low:
            return [None if i in floored else ranks[i] for i in range(len(shapes))], sorted(floored)
        floored |= low


def site_params(K: int, N: int, rank: int | None) -> int:
    return K * N if rank is None else rank * (K + N)


def greedy(chains: list[list[tuple[float, float]]], spent: float, available: float) -> list[int]:
    """The one greedy rule every budget is spent by: each site has a chain of upgrades (extra cost, loss removed),
    in the budget's currency (parameters, bytes, milliseconds); repeatedly take, over all sites, the next upgrade
    with the most loss removed per unit of cost, while the total (from `spent`) stays within `available`; an
    upgrade that does not fit ends its site's chain (smaller sites may still fit). Returns how many upgrades each
    site took. Optimal for chains whose gain per cost falls along each chain (lower hulls, descending spectra);
    ties go to the lower site index."""
    taken = [0] * len(chains)
    heap = [(-gain / cost, i) for i, chain in enumerate(chains) if chain for cost, gain in chain[:1]]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        cost, _ = chains[i][taken[i]]
        if spent + cost > available:
            continue
        taken[i], spent = taken[i] + 1, spent + cost
        if taken[i] < len(chains[i]):
            cost, gain = chains[i][taken[i]]
            heapq.heappush(heap, (-gain / cost, i))
    return taken


def global_ranks(
    energies: list[np.ndarray], shapes: list[tuple[int, int]], budget: float, min_rank: int = 1,
    multiple: int | None = None,
) -> list[int | None]:
    """Greedy over all sites (`greedy`): keep the block of components with the most weighted energy per
    parameter next.

    energies[i] holds site i's σ² in descending order, all in one currency (loss units for Fisher/K-FAC
    weighting). A block is rank_step(K, N, multiple) components (1 without `multiple`), so wide sites get ranks
    that are multiples of `multiple`. Every site starts at one block (at least `min_rank`). When a site's next
    block would pass break-even, its next move is to turn dense, priced as what it is: all of its remaining
    energy for the few parameters left to break-even (priced as one more component, a site could end at its
    break-even rank, saving almost nothing and dropping its tail).
    """
    steps = [rank_step(K, N, multiple) for K, N in shapes]
    start = [min(max(min_rank, step), break_even_rank(K, N)) for (K, N), step in zip(shapes, steps)]
    spent = float(sum(site_params(K, N, r) for (K, N), r in zip(shapes, start)))
    chains = [_rank_chain(np.asarray(e), K, N, r, step) for e, (K, N), r, step in zip(energies, shapes, start, steps)]
    taken = greedy(chains, spent, budget)
    ranks: list[int | None] = []
    for (K, N), r, step, chain, n in zip(shapes, start, steps, chains, taken):
        dense = n > 0 and n == len(chain) and r + step * (n - 1) + step > break_even_rank(K, N)
        ranks.append(None if dense else r + step * n)
    return ranks


def _rank_chain(energy: np.ndarray, K: int, N: int, rank: int, step: int) -> list[tuple[float, float]]:
    """A site's upgrades from `rank`: (parameters, energy kept) per block of `step` components while the block
    stays below break-even, then the move to dense (all of the remaining energy for the parameters left)."""
    chain = []
    while True:
        if rank + step > break_even_rank(K, N):
            chain.append((K * N - rank * (K + N), float(np.sum(energy[rank:]))))
            return chain
        if rank >= len(energy):
            return chain
        chain.append((step * (K + N), float(np.sum(energy[rank:rank + step]))))
        rank += step


def _latency_steps(energy: np.ndarray, total: float, table, max_rank: int) -> list[tuple[float, float, int]]:
    """One site's moves from dense towards faster ranks, on the lower convex hull of (time, dropped energy):
    [(ms saved, energy dropped, rank)] with non-decreasing energy per ms. table: dense_ms, ranks, factored_ms."""
    options = [(float(table.dense_ms), 0.0, None)]
    for rank, ms in zip(table.ranks, table.factored_ms):
        if rank <= min(len(energy), max_rank) and ms < table.dense_ms:
            options.append((float(ms), max(total - float(np.sum(energy[:rank])), 0.0), rank))
    options.sort(key=lambda o: (-o[0], o[1]))  # slowest first: dense, then ever faster ranks
    frontier = []
    for option in options:  # keep only options that drop less than every faster one would
        if frontier and option[0] >= frontier[-1][0]:
            continue  # as slow as the one kept, dropping at least as much
        while frontier and frontier[-1][1] >= option[1]:
            frontier.pop()
        frontier.append(option)
    hull = []
    for option in frontier:
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-2], option):
            hull.pop()
        hull.append(option)
    return [(a[0] - b[0], b[1] - a[1], b[2]) for a, b in itertools.pairwise(hull)]


def _slope(a, b) -> float:
    """Energy dropped per ms saved going from option a to the faster option b."""
    return (b[1] - a[1]) / (a[0] - b[0])


def latency_ranks(energies: list[np.ndarray], site_tables: list, target_ms: float,
                  totals: list[float] | None = None, max_ranks: list[int] | None = None) -> list[int | None]:
    """Ranks whose summed site time fits `target_ms`, dropping the least weighted energy on the way.

    Greedy by energy dropped per millisecond saved, the latency counterpart of global_ranks (same loss-unit
    currency): every site starts dense; each step takes, over all sites, the next move on a site's lower
    convex hull of (measured time, dropped energy) with the smallest energy per ms, until the total time is
    at most target_ms. site_tables[i] has dense_ms and the measured factored_ms at ranks (ascending); only
    measured ranks faster than dense are candidates, up to max_ranks (per site; default the spectrum's length).
    totals: ‖PWQ‖_F² per site when energies are truncated.
    The greedy's last step overshoots the budget; the time left over then buys back the most energy it can
    (any measured rank, one site at a time). When even the fastest choices do not fit, those are returned (the
    caller checks the time).
    """
    totals = totals or [float(np.sum(e)) for e in energies]
    max_ranks = max_ranks or [len(e) for e in energies]
    ranks = _latency_greedy(energies, site_tables, target_ms, totals, max_ranks)
    return _spend_leftover(ranks, energies, site_tables, target_ms, totals, max_ranks)


def _latency_greedy(energies, site_tables, target_ms, totals, max_ranks) -> list[int | None]:
    steps = [_latency_steps(np.asarray(e), t, table, m)
             for e, t, table, m in zip(energies, totals, site_tables, max_ranks)]
    ranks: list[int | None] = [None] * len(site_tables)
    spent = float(sum(table.dense_ms for table in site_tables))
    heap = [(site[0][1] / site[0][0], i, 0) for i, site in enumerate(steps) if site]
    heapq.heapify(heap)
    while heap and spent > target_ms:
        _, i, k = heapq.heappop(heap)
        saved, _, rank = steps[i][k]
        ranks[i], spent = rank, spent - saved
        if k + 1 < len(steps[i]):
            saved_next, dropped_next, _ = steps[i][k + 1]
            heapq.heappush(heap, (dropped_next / saved_next, i, k + 1))
    return ranks


def _spend_leftover(ranks, energies, site_tables, target_ms, totals, max_ranks) -> list[int | None]:
    """Repeatedly take the single change of one site's rank (to any measured rank or dense) that lowers the
    dropped energy most while the total time stays within target_ms."""
    ranks = list(ranks)

    def options(i):
        table = site_tables[i]
        yield table.dense_ms, 0.0, None
        for rank, ms in zip(table.ranks, table.factored_ms):
            if rank <= min(len(energies[i]), max_ranks[i]):
                yield ms, max(totals[i] - float(np.sum(energies[i][:rank])), 0.0), rank

    def current(i):
        return next(o for o in options(i) if o[2] == ranks[i])

    spent = float(sum(current(i)[0] for i in range(len(ranks))))
    if spent > target_ms:
        return ranks
    while True:
        best = None  # (energy regained, site, option)
        for i in range(len(ranks)):
            ms_now, dropped_now, _ = current(i)
            for ms, dropped, rank in options(i):
                gain = dropped_now - dropped
                if gain > 0 and spent - ms_now + ms <= target_ms and (best is None or gain > best[0]):
                    best = (gain, i, (ms, rank, ms_now))
        if best is None:
            return ranks
        _, i, (ms, rank, ms_now) = best
        ranks[i], spent = rank, spent - ms_now + ms
