"""One byte budget across precisions and ranks (numpy only); the same rule spends a latency budget.

Each site (or embedding table) has options — dense fp32, int8, int4 at a block size, either of those plus a
rank-r correction, low rank alone — each with its bytes and its predicted loss (the dropped weighted energy,
in loss units with gradient statistics). The allocation is the greedy rule global rank allocation spends
parameters by (methods.allocation.greedy) over these options: start every site at its smallest option, then take
the upgrades with the most loss removed per byte until the budget is spent. Upgrades are the steps along each site's
lower convex hull in (bytes, loss), so per site they come in order of falling benefit per byte. With
`cost=by_ms` the currency is each option's predicted milliseconds instead (`--quantize ... --target-latency`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onnx_fwlr.methods.allocation import greedy


@dataclass(frozen=True)
class Option:
    """One way to store a site: `storage` names it (e.g. "fp32", "low rank", "int4 b32"), `rank` is the
    correction's rank (or the low rank), `key` is the caller's handle for building it."""

    storage: str
    rank: int
    bytes: int
    loss: float
    key: object = field(default=None, compare=False)
    ms: float | None = field(default=None, compare=False)  # predicted time, when a latency model timed the site

    @property
    def label(self) -> str:
        if self.storage == "low rank":
            return f"low rank {self.rank}"
        return self.storage if self.rank == 0 else f"{self.storage} + rank {self.rank}"


def rank_grid(K: int, N: int, step: int = 8) -> list[int]:
    """Correction ranks tried: multiples of `step` below min(K, N) (kernels like round ranks, docs/speed.md)."""
    return list(range(step, min(K, N), step))


def by_bytes(option: Option) -> float:
    return option.bytes


def by_ms(option: Option) -> float:
    return option.ms


def lower_hull(options: list[Option], cost=by_bytes) -> list[Option]:
    """The options worth having: cost (bytes, or `cost(option)`) ascending, loss strictly falling, and convex
    (each step removes less loss per unit of cost than the one before), so greedy upgrades along it are optimal
    for a concave benefit."""
    ordered = sorted(options, key=lambda o: (cost(o), o.loss))
    frontier: list[Option] = []
    for option in ordered:
        if frontier and option.loss >= frontier[-1].loss:
            continue  # costs at least as many bytes for no less loss
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


def minimum_bytes(choices: list[list[Option]]) -> int:
    """Bytes of the cheapest option of every site together."""
    return sum(min(o.bytes for o in options) for options in choices)


def allocate(choices: list[list[Option]], available: float, cost=by_bytes) -> list[Option] | None:
    """One option per site with total cost (bytes, or `cost(option)`) ≤ available and the least predicted loss
    the greedy rule finds (methods.allocation.greedy along each site's lower hull); None when even the cheapest
    options do not fit."""
    hulls = [lower_hull(options, cost) for options in choices]
    spent = sum(cost(h[0]) for h in hulls)
    if spent > available:
        return None
    chains = [[(cost(hull[j]) - cost(hull[j - 1]), hull[j - 1].loss - hull[j].loss) for j in range(1, len(hull))]
              for hull in hulls]
    return [hull[taken] for hull, taken in zip(hulls, greedy(chains, spent, available))]
