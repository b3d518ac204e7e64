"""Ranks chosen for speed: `--rank-multiple` (round to ranks the kernels like) and `--target-latency` (ranks
under a latency budget), both from the measured latency model of cost/latency.py.

The latency model times each site's dense op and factored pair at the model's own row count (one batch of
the calibration data, or --shape); the share of the original's time the sites take comes from ONNX
Runtime's profiler. A target latency F (a fraction of the original's) leaves the sites
    Σ t_site(rank) ≤ Σ t_site(dense) · (F − (1 − share)) / share,
which methods.allocation.latency_ranks fills greedily by loss per millisecond saved.

An already-quantized int8 input (quantize_dynamic) is factorised in float and requantized, so its sites are
timed in the latency model's "int8" form (dense and pair both int8) and its share is profiled on the input as
given (InputForms). When no site's factored form is faster than its dense op, nothing is factorised and the
run stops with one sentence: a model that is not faster is never written when speed was asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_fwlr.cost import latency as lat
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.methods import allocation as alloc
from onnx_fwlr.pipeline.prepare import Prepared, ensure_decompositions


def timing_feed(model, calibration, batch_size: int, shapes: dict | None) -> dict:
    """One batch at the size the model will be timed at: synthetic inputs of the --shape sizes when given (the
    size you deploy), else the first calibration batch (a file or a folder)."""
    from onnx_fwlr.io.data import open_data

    if shapes:
        from onnx_fwlr.cost.profiling import synthetic_feed

        return synthetic_feed(model, shapes)
    if isinstance(calibration, (str, os.PathLike)) and calibration != "random":
        feed, _ = next(iter(open_data(calibration, model, batch_size=batch_size)))
        return feed
    raise FwlrError("`rank_multiple` auto and `target_latency` time the model at its input size; pass the "
                    "calibration data as a file (`calibration`) or give the size with `shapes`AME:D0,D1,...")


@dataclass
class InputForms:
    """The form each site runs in once compress is done, and the model whose profile gives the sites' share of
    the time: for a float input, fp32 in the model itself; for an int8 dynamic input (requantized after
    factorising), "int8" in the input as given, whose nodes for those sites are the quantized ones."""

    model: onnx.ModelProto
    int8: dict[str, str] = field(default_factory=dict)  # float node name -> the quantized node in `model`

    def forms(self, sites) -> list[str]:
        return [lat.INT8 if any(u.node_name in self.int8 for u in s.uses) else lat.FP32 for s in sites]

    def nodes(self, sites) -> list[str]:
        return sorted({self.int8.get(name, name) for name in lat.site_nodes(sites)})


def input_forms(model, quantized) -> InputForms | None:
    """InputForms of an already-quantized input (pipeline.quantized_input.QuantizedInput; None: a float input).
    Only int8 dynamic sites have a latency form; another quantized scheme stops the speed options here."""
    from onnx_fwlr.io.model import load_model

    if quantized is None:
        return None
    sites = quantized.dequantized.sites
    other = sorted({s.describe() for s in sites if s.scheme.format not in ("dynamic", "dynamic_lstm")})
    if other:
        raise FwlrError(f"`rank_multiple` auto and `target_latency` time float and int8 dynamic (quantize_dynamic) "
                        f"weights, and this model holds {other[0]} weights; drop the speed option, or compress the "
                        "float original.")
    int8 = {name: s.node for s in sites if s.scheme.format == "dynamic" for name in s.float_nodes}
    return InputForms(load_model(model), int8)


def _cannot_pay(ratios: list[float], quantized: bool, where: str) -> str:
    """The one sentence when no site's factored form is faster than its dense op here."""
    pair, dense = ("int8 pair", "int8 dense op") if quantized else ("factored pair", "dense op")
    model, advice = (("int8 model", "keep the int8 model, or compress the float original") if quantized else
                     ("model", "keep the original, or quantize it (`quantize` int8)"))
    low, high = f"{min(ratios):.2f}", f"{max(ratios):.2f}"
    span = low if low == high else f"{low}-{high}"
    return (f"Factorisation cannot pay on this {model} at this size on this machine: {where} each site's {pair} "
            f"takes {span}x its {dense}'s time, so nothing was written; {advice}.")


def sites_budget_ms(target: float, share: float, dense_ms: float) -> float:
    """Milliseconds the sites (`dense_ms` as they are, a `share` of the model's time) may take for the model to
    run at `target` × its time: the rest of the model does not shrink. Negative when out of reach."""
    return dense_ms * (target - (1.0 - share)) / share if share > 0 else -1.0


