"""What factorisation can buy in latency, and what it did buy: `profile ORIGINAL --compare COMPRESSED`.

The original's time splits (ONNX Runtime's profiler, kernel time per run) into the factorised sites and
everything else. A factored site can at best run at its FLOP share of the dense op, and nothing else gets
faster, so the achievable latency ratio is

    (t_other + Σ t_site · flop_ratio_site) / t_total.

The measured ratio comes from the two models timed in alternating pairs in one process (order flipped every
pair), summarised by the median of the per-pair ratios with its 10th–90th percentiles: the mean of a few
hundred runs follows the slowest ones on a loaded machine.

Sites are matched by node name. The rewrite names a factorised site's nodes `<original node>/factor_A`,
`/factor_B`, `/bias_correction`, `/input_projection` (LSTM/GRU, which keep the original node) or
`/<structure>/...`, and ONNX Runtime's fusions name a fused node `<first node>/<Fusion>...` (Gemm + activation:
`fused <node>`); so a profiled node belongs to site `n` when it is `n` or starts with `n/`, after any `fused `
prefix (the longest such site wins).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.tables import format_table

PAIR_WARMUP = 5
FUSED = "fused "  # ONNX Runtime's name prefix for a Gemm fused with its activation (FusedGemm)
QUANT_SUFFIX = "_quant"  # quantize_dynamic names a quantized MatMul <node>_quant


# ---------------------------------------------------------------------------------------------------------
# Matching nodes to sites


def stem(site: str) -> str:
    """The name a site's new nodes are named under: the node's own name, less the `_quant` that ONNX Runtime's
    quantize_dynamic appends (an int8 input's `<node>_quant` is compressed into `<node>/factor_A_quant`, ...)."""
    return site.removesuffix(QUANT_SUFFIX)


def factorised_sites(original_flops: dict, compressed_flops: dict) -> list[str]:
    """Counted nodes of the original (MatMul/Gemm/MatMulInteger/LSTM/GRU) that the compressed model factorised:
    those with a new counted node named under them (`<node>/...`, `_quant` dropped) in the compressed model."""
    new_names = [name for name in compressed_flops if name not in original_flops]
    return sorted(site for site in original_flops if any(name.startswith(stem(site) + "/") for name in new_names))


def owner(node_name: str, sites_longest_first: list[str]) -> str | None:
    """The site a node (profiled or in the graph) belongs to: equal to it or named under it; None for none."""
    node_name = node_name.removeprefix(FUSED)
    for site in sites_longest_first:
        if node_name == site or node_name.startswith(stem(site) + "/"):
            return site
    return None


def per_site(values: dict, sites: list[str]) -> dict:
    """Sum {node name: value} (times or FLOPs) per site; the nodes of no site are summed under None."""
    ordered = sorted(sites, key=len, reverse=True)
    totals = {site: 0.0 for site in sites}
    totals[None] = 0.0
    for name, value in values.items():
        totals[owner(name, ordered)] += value
    return totals


# ---------------------------------------------------------------------------------------------------------
# The achievable ratio


def achievable_ratio(total_ms: float, site_ms: dict, flop_ratios: dict) -> float:
    """(t_other + Σ t_site · flop_ratio_site) / t_total, with t_other = t_total − Σ t_site."""
    if total_ms <= 0:
        raise FwlrError("The profile of the original recorded no kernel time; profile with more runs or a larger "
                        "input.")
    other = total_ms - sum(site_ms.values())
    return (other + sum(site_ms[site] * flop_ratios[site] for site in site_ms)) / total_ms


def speed_limits(original: dict, compressed: dict) -> dict:
    """Achievable vs kernel-time ratio and the per-site split, from two profile_model results (op_profile on).

    Keys: sites (one row per factorised site: node, dense_ms, factored_ms, time_ratio, flop_ratio), total_ms
    and other_ms of each model, site_ms (original), site_share, achievable_ratio, kernel_ratio,
    sites_time_ratio (Σ factored / Σ dense), sites_flop_ratio, other_time_ratio.
    """
    for result in (original, compressed):
        if "op_profile" not in result or "node_flops" not in result:
            raise RuntimeError("speed_limits needs profile_model results with op_profile and node_flops")
    sites = factorised_sites(original["node_flops"], compressed["node_flops"])
    times_a = per_site(original["op_profile"]["node_times"], sites)
    times_b = per_site(compressed["op_profile"]["node_times"], sites)
    flops_a = per_site(original["node_flops"], sites)
    flops_b = per_site(compressed["node_flops"], sites)
    flop_ratios = {site: flops_b[site] / flops_a[site] if flops_a[site] else 1.0 for site in sites}
    total_a = original["op_profile"]["kernel_time_ms"]
    total_b = compressed["op_profile"]["kernel_time_ms"]
    site_a = {site: times_a[site] for site in sites}
    rows = [
        {"node": site, "dense_ms": times_a[site], "factored_ms": times_b[site],
         "time_ratio": _quotient(times_b[site], times_a[site]), "flop_ratio": flop_ratios[site]}
        for site in sites
    ]
    dense_sum, factored_sum = sum(site_a.values()), sum(times_b[site] for site in sites)
    return {
        "sites": rows,
        "total_ms": {"original": total_a, "compressed": total_b},
        "other_ms": {"original": times_a[None], "compressed": times_b[None]},
        "site_ms": dense_sum,
        "site_share": _quotient(dense_sum, total_a),
        "achievable_ratio": achievable_ratio(total_a, site_a, flop_ratios) if sites else 1.0,
        "kernel_ratio": _quotient(total_b, total_a),
        "sites_time_ratio": _quotient(factored_sum, dense_sum),
        "sites_flop_ratio": _quotient(sum(flops_b[s] for s in sites), sum(flops_a[s] for s in sites)),
        "other_time_ratio": _quotient(times_b[None], times_a[None]),
    }


def _quotient(numerator, denominator):
    return numerator / denominator if denominator else None


# ---------------------------------------------------------------------------------------------------------
# The measured ratio: alternating pairs in one process


def median_upper_bound(values, z: float = 1.645) -> float:
    """A one-sided 95 % upper confidence bound of the median, distribution-free: the order statistic of rank
    n/2 + z·√n/2 (the binomial count of values below the median), so a claim "the median ratio is at most X"
    holds only when the pairs' noise allows it (tools/bench_quant.py's goals)."""
    ordered = np.sort(np.asarray(values, dtype=float))
    n = ordered.size
    rank = min(n, int(np.ceil(n / 2 + z * np.sqrt(n) / 2)))
    return float(ordered[rank - 1])


def ratio_summary(seconds_a, seconds_b) -> dict:
    """Median and 10th/25th/75th/90th percentiles of the per-pair ratios b/a, and each model's median (ms)."""
    a, b = np.asarray(seconds_a, dtype=float), np.asarray(seconds_b, dtype=float)
    if a.shape != b.shape or a.size == 0 or np.any(a <= 0):
        raise RuntimeError("ratio_summary needs equally many positive timings of each model")
    ratios = b / a
    p10, p25, p50, p75, p90 = (float(v) for v in np.percentile(ratios, [10, 25, 50, 75, 90]))
    return {"pairs": int(a.size), "ratio_p50": p50, "ratio_p10": p10, "ratio_p25": p25, "ratio_p75": p75,
            "ratio_p90": p90, "ratio_mean": float(ratios.mean()), "ratio_p50_upper": median_upper_bound(ratios),
            "original_p50_ms": float(np.median(a) * 1000.0), "compressed_p50_ms": float(np.median(b) * 1000.0)}


def _alternate(sessions, feed, runs) -> list[list[float]]:
    """Seconds per run of each session, run in alternating pairs (the first session first in even pairs)."""
    seconds = [[], []]
    for pair in range(runs):
        for index in ((0, 1) if pair % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            sessions[index].run(None, feed)
            seconds[index].append(time.perf_counter() - start)
    return seconds


def _paired_times(model_path, other_path, feed, runs, warmup, threads, providers, profile_runs=0):
    """Runs in the child: `runs` alternating pairs of plain sessions (ratio_summary), then, when profile_runs,
    `profile_runs` alternating pairs of profiled sessions, so both per-node profiles see the same load
    ("profiles": [parse_ort_profile of each])."""
    from onnx_fwlr.cost.profiling import _open_session, parse_ort_profile
    from onnx_fwlr.io import runtime

    paths = (model_path, other_path)
    options = runtime.session_options(threads=threads, quiet=False)
    sessions = [_open_session(path, options, providers) for path in paths]
    _alternate(sessions, feed, warmup)
    summary = ratio_summary(*_alternate(sessions, feed, runs))
    del sessions
    if profile_runs:
        with tempfile.TemporaryDirectory(prefix="fwlr_profile_") as folder:
            profiled = [_open_session(path, runtime.session_options(
                threads=threads, quiet=False, profile_prefix=os.path.join(folder, f"ort{i}")), providers)
                for i, path in enumerate(paths)]
            _alternate(profiled, feed, 1 + profile_runs)  # the first pair is warm-up, skipped when parsing
            summary["profiles"] = [parse_ort_profile(json.loads(Path(s.end_profiling()).read_text()), skip_runs=1)
                                   for s in profiled]
    return summary


def paired_ratio(model_path, other_path, feed, runs=100, warmup=PAIR_WARMUP, threads=None,
                 providers=("CPUExecutionProvider",), profile_runs=0) -> dict:
    """Time two models in alternating pairs in a fresh child process; see ratio_summary for the keys, and
    _paired_times for the per-node profiles of `profile_runs` alternating profiled pairs."""
    from onnx_fwlr.cost.profiling import run_in_child

    request = {
        "entry": f"{__name__}:_paired_times", "model_path": str(model_path), "other_path": str(other_path),
        "runs": runs, "warmup": warmup, "threads": threads, "providers": list(providers),
        "profile_runs": profile_runs, "input_names": list(feed),
    }
    return run_in_child(request, feed)


def compare_speed(model_path, other_path, feed, runs=100, warmup=10, threads=None,
                  providers=("CPUExecutionProvider",)) -> dict:
    """profile_model on both models (latency, memory, size, FLOPs), then one child that times them in
    alternating pairs and profiles them in alternating pairs, so the ratio and both per-node profiles see the
    same load; their speed limits. Returns {original, compressed, ratios, limits, paired}."""
    from onnx_fwlr.cost.profiling import PROFILED_RUNS, compare_profiles, profile_model

    options = {"runs": runs, "warmup": warmup, "threads": threads, "providers": providers, "op_profile": False}
    original = profile_model(model_path, feed, **options)
    compressed = profile_model(other_path, feed, **options)
    paired = paired_ratio(original["model"], compressed["model"], feed, runs=runs, warmup=min(warmup, PAIR_WARMUP),
                          threads=threads, providers=providers, profile_runs=PROFILED_RUNS)
    original["op_profile"], compressed["op_profile"] = paired.pop("profiles")
    limits = speed_limits(original, compressed)
    limits["unnamed_site_nodes"] = unnamed_site_nodes(onnx.load(str(model_path), load_external_data=False))
    return {"original": original, "compressed": compressed, "ratios": compare_profiles(original, compressed),
            "limits": limits, "paired": paired}


# ---------------------------------------------------------------------------------------------------------
# Text


def _fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_speed(limits: dict, paired: dict, top: int = 12) -> str:
    """The achievable and measured ratios, the split behind them and the slowest factorised sites."""
    total, other = limits["total_ms"], limits["other_ms"]
    count = len(limits["sites"])
    measured = paired["ratio_p50"]
    achievable = limits["achievable_ratio"]
    lines = [
        "Speed limit (ONNX Runtime profiler, kernel time per run)",
        (f"  original: {total['original']:.3f} ms in kernels, {limits['site_ms']:.3f} ms "
         f"({100 * (limits['site_share'] or 0):.1f}%) in the {count} factorised sites, "
         f"{other['original']:.3f} ms in everything else"),
        f"  achievable latency ratio {achievable:.3f} = (other + sum of site time x site FLOP ratio) / total",
        (f"  measured latency ratio {measured:.3f} (median of {paired['pairs']} alternating pairs; "
         f"p10-p90 {paired['ratio_p10']:.3f}-{paired['ratio_p90']:.3f}), {measured / achievable:.2f}x the achievable"),
        (f"  kernel time ratio {_fmt(limits['kernel_ratio'])}: factorised sites at {_fmt(limits['sites_time_ratio'])} "
         f"of their dense time (FLOP ratio {_fmt(limits['sites_flop_ratio'])}), everything else at "
         f"{_fmt(limits['other_time_ratio'])}"),
    ]
    if limits.get("unnamed_site_nodes"):
        lines.append(f"  {limits['unnamed_site_nodes']} matrix nodes of the original have no name, so their time "
                     f"counts as 'everything else'; name the nodes for a per-site split")
    if not count:
        lines.append("  no factorised site was matched by node name (nodes named <original node>/...), so the "
                     "achievable ratio counts every node as 'everything else'")
        return "\n".join(lines)
    rows = sorted(limits["sites"], key=lambda row: (-row["dense_ms"], row["node"]))[:top]
    table = format_table(
        ["site", "dense ms", "factored ms", "time ratio", "FLOP ratio"],
        [[row["node"], f"{row['dense_ms']:.3f}", f"{row['factored_ms']:.3f}",
          _fmt(row["time_ratio"]) + (" *" if _implausible(row) else ""), _fmt(row["flop_ratio"])] for row in rows],
        align="lrrrr",
    )
    more = f" ({count - top} more in the JSON)" if count > top else ""
    return "\n".join(lines + ["", f"Factorised sites, slowest first{more}", table] + reliability_notes(limits, paired))


# A per-site time ratio below this share of its FLOP ratio is not a kernel speed-up but a timing artefact; a
# paired p10-p90 spread above this share of the median means the machine's load moved the timings.
IMPLAUSIBLE_SHARE = 0.5
WIDE_SPREAD = 0.25


def _implausible(row: dict) -> bool:
    return row["time_ratio"] is not None and row["time_ratio"] < IMPLAUSIBLE_SHARE * row["flop_ratio"]


def reliability_notes(limits: dict, paired: dict) -> list[str]:
    """Warnings when the per-site ratios cannot be read as measured speed: a wide spread of the paired ratios
    (load), or sites whose factored time is far below their FLOP share (marked *)."""
    notes = []
    spread = (paired["ratio_p90"] - paired["ratio_p10"]) / paired["ratio_p50"] if paired["ratio_p50"] else 0.0
    if spread > WIDE_SPREAD:
        notes.append(f"warning: the paired ratios spread over {100 * spread:.0f}% of their median (p10-p90), so "
                     "the machine's load moved the timings: per-site ratios are unreliable; rerun with more --runs "
                     "on a quieter machine.")
    odd = [row["node"] for row in limits["sites"] if _implausible(row)]
    if odd:
        notes.append(f"warning: {len(odd)} site(s) (*) took less than {IMPLAUSIBLE_SHARE:g} of their FLOP share "
                     "of the dense time, more than a smaller matrix product can save: a timing artefact (load, or "
                     "time the profiler gave to another node), not a speed-up; rerun to check.")
    return notes


def unnamed_site_nodes(model: onnx.ModelProto) -> int:
    """Counted main-graph nodes without a name: the profiler names them itself, so their time is not matched."""
    from onnx_fwlr.cost.flops import COUNTED_OPERANDS

    return sum(1 for node in model.graph.node if node.op_type in COUNTED_OPERANDS and not node.name)
