"""Budgets: how much the factorised weights may keep, and one rank per site under it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import external_bytes, message_bytes
from onnx_fwlr.methods import allocation as alloc
from onnx_fwlr.pipeline.prepare import Prepared, ensure_decompositions
from onnx_fwlr.sites.find import Site

ALLOCATIONS = ("uniform", "global")
BUDGETS = ("ratio", "rank", "target_size", "max_error", "target_latency")  # exactly one per compression


@dataclass
class Budget:
    """How much the factorised weights may keep. Exactly one of ratio, rank, target_size, max_error."""

    ratio: float | None = None  # parameters kept / original parameters of the factorisable weights
    rank: int | None = None  # one rank for every site
    target_size: int | None = None  # bytes of the output model
    max_error: float | None = None  # largest relative L2 output error allowed on validation data
    ranks: dict = field(default_factory=dict)  # per-site overrides: site, node or weight name -> rank
    target_latency: float | None = None  # fraction of the original's measured latency (pipeline/speed.py)

    def check(self) -> None:
        _check_types(self)
        given = [n for n in BUDGETS if getattr(self, n) is not None]
        if len(given) > 1:
            raise FwlrError(f"{' and '.join(f'`{g}`' for g in given)} given together; pass one budget.")
        if not given and not self.ranks:
            raise FwlrError(("no budget given; pass `ratio` (0 < R <= 1), `rank`, `target_size`, `max_error` or "
                             "`target_latency`."))
        if self.ratio is not None and not (0 < self.ratio <= 1):
            raise FwlrError(f"`ratio` {self.ratio} is out of range; it must satisfy 0 < ratio <= 1.")
        if self.rank is not None and self.rank < 1:
            raise FwlrError(f"`rank` {self.rank} is out of range; it must be a positive integer.")
        if self.target_size is not None and self.target_size <= 0:
            raise FwlrError(f"`target_size` {self.target_size} is out of range; give a positive number of bytes.")
        if self.target_latency is not None and not (0 < self.target_latency <= 1):
            raise FwlrError(f"`target_latency` {self.target_latency} is out of range; give the fraction of the "
                            "original's latency to reach, 0 < F <= 1.")
        if self.max_error is not None and not (self.max_error > 0):
            raise FwlrError(f"`max_error` {self.max_error} is out of range; give a positive relative error.")
        for name, rank in self.ranks.items():
            if int(rank) < 1:
                raise FwlrError(f"`rank` {name}={rank} is out of range; ranks are positive integers.")

    def describe(self) -> dict:
        data = {k: getattr(self, k) for k in BUDGETS if getattr(self, k) is not None}
        if self.ranks:
            data["ranks"] = dict(self.ranks)
        return data


class RankChoice(list):
    """The ranks choose_ranks picked (a list: one rank per site, None = dense), with why some sites stay dense:
    `notes` (site index -> sentence for its report row) and `warnings` (sentences for the whole report)."""

    def __init__(self, ranks=(), notes: dict | None = None, warnings: list | None = None):
        super().__init__(ranks)
        self.notes = dict(notes or {})
        self.warnings = list(warnings or [])


def choose_ranks(prepared: Prepared, budget: Budget, allocation: str,
                 multiple: int | None = alloc.DEFAULT_RANK_MULTIPLE) -> RankChoice:
    """One rank per site (None = dense) under the budget; per-site overrides are honoured first.

    Ranks allocated under `ratio` or `target_size` come in steps of `multiple` on sites wide enough for it
    (alloc.rank_step; 1 or None: any rank), which the kernels run at their FLOP share; `rank` and per-site
    overrides are taken as given.

    A budget that allows every weight as it is (a ratio of 1, or a target size the model already meets)
    keeps every free site dense: nothing to do. Uniform allocation keeps dense a site whose rank would fall
    below alloc.MIN_UNIFORM_RANK and takes its cost from the other sites (floored_uniform_ranks).
    """
    sites = prepared.sites
    ranks, free = _fixed_ranks(sites, budget.ranks)
    shapes = [(sites[i].K, sites[i].N) for i in free]
    if budget.rank is not None:
        chosen = [alloc.clamp_rank(K, N, min(budget.rank, min(K, N))) for K, N in shapes]
    elif budget.ratio is None and budget.target_size is None:
        chosen = [None] * len(free)  # only overrides were given: the other sites stay dense
    else:
        ratio = budget.ratio if budget.ratio is not None else ratio_for_size(prepared, budget.target_size, ranks, free)
        target = ratio * sum(K * N for K, N in shapes)
        if ratio >= 1:
            chosen = [None] * len(free)
            ranks.notes.update({i: "" for i in free})  # the warning says why, once
            ranks.warnings.append("the budget allows every weight as it is (a ratio of 1, or a "
                                  "target size the model already meets), so every site stays dense.")
        elif allocation == "global":
            if any(prepared.site_methods[sites[i].weight] != prepared.method for i in free):
                raise FwlrError("`allocation` global needs gradient statistics for every site; some have none "
                                "(inside subgraphs?): use `allocation` uniform or `exclude` them.")
            ensure_decompositions(prepared)  # global allocation compares whole spectra: exact SVDs
            energies = [prepared.decompositions[sites[i].weight].energy for i in free]
            chosen = alloc.global_ranks(energies, shapes, target, multiple=multiple)
            if not _within(shapes, chosen, target):
                _say_fine_steps(ranks, multiple)
                chosen = alloc.global_ranks(energies, shapes, target)
            ranks.notes.update({i: "kept dense: global allocation found its components worth more loss than the "
                                   "parameters factorising would save" for i, r in zip(free, chosen) if r is None})
        else:
            uniform = alloc.floored_uniform_ranks(shapes, ratio, multiple=multiple)
            if not _within(shapes, uniform[0], target):
                _say_fine_steps(ranks, multiple)
                multiple = None
                uniform = alloc.floored_uniform_ranks(shapes, ratio)
            chosen = _floored_uniform(ranks, free, shapes, ratio, multiple, uniform)
    for i, r in zip(free, chosen):
        ranks[i] = r
    return ranks


def _fixed_ranks(sites: list[Site], overrides: dict) -> tuple[RankChoice, list[int]]:
    """The per-site overrides as valid ranks (every other site None), and the indices of the free sites."""
    fixed = _rank_overrides(sites, overrides)
    ranks = RankChoice([None] * len(sites))
    for i, r in fixed.items():
        ranks[i] = alloc.clamp_rank(sites[i].K, sites[i].N, min(r, min(sites[i].K, sites[i].N)))
    return ranks, [i for i in range(len(sites)) if i not in fixed]


def _within(shapes, ranks, target: float) -> bool:
    """Whether `ranks` keep at most `target` parameters (a relative 1e-9 for the float target's rounding)."""
    return sum(alloc.site_params(K, N, r) for (K, N), r in zip(shapes, ranks)) <= target * (1 + 1e-9)


def _say_fine_steps(choice: RankChoice, multiple: int | None) -> None:
    """Rank steps give way to the budget: when one step per wide site already passes it, every rank is free
    (a budget is a promise; the steps only make the kernels a little faster). Says so once in `choice`."""
    if multiple and multiple > 1:
        choice.warnings.append(
            f"the budget is below one rank step of {multiple} on some sites, so ranks come in steps of 1 "
            f"(ranks off multiples of {multiple} run a little slower than their FLOP share: docs/speed.md).")


def check_reachable(prepared: Prepared, budget: Budget) -> None:
    """Refuse a `ratio` or `target_size` that rank 1 on every site already passes, from the sites' shapes
    alone (call it before any statistics): such a run could only write a model bigger than asked."""
    if budget.rank is not None or (budget.ratio is None and budget.target_size is None) or not prepared.sites:
        return
    sites = prepared.sites
    ranks, free = _fixed_ranks(sites, budget.ranks)
    if not free:
        return
    ratio = budget.ratio if budget.ratio is not None else ratio_for_size(prepared, budget.target_size, ranks, free)
    short = rank_one_shortfall([sites[i] for i in free], ratio)
    if short is None:
        return
    smallest, total = short
    if budget.ratio is not None:
        raise FwlrError(f"`ratio` {budget.ratio} is below what rank 1 on every factorised site keeps ({smallest:,} of "
                        f"{total:,} parameters); give a `ratio` of at least {least_ratio(smallest, total):g}, or "
                        "`exclude` sites.")
    _, _, itemsize = _size_terms(prepared, ranks, free)
    least = budget.target_size + math.ceil((smallest - ratio * total) * itemsize)
    raise FwlrError(f"`target_size` {budget.target_size:,} bytes is too small: rank 1 on every factorised site "
                    f"already makes the model about {least:,} bytes; give at least that, or `exclude` sites.")


def rank_one_shortfall(sites: list[Site], ratio: float) -> tuple[int, int] | None:
    """(parameters of rank 1 on every site, the sites' parameters) when that keeps more than `ratio` of them
    (no rank meets the ratio), else None."""
    shapes = [(site.K, site.N) for site in sites]
    smallest = [alloc.clamp_rank(K, N, 1) for K, N in shapes]
    if ratio >= 1 or _within(shapes, smallest, ratio * sum(K * N for K, N in shapes)):
        return None
    return sum(alloc.site_params(K, N, r) for (K, N), r in zip(shapes, smallest)), sum(K * N for K, N in shapes)


def least_ratio(smallest: int, total: int) -> float:
    """The smallest ratio, rounded up to 4 decimals, that keeps `smallest` of `total` parameters."""
    return math.ceil(smallest / total * 1e4) / 1e4


def _floored_uniform(choice: RankChoice, free: list[int], shapes, ratio: float, multiple: int | None, uniform
                     ) -> list[int | None]:
    """Uniform ranks with the floor (`uniform`: alloc.floored_uniform_ranks at `multiple`); says in `choice` which
    sites it kept dense, or that the budget is too small to keep them dense."""
    chosen, floored = uniform
    floor = alloc.MIN_UNIFORM_RANK
    for j in floored:
        rank = alloc.uniform_ranks([shapes[j]], ratio, multiple)[0]
        choice.notes[free[j]] = (f"kept dense: its uniform rank {rank} is below the floor of {floor}, where one layer "
                                 "alone loses most of the model's quality; the other sites pay for it")
    low = [j for j, r in enumerate(chosen) if r is not None and r < floor]
    if low:
        choice.warnings.append(
            f"{len(low)} site(s) got uniform ranks below {floor}, where one layer alone loses most of the model's "
            "quality, and the budget is too small to keep them dense; give a larger `ratio`, or `calibration` data for "
            "loss-unit global allocation.")
    return chosen


def _check_types(budget: Budget) -> None:
    """Numbers where numbers belong: ratio="0.5" from Python is a mistake to name, not a TypeError to show."""
    numbers = {"ratio": Real, "max_error": Real, "target_latency": Real, "rank": Integral, "target_size": Integral}
    for name, kind in numbers.items():
        value = getattr(budget, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            wanted = "a whole number" if kind is Integral else "a number"
            raise FwlrError(f"`{name}` must be {wanted}, not the {type(value).__name__} {value!r}.")


def _rank_overrides(sites: list[Site], overrides: dict) -> dict[int, int]:
    """Map override names (site, node or weight) to site indices; an unknown name is an error."""
    found = {}
    for name, rank in overrides.items():
        matches = [i for i, s in enumerate(sites) if name in {s.name, s.weight} | {u.node_name for u in s.uses}]
        if not matches:
            known = ", ".join(s.name for s in sites[:8]) + (" ..." if len(sites) > 8 else "")
            raise FwlrError(f"`rank` {name}={rank}: no site is named '{name}'; sites are: {known}.")
        for i in matches:
            found[i] = int(rank)
    return found


def ratio_for_size(prepared: Prepared, target_size: int, ranks, free) -> float:
    """The parameter ratio of the free sites that makes the output about `target_size` bytes."""
    base_bytes, free_params, free_itemsize = _size_terms(prepared, ranks, free)
    available = target_size - base_bytes
    if available <= 0 or free_params == 0:
        raise FwlrError(
            f"`target_size` {target_size:,} bytes is too small: the model without its factorisable weights already "
            f"takes about {base_bytes:,} bytes."
        )
    return min(1.0, available / (free_params * free_itemsize))


def _size_terms(prepared: Prepared, ranks, free) -> tuple[int, int, int]:
    """(bytes of everything but the free sites' weights, the free sites' parameters, their item size): the
    output's size is about the first plus ratio × the second × the third."""
    itemsize = {"float16": 2, "bfloat16": 2, "float64": 8}
    dense_bytes = message_bytes(prepared.model) + external_bytes(prepared.model)
    fixed_bytes = 0
    for i, site in enumerate(prepared.sites):
        size = itemsize.get(site.dtype, 4)
        dense_bytes -= site.params * size
        if i not in free:
            fixed_bytes += alloc.site_params(site.K, site.N, ranks[i]) * size
    free_params = sum(prepared.sites[i].params for i in free)
    free_itemsize = itemsize.get(prepared.sites[free[0]].dtype, 4) if free else 4
    overhead = 600 * len(prepared.sites)  # new node and initializer records, names, bias corrections (measured bound)
    return dense_bytes + fixed_bytes + overhead, free_params, free_itemsize


def budget_record(currency: str | None, options, report, model_bytes: tuple[int | None, int | None] | None = None
                  ) -> dict:
    """The part of `report.budget` every mode fills the same way (the mode's own details stay beside it):

    currency  what the budget counted (RunConfig.currency; "bytes" for `ratio`/`target_size` of an already-quantized
              input, which count its bytes): "parameters", "bytes", "milliseconds", "output error", or None
              (fixed ranks or schemes, no budget to spend)
    target    the limit in that currency: parameters (`ratio` × the sites' parameters), bytes of the model,
              the model's predicted milliseconds at the timing size (`target_latency` × the original's), or
              the largest relative output error; None without one
    spent     what the result costs in that currency: the sites' parameters, the model's bytes, its predicted
              milliseconds (the tables' prediction; the measured ratio is in `speed`), or the relative output
              error measured on the validation data; None without a budget
    totals    every currency the run counted, {"before": ..., "after": ...}: parameters (the sites'), bytes (of
              the model, when the run counted them), milliseconds (predicted, when the run timed the sites)

    `options` is the run's BudgetOptions; `model_bytes` (before, after) when the run did not count bytes itself
    but the budget was in bytes."""
    details = report.budget
    totals = {"parameters": {"before": report.site_params_before, "after": report.site_params_after}}
    if "bytes_before" in details:  # the quantized path counts the model's bytes
        totals["bytes"] = {"before": details["bytes_before"], "after": details["bytes_after"]}
    elif model_bytes is not None:
        totals["bytes"] = {"before": model_bytes[0], "after": model_bytes[1]}
    speed = details.get("speed") or {}
    if "sites_ms" in speed and speed.get("site_share"):
        before = speed["sites_ms"] / speed["site_share"]  # the sites' dense time over their profiled share
        totals["milliseconds"] = {"before": before, "after": speed["predicted_ratio"] * before}
    target = spent = None
    if currency == "parameters" and options.ratio is not None:
        target, spent = options.ratio * report.site_params_before, report.site_params_after
    elif currency == "parameters":
        spent = report.site_params_after
    elif currency == "bytes" and "bytes" in totals:
        target = options.target_size if options.target_size is not None else (
            options.ratio * totals["bytes"]["before"] if options.ratio is not None else None)
        spent = totals["bytes"]["after"]
    elif currency == "milliseconds" and "milliseconds" in totals:
        target = options.target_latency * totals["milliseconds"]["before"]
        spent = totals["milliseconds"]["after"]
    elif currency == "output error":
        target = options.max_error
        found = [h["rel_error"] for h in details.get("search", []) if h["ratio"] == details.get("ratio_found")]
        spent = found[0] if found else None
    return {"currency": currency, "target": target, "spent": spent, "totals": totals}