def predicted_ratio(sites_ms: float, share: float, dense_ms: float) -> float:
    """The model's latency ratio when its sites take `sites_ms` instead of `dense_ms` (the rest unchanged)."""
    return 1.0 - share + share * sites_ms / dense_ms


def _energies(prepared: Prepared, indices: list[int]) -> tuple[list[np.ndarray], list[float], list[int]]:
    """Per site: σ² (loss units with gradient statistics), the total energy, and the highest rank it can take
    (factors held by the decomposition, and fewer parameters than dense)."""
    sites = [prepared.sites[i] for i in indices]
    decompositions = [prepared.decompositions[s.weight] for s in sites]
    max_ranks = [min(d.max_rank, alloc.break_even_rank(s.K, s.N)) for s, d in zip(sites, decompositions)]
    return [d.energy for d in decompositions], [d.total for d in decompositions], max_ranks


def _upper_ranks(prepared: Prepared, ranks, multiple: int | None) -> list[int | None]:
    """The highest rank rounding may move each site to, so its decomposition holds that many components."""
    upper = []
    for site, rank in zip(prepared.sites, ranks):
        if rank is None:
            upper.append(None)
            continue
        step = max(lat.GRID_STEP, rank // 8, multiple or 0)
        upper.append(min(rank + step, min(site.K, site.N)))
    return upper


def round_for_speed(prepared: Prepared, ranks, multiple, latency=None, feed=None, forms: InputForms | None = None
                    ) -> tuple[list, dict]:
    """Ranks rounded to kernel-friendly values (cost.latency.round_ranks); with multiple "auto", the
    multiple and the rounding come from the measured tables (in each site's form, `forms`), and a site whose
    factored form is not faster than its dense op stays dense (its time ratio at the rank kept in the info).
    Returns (ranks, what was done for the report)."""
    measured = multiple == "auto"
    if not measured and (not isinstance(multiple, int) or multiple < 1):
        raise FwlrError(f"`rank_multiple` {multiple} is out of range; give a positive integer or 'auto'.")
    indices = [i for i, r in enumerate(ranks) if r is not None]
    ensure_decompositions(prepared, _upper_ranks(prepared, ranks, lat.MULTIPLES[-1] if measured else multiple))
    energies, totals, max_ranks = _energies(prepared, indices)
    tables = [None] * len(indices)
    if measured:
        forms = forms or InputForms(prepared.model)
        all_tables = latency.tables(prepared.model, prepared.sites, feed, forms.forms(prepared.sites))
        tables = [all_tables[i] for i in indices]
        timed = [t for t in tables if t is not None]
        multiple = lat.default_rank_multiple(timed) if timed else 1
    chosen = lat.round_ranks([ranks[i] for i in indices], energies, tables if measured else None,
                             multiple=multiple if multiple > 1 else None, totals=totals, max_ranks=max_ranks)
    new = list(ranks)
    for i, rank in zip(indices, chosen):
        new[i] = rank
    info = {"rank_multiple": multiple, "measured": measured,
            "rounded": {prepared.sites[i].name: [ranks[i], new[i]] for i in indices if new[i] != ranks[i]}}
    if measured:
        slower = lat.slower_than_dense([new[i] for i in indices], tables)
        info["kept_dense"] = [prepared.sites[indices[k]].name for k in slower]
        info["kept_dense_ratios"] = [tables[k].time(chosen[k]) / tables[k].dense_ms for k in slower]
        info["int8"] = bool(forms.int8)
        for k in slower:
            new[indices[k]] = None
        info["predicted_sites_ratio"] = _sites_ratio(new, all_tables)
    return new, info


def _sites_ratio(ranks, tables) -> float | None:
    timed = [(r, t) for r, t in zip(ranks, tables) if t is not None]
    dense = sum(t.dense_ms for _, t in timed)
    return lat.predicted_ms(*zip(*timed)) / dense if timed and dense > 0 else None


def latency_budget_ranks(prepared: Prepared, target: float, fixed: dict[int, int | None], latency, feed,
                         forms: InputForms | None = None) -> tuple[list, dict]:
    """Ranks whose predicted latency is `target` × the original's: sites with a table (in their form, `forms`)
    are allocated by methods.allocation.latency_ranks in loss units; `fixed` ({site index: rank}) and sites
    without a table (LSTM/GRU) keep their rank or stay dense. FwlrError when no site's factored form is faster
    than its dense op, or the target is out of reach. Returns (ranks, what was predicted for the report)."""
    sites = prepared.sites
    forms = forms or InputForms(prepared.model)
    tables = latency.tables(prepared.model, sites, feed, forms.forms(sites))
    timed = [i for i, t in enumerate(tables) if t is not None]
    free = [i for i in timed if i not in fixed]
    if not free:
        raise FwlrError("`target_latency` found no MatMul/Gemm site to time; it does not apply to this model.")
    fastest_pairs = [min(tables[i].factored_ms, default=np.inf) / tables[i].dense_ms for i in free]
    if min(fastest_pairs) >= 1.0:
        raise FwlrError(_cannot_pay(fastest_pairs, bool(forms.int8), "at its fastest timed rank,"))
    share = latency.site_share(forms.model, forms.nodes([sites[i] for i in timed]), feed)
    ranks: list[int | None] = [fixed.get(i) for i in range(len(sites))]
    dense_ms = sum(tables[i].dense_ms for i in timed)
    fixed_ms = sum(tables[i].time(fixed[i]) for i in timed if i in fixed)
    site_budget = sites_budget_ms(target, share, dense_ms) - fixed_ms
    fastest = sum(min([tables[i].dense_ms, *tables[i].factored_ms]) for i in free)
    best_ratio = predicted_ratio(fastest + fixed_ms, share, dense_ms)
    if site_budget < fastest:
        raise FwlrError(
            f"`target_latency` {target:g} cannot be reached: the factorisable sites take {100 * share:.0f}% of the "
            f"original's time on this machine, so factorising reaches about {best_ratio:.2f} at best; ask for "
            f"{best_ratio + 0.01:.2f} or more (or quantize).")
    ensure_decompositions(prepared)  # the budget compares whole spectra, as global allocation does
    energies, totals, max_ranks = _energies(prepared, free)
    chosen = alloc.latency_ranks(energies, [tables[i] for i in free], site_budget, totals=totals, max_ranks=max_ranks)
    for i, rank in zip(free, chosen):
        ranks[i] = rank
    predicted = predicted_ratio(lat.predicted_ms([ranks[i] for i in timed], [tables[i] for i in timed]), share,
                                dense_ms)
    info = {"target_latency": target, "site_share": share, "best_ratio": best_ratio, "sites_ms": dense_ms,
            "predicted_ratio": predicted, "tokens": sorted({tables[i].tokens for i in free}), "int8": bool(forms.int8)}
    return ranks, info


def speed_notes(info: dict) -> list[str]:
    """Plain sentences for the report."""
    notes = []
    if "target_latency" in info:
        notes.append(f"latency budget {info['target_latency']:g}: the sites take {100 * info['site_share']:.0f}% of "
                     f"the original's time here; predicted latency ratio {info['predicted_ratio']:.3f} "
                     f"(best reachable {info['best_ratio']:.3f})")
    if info.get("measured"):
        notes.append(f"ranks rounded to multiples of {info['rank_multiple']} (measured); {len(info['rounded'])} moved")
    elif "rank_multiple" in info and info["rank_multiple"] > 1:
        notes.append(f"ranks in steps of {info['rank_multiple']} on sites wide enough for it (given)")
    if info.get("kept_dense"):
        notes.append(f"kept dense, their factored form is not faster here: {', '.join(info['kept_dense'])}")
    if info.get("int8"):
        notes.append("the int8 input's sites were timed as int8 (dense op and pair), the form they are requantized "
                     "to")
    return notes


def check_speed_options(budget, rank_multiple, method: str, structured: bool) -> None:
    """Fail before any work on a speed option that cannot apply."""
    from onnx_fwlr.methods.registry import METHODS

    if rank_multiple is None and budget.target_latency is None:
        return
    flag = "`target_latency`" if budget.target_latency is not None else "`rank_multiple`"
    if structured:
        raise FwlrError(f"{flag} works with plain low-rank methods; drop `method` kron, `methods` or `dope`.")
    if budget.max_error is not None:
        raise FwlrError(f"{flag} does not combine with `max_error`; pass one of them.")
    given = rank_multiple is not None and rank_multiple != "auto"
    if given and (not isinstance(rank_multiple, int) or rank_multiple < 1):
        raise FwlrError(f"`rank_multiple` {rank_multiple} is out of range; give a positive integer or 'auto'.")
    if budget.target_latency is not None:
        if rank_multiple is not None:
            raise FwlrError("`target_latency` already picks ranks the kernels run fast at; drop `rank_multiple`.")
        if not METHODS[method].loss_units:
            raise FwlrError("`target_latency` spends the budget in loss units and needs gradient statistics; use "
                            "`method` fwsvd or kfac with `calibration`.")


def choose_ranks_for_speed(prepared: Prepared, budget, allocation: str, rank_multiple, latency, calibration,
                           batch_size: int, shapes, forms: InputForms | None = None, feed=None
                           ) -> tuple[list, dict | None]:
    """budget.choose_ranks (ranks in steps of `rank_multiple` when given, else the default multiple), or the
    latency budget, or with `rank_multiple` "auto" the ranks rounded by measurement: (ranks, what was done or
    None).
    `forms`: input_forms of an already-quantized input (None: a float one). `feed`: the batch to time at
    (default timing_feed)."""
    from onnx_fwlr.pipeline.budget import Budget, choose_ranks

    if budget.target_latency is None and rank_multiple != "auto":  # ranks in steps of the given or default multiple
        if rank_multiple is None:
            return choose_ranks(prepared, budget, allocation), None
        return choose_ranks(prepared, budget, allocation, rank_multiple), {"rank_multiple": rank_multiple,
                                                                           "measured": False}
    if feed is None:
        feed = timing_feed(prepared.model, calibration, batch_size, shapes)
    latency = latency if latency is not None else lat.MeasuredLatency()
    if budget.target_latency is None:
        ranks, info = round_for_speed(prepared, choose_ranks(prepared, budget, allocation), rank_multiple, latency,
                                      feed, forms)
        if info.get("kept_dense") and all(r is None for r in ranks):
            raise FwlrError(_cannot_pay(info["kept_dense_ratios"], info["int8"], "at the ranks the budget gives,"))
        return ranks, info
    if any(prepared.site_methods[s.weight] != prepared.method for s in prepared.sites):
        raise FwlrError("`target_latency` needs gradient statistics for every site; some have none (inside "
                        "subgraphs?): `exclude` them.")
    overrides = choose_ranks(prepared, Budget(ranks=budget.ranks), allocation) if budget.ranks else []
    fixed = {i: r for i, r in enumerate(overrides) if r is not None}
    return latency_budget_ranks(prepared, budget.target_latency, fixed, latency, feed, forms)


def feed_shape(feed: dict) -> str:
    name, value = next(iter(feed.items()))
    return f"{name} {'x'.join(str(d) for d in np.shape(value))}"


def check_measured_speed(original, compressed, report, latency, calibration, batch_size: int, shapes,
                         feed=None) -> None:
    """When speed was asked for (`target_latency`, `rank_multiple` auto), time the result against the original
    at the timing size before anything is written: a model that measures no faster is refused with one
    sentence (the tables predict per site; this measures the whole graph, fusions and the other ops
    included). The measured ratio goes into the report beside the predicted one. `feed`: the batch to time
    at (default timing_feed)."""
    from onnx_fwlr.io.model import load_model

    latency = latency if latency is not None else lat.MeasuredLatency()
    if feed is None:
        structure = original if isinstance(original, onnx.ModelProto) else load_model(original, lazy=True)
        feed = timing_feed(structure, calibration, batch_size, shapes)
    measured = latency.model_ratio(original, compressed, feed)
    p50, p10, p90 = measured["ratio_p50"], measured["ratio_p10"], measured["ratio_p90"]
    speed = report.budget.setdefault("speed", {})
    speed.update(measured_ratio=p50, measured_p10=p10, measured_p90=p90, measured_pairs=measured["pairs"])
    where = f"at {feed_shape(feed)} on this machine"
    if p50 >= 1.0:
        raise FwlrError(
            f"Factorisation cannot pay here: the compressed model measures {p50:.2f}x the original's latency "
            f"(median of {measured['pairs']} alternating pairs, p10-p90 {p10:.2f}-{p90:.2f}) {where}, so nothing "
            "was written; keep the original, ask for a smaller model with `ratio`, or quantize it.")
    report.warnings.append(f"measured latency ratio {p50:.3f} (p10-p90 {p10:.3f}-{p90:.3f}, {measured['pairs']} "
                           f"alternating pairs) {where}")
