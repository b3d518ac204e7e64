"""Choosing a replacement per site under one budget (numpy only): one Option type, one allocator.

Every site's candidates (dense, low rank at each rank step, a quantized scheme with a correction, ...) are
`Option`s with their predicted loss and their costs (parameters, bytes, milliseconds); `allocate` spends any
budget over them by `greedy` (most loss removed per unit of the budget's currency). A rank of None means "keep
the weight dense": factorising at rank r costs r (K + N) parameters and pays only while that is below K N.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

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


# ---------------------------------------------------------------------------------------------------------
# One option type and one allocator for every budget


DENSE, LOW_RANK = "dense", "low rank"


@dataclass(frozen=True)
class Option:
    """One replacement a site can take (dense, low rank r, a quantized scheme with a rank-r correction, ...) with
    its predicted loss (the weighted energy it drops: loss units with gradient statistics) and its cost in each
    currency a budget can be given in: stored parameters, bytes, predicted milliseconds (None where the mode
    does not price it). `storage` names the form ("dense", "low rank", "fp32", "int4 b32", ...); `rank` is the
    low rank or the correction's rank (0: none); `key` is the caller's handle for building it."""

    storage: str
    rank: int
    bytes: int | None
    loss: float
    key: object = field(default=None, compare=False)
    ms: float | None = field(default=None, compare=False)  # predicted time, when a latency model timed the site
    params: int | None = field(default=None, compare=False)  # stored numbers, when the budget is in parameters

    @property
    def label(self) -> str:
        if self.storage == LOW_RANK:
            return f"{LOW_RANK} {self.rank}"
        return self.storage if self.rank == 0 else f"{self.storage} + rank {self.rank}"


def by_params(option: Option) -> float:
    return option.params


def by_bytes(option: Option) -> float:
    return option.bytes


def by_ms(option: Option) -> float:
    return option.ms


CURRENCIES = {"parameters": by_params, "bytes": by_bytes, "ms": by_ms}  # report.budget's currency -> cost


def greedy(chains: list[list[tuple[float, float]]], spent: float, available: float,
           past_misfit: bool = True) -> list[int]:
    """The greedy rule `allocate` spends every budget by: each site has a chain of upgrades (extra cost, loss
    removed), in the budget's currency (parameters, bytes, milliseconds); repeatedly take, over all sites, the
    next upgrade with the most loss removed per unit of cost, while the total (from `spent`) stays within
    `available`. An upgrade that does not fit ends its site's chain (smaller upgrades of other sites may still
    fit) or, with past_misfit False, the whole run (the longest fitting prefix of that order). Returns how many
    upgrades each site took. Optimal for chains whose gain per cost falls along each chain (lower hulls,
    descending spectra) while everything fits; ties go to the lower site index."""
    taken = [0] * len(chains)
    heap = [(-gain / cost, i) for i, chain in enumerate(chains) if chain for cost, gain in chain[:1]]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        cost, _ = chains[i][taken[i]]
        if spent + cost > available:
            if not past_misfit:
                break
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
    """`allocate` over parameters: keep the block of components with the most weighted energy per parameter next.

    energies[i] holds site i's σ² in descending order, all in one currency (loss units for Fisher/K-FAC
    weighting). A block is rank_step(K, N, multiple) components (1 without `multiple`), so wide sites get ranks
    that are multiples of `multiple`. Every site starts at one block (at least `min_rank`), even when those
    alone pass the budget. When a site's next
    block would pass break-even, its next move is to turn dense, priced as what it is: all of its remaining
    energy for the few parameters left to break-even (priced as one more component, a site could end at its
    break-even rank, saving almost nothing and dropping its tail). The options are taken in rank order, not on
    their hull (`hull=False`): that dense move may remove more loss per parameter than the block before it.
    """
    steps = [rank_step(K, N, multiple) for K, N in shapes]
    start = [min(max(min_rank, step), break_even_rank(K, N)) for (K, N), step in zip(shapes, steps)]
    choices = [rank_options(np.asarray(e), K, N, r, step) for e, (K, N), r, step in zip(energies, shapes, start, steps)]
    picked = allocate(choices, budget, cost=by_params, hull=False)
    return [option.key for option in picked or [options[0] for options in choices]]  # None: the starts


def rank_options(energy: np.ndarray, K: int, N: int, rank: int, step: int) -> list[Option]:
    """A site's low-rank options from `rank` in blocks of `step` components, each priced in parameters with the
    energy it drops, while a block stays below break-even; then dense (nothing dropped). A truncated spectrum
    ends its options where it ends."""
    options = []
    while True:
        options.append(Option(LOW_RANK, rank, None, float(np.sum(energy[rank:])), key=rank, params=rank * (K + N)))
        if rank + step > break_even_rank(K, N):
            options.append(Option(DENSE, 0, None, 0.0, key=None, params=K * N))
            return options
        if rank >= len(energy):
            return options
        rank += step


def latency_options(energy: np.ndarray, total: float, table, max_rank: int) -> list[Option]:
    """A site's options under a latency budget: dense, and low rank at every measured rank up to `max_rank`
    and the spectrum's length, each priced in milliseconds by its table (dense_ms, ranks, factored_ms) with the
    energy it drops (total: ‖PWQ‖_F² when the spectrum is truncated)."""
    options = [Option(DENSE, 0, None, 0.0, key=None, ms=float(table.dense_ms))]
    for rank, ms in zip(table.ranks, table.factored_ms):
        if rank <= min(len(energy), max_rank):
            dropped = max(total - float(np.sum(energy[:rank])), 0.0)
            options.append(Option(LOW_RANK, rank, None, dropped, key=rank, ms=float(ms)))
    return options


def latency_ranks(energies: list[np.ndarray], site_tables: list, target_ms: float,
                  totals: list[float] | None = None, max_ranks: list[int] | None = None) -> list[int | None]:
    """`allocate` over milliseconds: ranks whose summed site time fits `target_ms`, dropping the least weighted
    energy on the way (latency_options per site; site_tables[i] has dense_ms and the measured factored_ms at
    ranks, ascending; only ranks faster than dense lie on a hull). max_ranks: per site, default the spectrum's
    length; totals: ‖PWQ‖_F² per site when energies are truncated. Spent with `search=True`: the hull greedy up
    to its first misfit, then the time left over buys back the most energy it can, one site at a time (measured
    better than greedy past misfits: docs/architecture.md). When even the fastest choices do not fit, those are
    returned (the caller checks the time).
    """
    totals = totals or [float(np.sum(e)) for e in energies]
    max_ranks = max_ranks or [len(e) for e in energies]
    choices = [latency_options(np.asarray(e), t, table, m)
               for e, t, table, m in zip(energies, totals, site_tables, max_ranks)]
    picked = allocate_ms(choices, target_ms)
    if picked is None:
        picked = [lower_hull(options, by_ms)[0] for options in choices]
    return [option.key for option in picked]


def lower_hull(options: list[Option], cost=by_bytes) -> list[Option]:
    """The options worth having: cost ascending, loss strictly falling, and convex (each step removes less loss
    per unit of cost than the one before), so greedy upgrades along it are optimal for a concave benefit."""
    ordered = sorted(options, key=lambda o: (cost(o), o.loss))
    frontier: list[Option] = []
    for option in ordered:
        if frontier and option.loss >= frontier[-1].loss:
            continue  # costs at least as much for no less loss
        frontier.append(option)
    hull: list[Option] = []
    for option in frontier:
        while len(hull) >= 2 and _turn(hull[-2], hull[-1], option, cost) <= 0:
            hull.pop()
        hull.append(option)
    return hull


def _turn(a: Option, b: Option, c: Option, cost=by_bytes) -> float:
    """> 0 when a → b → c turns left in (cost, loss): b lies below the chord a–c, so it stays on the hull."""
    return (cost(b) - cost(a)) * (c.loss - a.loss) - (b.loss - a.loss) * (cost(c) - cost(a))


def allocate(choices: list[list[Option]], available: float, cost=by_bytes, *, hull: bool = True,
             search: bool = False, tolerance: float = 0.0) -> list[Option] | None:
    """One option per site with total cost (`cost`: by_params, by_bytes or by_ms) ≤ available and the least
    predicted loss `greedy` finds; None when even the first options do not fit.

    hull: each site's upgrades are the steps along its lower convex hull in (cost, loss), from its cheapest
    option; False: the options as given (cost ascending), each one step (global_ranks' rank blocks).
    search: stop at the first upgrade that does not fit, then spend what is left one site at a time on any of its
    options (spend_leftover); used by latency budgets, where it measured better than going past misfits.
    tolerance: a total within available × (1 + tolerance) fits (latency budgets: sums of measured milliseconds
    taken in another order differ in their last bits; bytes and parameters are counted exactly)."""
    available = available + tolerance * abs(available)
    paths = [lower_hull(options, cost) if hull else list(options) for options in choices]
    spent = sum(cost(path[0]) for path in paths)
    if spent > available:
        return None
    chains = [[(cost(path[j]) - cost(path[j - 1]), path[j - 1].loss - path[j].loss) for j in range(1, len(path))]
              for path in paths]
    picked = [path[n] for path, n in zip(paths, greedy(chains, spent, available, past_misfit=not search))]
    return spend_leftover(choices, picked, available, cost) if search else picked


# Milliseconds are sums of measured floats; one budget met exactly in one summation order is one rounding above it
# in another (the fake timer's exact times hit that). A relative 1e-9 is far below what any timing resolves.
MS_TOLERANCE = 1e-9


def allocate_ms(choices: list[list[Option]], available_ms: float) -> list[Option] | None:
    """The rule every latency budget is spent by: `allocate` in milliseconds with the leftover searched."""
    return allocate(choices, available_ms, cost=by_ms, search=True, tolerance=MS_TOLERANCE)


def spend_leftover(choices: list[list[Option]], picked: list[Option], available: float, cost=by_bytes
                   ) -> list[Option]:
    """Repeatedly take the single change of one site's option (to any of its options, on the hull or not) that
    lowers the predicted loss most while the total cost stays within `available`."""
    picked = list(picked)
    spent = float(sum(cost(option) for option in picked))
    if spent > available:
        return picked
    while True:
        best = None  # (loss removed, site, option)
        for i, options in enumerate(choices):
            now = picked[i]
            for option in options:
                gain = now.loss - option.loss
                if gain > 0 and spent - cost(now) + cost(option) <= available and (best is None or gain > best[0]):
                    best = (gain, i, option)
        if best is None:
            return picked
        _, i, option = best
        spent = spent - cost(picked[i]) + cost(option)
        picked[i] = option
