"""`quantize` under a latency budget (`--quantize MODE --target-latency F`): per site, the quant/plan option
with the least predicted loss per millisecond, each option timed in the form compress writes it in
(cost.latency):

    fp32 (the site left as it is)   the site's own form: fp32, or "int8" for an int8 dynamic input (requantized)
    low rank r                      the fp32 pair at rank r
    <scheme> [+ rank r]             "<scheme> + fp32": the main branch alone, or plus the correction of rank r

methods.allocation.allocate_ms spends milliseconds as allocate spends bytes or parameters, with the rule every
latency budget is spent by (search=True: the hull greedy up to its first misfit, then the time left over one
site at a time). The sites take a share s of the original's time (ONNX Runtime's profiler), so a target F
leaves them Σ t_site(as it is) · (F − (1 − s)) / s, as pipeline.speed.latency_budget_ranks does for ranks.
Kernels decide, not bits: on a 2-core CPU MatMulNBits int4 measures slower than fp32 and dynamic int8 fastest.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np

from onnx_fwlr.cost import latency as lat
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.methods.allocation import Option, allocate_ms
from onnx_fwlr.pipeline.speed import InputForms, predicted_ratio, sites_budget_ms
from onnx_fwlr.quant import plan


def option_form(option: Option, own_form: str) -> tuple[str, int | None]:
    """The latency form and rank (None: the form's dense op) an option is timed at."""
    if option.storage == plan.FP32:
        return own_form, None
    if option.storage == plan.LOW_RANK:
        return lat.FP32, option.rank
    return lat.correction_form(option.storage), option.rank or None


def timed_choices(model, sites, choices, latency, feed, forms: InputForms):
    """Every site's options with `ms` set, each site's table in its own form, and every table by (site, form)."""
    own = forms.forms(sites)
    needed = sorted({(i, own[i]) for i in range(len(sites))}
                    | {(i, option_form(o, own[i])[0]) for i, options in enumerate(choices) for o in options})
    found = latency.tables(model, [sites[i] for i, _ in needed], feed, [form for _, form in needed])
    tables = dict(zip(needed, found))
    untimed = [sites[i].name for (i, _), table in tables.items() if table is None]
    if untimed:
        raise FwlrError(f"`target_latency` times MatMul/Gemm sites of the main graph, and {untimed[0]} is not one "
                        "(inside a subgraph?); `exclude` it.")
    timed = []
    for i, options in enumerate(choices):
        row = []
        for option in options:
            form, rank = option_form(option, own[i])
            row.append(replace(option, ms=tables[(i, form)].time(rank)))
        timed.append(row)
    return timed, [tables[(i, own[i])] for i in range(len(sites))], tables


def scheme_ratios(tables: dict, baseline: list) -> dict[str, float]:
    """Per --quantize scheme, the mean over sites of its main branch alone over the site as it is."""
    ratios: dict[str, list[float]] = {}
    for (i, form), table in tables.items():
        if lat.is_correction_form(form):
            ratios.setdefault(lat.scheme_label(form), []).append(table.dense_ms / baseline[i].dense_ms)
    return {label: float(np.mean(values)) for label, values in sorted(ratios.items())}


def fastest_ratio(model, sites, choices, latency, feed, forms: InputForms, share: float | None = None) -> float:
    """The predicted latency ratio with every site at its fastest option: the least a latency budget reaches
    (an all-int8 model on CPUs where dynamic int8 is the fast kernel). A budget a little above it spends the
    rest on the options with the most loss removed per millisecond (bench_quant.py --targets fastest+2%)."""
    return _timed_sites(model, sites, choices, latency, feed, forms, share)[-1]


def _timed_sites(model, sites, choices, latency, feed, forms: InputForms, share: float | None = None):
    """The timed options, the sites as they are, every table, the sites' share of the time, their dense ms, the
    ms and predicted ratio of the fastest options. `share`: the sites' share when profiled already (a job
    profiles once, so a budget set from fastest_ratio is judged by the same share)."""
    if not sites:
        raise FwlrError("`target_latency` found no MatMul/Gemm site to quantize; it does not apply to this model.")
    timed, baseline, tables = timed_choices(model, sites, choices, latency, feed, forms)
    if share is None:
        share = latency.site_share(forms.model, forms.nodes(sites), feed)
    dense_ms = sum(t.dense_ms for t in baseline)
    fastest = sum(min(o.ms for o in options) for options in timed)
    return timed, baseline, tables, share, dense_ms, fastest, predicted_ratio(fastest, share, dense_ms)


def allocate_latency(model, sites, choices, target: float, latency, feed, forms: InputForms, quantize: str,
                     share: float | None = None) -> tuple[list[Option], dict]:
    """One option per site (of `choices`, quant.plan's) whose predicted latency is `target` × the original's
    with the least predicted loss; FwlrError when out of reach. Returns (options, what was predicted)."""
    timed, baseline, tables, share, dense_ms, fastest, best = _timed_sites(model, sites, choices, latency, feed, forms,
                                                                           share)
    ratios = scheme_ratios(tables, baseline)
    own = "int8" if forms.int8 else "fp32"
    available = sites_budget_ms(target, share, dense_ms)
    if best >= 1.0:
        measured = ", ".join(f"{label} x{r:.2f}" for label, r in ratios.items())
        raise FwlrError(f"`target_latency` {target:g} cannot be reached with `quantize` {quantize}: no option measures "
                        f"faster than the sites as they are on this machine (main branch against {own} per site: "
                        f"{measured}); " + ("drop `target_latency`." if quantize == "auto" else
                                            "try `quantize` auto, which times every scheme."))
    if available < fastest:
        raise FwlrError(f"`target_latency` {target:g} cannot be reached with `quantize` {quantize}: the quantized "
                        f"sites take {100 * share:.0f}% of the original's time on this machine, so their fastest forms "
                        f"reach about {best:.2f} at best; ask for {best + 0.01:.2f} or more.")
    chosen = allocate_ms(timed, available)
    predicted = predicted_ratio(sum(o.ms for o in chosen), share, dense_ms)
    info = {"target_latency": target, "site_share": share, "best_ratio": best, "predicted_ratio": predicted,
            "sites_ms": dense_ms,
            "tokens": sorted({t.tokens for t in baseline}), "own_form": own, "scheme_ratios": ratios,
            "sites": [{"site": s.name, "option": o.label, "ms": o.ms, "own_ms": t.dense_ms}
                      for s, o, t in zip(sites, chosen, baseline)]}
    return chosen, info


def latency_notes(info: dict) -> list[str]:
    """Plain sentences for the report: the budget, and which scheme the kernels here favour."""
    own = info["own_form"]
    notes = [f"latency budget {info['target_latency']:g}: the sites take {100 * info['site_share']:.0f}% of the "
             f"original's time here; predicted latency ratio {info['predicted_ratio']:.3f} (best reachable "
             f"{info['best_ratio']:.3f})"]
    ratios = info["scheme_ratios"]
    measured = ", ".join(f"{label} x{r:.2f}" for label, r in ratios.items())
    slower = [label for label, r in ratios.items() if r >= 1.0]
    verb = "measures" if len(slower) == 1 else "measure"
    kinds = Counter(_kind(row["option"], own) for row in info["sites"])
    corrected = Counter(_kind(row["option"], own) for row in info["sites"] if " + rank " in row["option"])
    chosen = ", ".join(f"{kind} for {n} site{'s' if n > 1 else ''}"
                       + (f" ({corrected[kind]} with a correction)" if corrected.get(kind) else "")
                       for kind, n in kinds.most_common())
    notes.append(f"main branch alone against {own} per site (mean): {measured}"
                 + (f" — {' and '.join(slower)} {verb} slower than {own} here" if slower else "")
                 + f"; chosen: {chosen}")
    return notes


def _kind(label: str, own: str) -> str:
    """An option's label without its rank: "int8 dynamic", "low rank", "fp32 as it is"."""
    if label == plan.FP32:
        return f"{own} as it is"
    return plan.LOW_RANK if label.startswith(plan.LOW_RANK) else label.split(" + ")[0]
