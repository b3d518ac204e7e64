"""Quantization with an importance-weighted low-rank correction, under one byte budget (docs/quantization.md).

    model, report = compress_quantized("model.onnx", quantize="int4", target_size=20_000_000,
                                       method="kfac", calibration="calib.npz")

Each site becomes deq(Q(W)) + A B with Q one of ONNX Runtime's quantizers and A B the weighted best rank-r
fit of the residual (quant.compensate); a byte budget is spread over every site and embedding table by
predicted loss per byte (methods.allocation.allocate). quantize "int4"/"int8" fixes the main branch's scheme and spends
the rest of the budget on correction ranks; "auto" lets each site choose among dense, int8, int4 (block sizes),
either with a correction, and low rank alone. A latency budget (`target_latency`) spends measured milliseconds
instead of bytes (pipeline.quantized_speed).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from onnx_fwlr.cost.latency import MeasuredLatency, OrtTimer
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.evaluate.language import is_language_model
from onnx_fwlr.evaluate.report import CORRECTION, LOW_RANK, Report, SiteResult, op_counts, relative_frobenius
from onnx_fwlr.io.data import open_data
from onnx_fwlr.io.model import (
    EXTERNAL_DATA_THRESHOLD,
    external_base,
    external_bytes,
    external_layout,
    load_model,
    message_bytes,
)
from onnx_fwlr.methods.allocation import Option, allocate
from onnx_fwlr.methods.registry import ACTIVATIONS, get_method, input_scaling, output_scaling
from onnx_fwlr.pipeline.budget import Budget
from onnx_fwlr.pipeline.decompose import spill_needed
from onnx_fwlr.pipeline.prepare import Prepared, prepare
from onnx_fwlr.pipeline.quantized_speed import allocate_latency, fastest_ratio, latency_notes
from onnx_fwlr.pipeline.quantized_store import LazyMetrics, SpillStore, StoredPlans
from onnx_fwlr.pipeline.speed import InputForms, timing_feed
from onnx_fwlr.quant import compensate, plan
from onnx_fwlr.quant.budget import minimum_bytes
from onnx_fwlr.quant.calibration import Pricing, collect_quant_stats
from onnx_fwlr.quant.embedding import Table, find_tables, table_array
from onnx_fwlr.quant.graph import Rewrite, rewrite, site_dtype
from onnx_fwlr.quant.ortquant import INT8_DYNAMIC, Scheme, check_block_size, nbits
from onnx_fwlr.sites.find import Site, Skipped, model_parameters
from onnx_fwlr.sites.recurrent import find_all_sites, is_recurrent
from onnx_fwlr.sites.tied import find_ties, retie
from onnx_fwlr.stats.activations import main_graph_tensors

logger = logging.getLogger(__name__)

QUANTIZE_MODES = ("int4", "int8", "auto")
EMBEDDING_MODES = ("auto", "keep", "int8", "int4")
INT8_KINDS = ("dynamic", "block")
FACTOR_DTYPES = {"float32": 4, "float16": 2}  # bytes per stored factor entry
AUTO_BLOCKS = (32, 128)
SITE_OVERHEAD = 600  # bytes of node and tensor records per rewritten site (names, attributes); corrected below
TABLE_OVERHEAD = 300
FIT_ATTEMPTS = 6
OUTLIER_COUNTS = (1, 4)  # dynamic int8 options: this many of the input's largest channels in float (issue 26)
TIED = " with its table"  # storage suffix of a tied head's options whose table reads the head's quantized numbers
LM_INT8_NOTE = ("a language model: `quantize` auto offers 8-bit weight-only MatMulNBits, not dynamic int8 (whose "
                "per-tensor activation rounding breaks a language model's activations, docs/llm.md).")


@dataclass
class QuantizeJob:
    """Everything that does not depend on the byte budget: the prepared model, the sites and tables with
    their metrics and candidate schemes, and (once computed) every option's bytes and predicted loss, so a
    sweep over budgets measures and decomposes once (prepare_quantized, then build_quantized per budget)."""

    prepared: Prepared
    sites: list[Site]
    skipped: list[Skipped]
    metrics: dict
    schemes: list[Scheme]
    quantize: str
    block_size: int
    int8: str
    rank_step: int
    bias_correction: bool
    alternate: int
    factors: str = "float16"  # correction factor storage: float16 behind a Cast ORT folds at load, or float32
    tables: list[Table] = field(default_factory=list)
    table_loss: dict = field(default_factory=dict)  # budgeted tables: name -> their TableStats (.loss(ΔT))
    rounding_variance: dict = field(default_factory=dict)  # weight -> dynamic int8's activation rounding variance
    rounding_loss: dict = field(default_factory=dict)  # weight -> predicted loss of dynamic int8's activation rounding
    outliers: tuple = ()  # dynamic int8 may take these counts of its largest input channels out of the rounding
    outlier_channels: dict = field(default_factory=dict)  # weight -> its input's channels, largest first
    outlier_variance: dict = field(default_factory=dict)  # (weight, count) -> rounding variance without those
    outlier_loss: dict = field(default_factory=dict)  # (weight, count) -> rounding loss with those channels in float
    rule_tables: dict = field(default_factory=dict)  # every table's scheme without a budget: name -> Scheme
    fixed_tables: dict = field(default_factory=dict)  # tables the budget does not choose for: name -> Scheme
    original_bytes: int = 0
    warnings: list = field(default_factory=list)
    choices: list | None = None
    feed: dict | None = None  # one batch at the size a latency budget times the sites at
    levels: dict = field(default_factory=dict)  # (weight, scheme label at level 0) -> levels.LevelChoice
    merge: bool = False  # corrections of sites reading one activation share a first factor (quant.graph)
    progress: bool = False  # progress bars (with ETA) over the sites while options and plans are computed
    plans: SpillStore = field(default_factory=lambda: SpillStore(spill=False))  # (weight, option label) -> SitePlan
    # (None: dense); builds reuse them; spilled to disk on large models (pipeline.quantized_store)
    plan_errors: dict = field(default_factory=dict)  # (weight, option label) -> the plan's weighted error
    totals: dict = field(default_factory=dict)  # weight -> ‖P W Q‖², once for every fit attempt
    ties: dict = field(default_factory=dict)  # head weight -> (sites.tied.Tie, its Table): one weight to the budget
    source: object = None  # pipeline.quantized_input.QuantizedInput when the model given is a quantized input's
    # float form: each site may stay as the input stored it, at the bytes it had there
    rewritten: Rewrite | None = None  # what the last build gave quant.graph.rewrite (float inputs: --also)
    share: float | None = None  # a latency budget: the sites' share of the original's time, profiled once

    def close(self, keep_plans: bool = False) -> None:
        """Remove what was spilled to disk (the stores also remove it when collected, and at exit)."""
        if not keep_plans:
            self.plans.close()
        if isinstance(self.metrics, LazyMetrics):
            self.metrics.store.close()

    def site_schemes(self, site: Site) -> list[Scheme]:
        """The schemes this site may use, each at the accuracy_level chosen for it, and dynamic int8 with its
        largest input channels in float where they were measured (`outliers`)."""
        usable = _usable_schemes(site, self.schemes)
        chosen = [s.at_level(self.levels[(site.weight, s.label)].level) if (site.weight, s.label) in self.levels
                  else s for s in usable]
        if INT8_DYNAMIC in usable:
            chosen += [INT8_DYNAMIC.with_outliers(k) for k in self.outliers
                       if (site.weight, k) in self.outlier_variance]
        return chosen

    def scheme_loss(self, site: Site) -> dict:
        """The loss a correction cannot remove, per scheme: dynamic int8's activation rounding."""
        loss = {INT8_DYNAMIC: self.rounding_loss.get(site.weight, 0.0)}
        loss.update({INT8_DYNAMIC.with_outliers(k): self.outlier_loss[(site.weight, k)] for k in self.outliers
                     if (site.weight, k) in self.outlier_loss})
        return loss


def compress_quantized(
    model, *, quantize: str = "int4", block_size: int = 32, target_size: int | None = None,
    ratio: float | None = None, rank: int = 0, method: str = "kfac", calibration=None, stats=None,
    embeddings: str = "auto", int8: str = "dynamic", factors: str = "float16", rank_step: int = 8,
    alternate: int = 0, bias_correction: bool | None = None, include: str | None = None, exclude: str | None = None,
    batch_size: int = 32, mask_input: str | None = None, shapes: dict | None = None,
    fisher_options: dict | None = None, progress: bool = True, target_latency: float | None = None, latency=None,
    input_forms=None, accuracy_level=None, level_timer=None, merge: bool = False, source=None,
    fallback: str | None = None, checked: bool = False, feed=None, stats_memory: int | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Quantize every selected MatMul/Gemm weight (and embedding table) with ONNX Runtime's quantizers and
    correct each weight's error with a low-rank term fitted in the method's metric.

    Without a budget every site takes `quantize`'s scheme plus a rank-`rank` correction. `target_size`
    (bytes of the output model) or `ratio` (of the input's bytes) spreads a budget by predicted loss per
    byte, which needs gradient statistics (method fwsvd or kfac). `embeddings`: "auto" budgets the tables
    too when calibration data is given (else follows `quantize`), or forces keep/int8/int4. `int8`:
    "dynamic" (quantize_dynamic per channel, MatMulInteger) or "block" (weight-only MatMulNBits, 8 bits).
    `factors` "float16" (default; measured to change no output digit that matters) stores the corrections at
    half the bytes, "float32" as they are computed. `alternate` > 0 refits Q on W − A B that
    many rounds, keeping the best (CALDERA/LQER). `target_latency` (a fraction of the original's latency, a
    budget of its own) picks per site by predicted loss per millisecond from the measured latency tables of
    each option's form (`latency`: cost.latency.MeasuredLatency by default, a fake in tests; the timing
    size is one `calibration` batch or `shapes`); `input_forms` (pipeline.speed.input_forms) when the model
    given was already int8 and this is its float form. `accuracy_level` of the int4/int8 MatMulNBits sites: 0
    (float compute), 4 (int8 activations where the check passes) or "auto" (per site, timed at the deployment
    rows with `level_timer`, cost.latency's timer interface; default `latency`'s) — default "auto" under a
    latency budget, else 0 (cost.levels). `merge`: corrections of sites reading one activation share their
    first factor (quant.graph.rewrite).

    `source` (pipeline.quantized_input.QuantizedInput): `model` is the float form of this quantized input.
    Budgets then count the input's bytes (`ratio` of the input file), every site may also stay exactly as
    the input stored it (at its bytes there), and a weight kept is quantized back with its own scheme.
    `fallback`: the method to use when `method` was a default whose gradients cannot run on this model
    (prepare's rule); a budget then compares sites by their activation-weighted output error, as the report
    says.
    `checked`: the caller (pipeline.run, through RunConfig) has checked every option already; `feed`: the batch
    a latency budget and the accuracy levels time at (default speed.timing_feed). `stats_memory`: bytes the
    gradient statistics may take; above it they are measured one group of sites per pass (prepare's rule), and
    each site's options are made in that order (pipeline.quantized_store).
    """
    if not checked:
        check_options(quantize, block_size, method, embeddings, int8, factors, rank_step, alternate)
        check_budget(quantize, method, target_size, ratio, rank, target_latency)
    if accuracy_level is None:
        accuracy_level = "auto" if target_latency is not None else 0
    if level_timer is None and accuracy_level == "auto":
        level_timer = latency.timer if latency is not None else OrtTimer()
    if target_size is not None or ratio is not None:  # an unreachable budget is said before any statistics
        check_reachable(model, target_size=target_size, ratio=ratio, quantize=quantize, block_size=block_size,
                        int8=int8, embeddings=embeddings, factors=factors, rank_step=rank_step, include=include,
                        exclude=exclude, source=source)
    job = prepare_quantized(
        model, quantize=quantize, block_size=block_size, method=method, calibration=calibration, stats=stats,
        embeddings=embeddings, int8=int8, factors=factors, rank_step=rank_step, alternate=alternate,
        bias_correction=bias_correction,
        budgeted=target_size is not None or ratio is not None or target_latency is not None, include=include,
        exclude=exclude, batch_size=batch_size, mask_input=mask_input, shapes=shapes, fisher_options=fisher_options,
        progress=progress, timed=target_latency is not None, accuracy_level=accuracy_level, level_timer=level_timer,
        merge=merge, source=source, fallback=fallback, checked=True, feed=feed, stats_memory=stats_memory)
    try:
        return build_quantized(job, target_size=target_size, ratio=ratio, rank=rank, target_latency=target_latency,
                               latency=latency, input_forms=input_forms, checked=True)
    finally:  # the report's `rewritten` (--also) may still read the plans: their store goes when it is collected
        job.close(keep_plans=job.rewritten is not None)


def prepare_quantized(
    model, *, quantize: str = "int4", block_size: int = 32, method: str = "kfac", calibration=None, stats=None,
    embeddings: str = "auto", int8: str = "dynamic", factors: str = "float16", rank_step: int = 8,
    alternate: int = 0, bias_correction: bool | None = None, budgeted: bool = True, include=None, exclude=None,
    batch_size: int = 32, mask_input=None, shapes=None, fisher_options: dict | None = None, progress: bool = True,
    timed: bool = False, accuracy_level=0, level_timer=None, merge: bool = False, feed: dict | None = None,
    source=None, fallback: str | None = None, checked: bool = False, outliers: tuple | None = None,
    stats_memory: int | None = None,
) -> QuantizeJob:
    """Load, find sites and tables, gather statistics (and, when `budgeted`, the tables' loss statistics; when
    `timed`, for a latency budget, the timing batch instead, the tables following the rule); then MatMulNBits'
    accuracy_level per site (`accuracy_level` 0, 4 or "auto" with `level_timer`, compress_quantized). `feed`: the
    batch to time and check at (default: one calibration batch, or `shapes`); `checked`: the options were
    checked by the caller. `outliers`: the counts of largest input channels a dynamic int8 site may compute in
    float (default OUTLIER_COUNTS under a latency budget, where they cost a few small nodes and remove most
    of the activation rounding; none under a byte budget, whose outputs stay as before)."""
    if outliers is None:
        outliers = OUTLIER_COUNTS if timed else ()
    if not checked:
        check_options(quantize, block_size, method, embeddings, int8, factors, rank_step, alternate)
    check_accuracy_level(accuracy_level, level_timer)
    fisher_options = fisher_options or {}

    def pricing(model, sites, method):  # what _measure_quantization will ask for, folded by the Fisher pass
        if not budgeted:
            return None
        usable = [s for s in sites if not is_recurrent(s) and s.dtype in ("float32", "float16")]
        schemes = _site_schemes(quantize, block_size, "block" if _lm_int8(model, usable, quantize, int8) else int8)
        tables = find_tables(model, exclude={s.weight for s in sites}) if embeddings != "keep" else []
        priced, inputs = _priced(model, method, usable, tables, schemes, embeddings, timed)
        tensors = sorted({name for names in inputs.values() for name in names})
        return Pricing(priced, tensors) if priced or tensors else None

    prepared = prepare(model, method=method, include=include, exclude=exclude, calibration=calibration,
                       stats=stats, batch_size=batch_size, mask_input=mask_input, shapes=shapes,
                       fisher_options=fisher_options, progress=progress, fallback=fallback, stats_memory=stats_memory,
                       pricing=pricing)
    with threadpool_limits(limits=1, user_api="blas"):  # docs/speed.md: numpy between ORT runs, one BLAS thread
        return _prepare_job(prepared, quantize, block_size, method, calibration, embeddings, int8, factors,
                            rank_step, alternate, bias_correction, budgeted, batch_size, mask_input, shapes,
                            fisher_options, progress, timed, accuracy_level, level_timer, merge, feed, source,
                            tuple(outliers))


def _prepare_job(prepared, quantize, block_size, method, calibration, embeddings, int8, factors, rank_step,
                 alternate, bias_correction, budgeted, batch_size, mask_input, shapes, fisher_options, progress,
                 timed, accuracy_level, level_timer, merge, feed, source, outliers=()) -> QuantizeJob:
    """prepare_quantized after the statistics: sites, metrics, the quantization pass, the levels."""
    sites, skipped = _quantizable(prepared)
    lm_int8 = _lm_int8(prepared.model, sites, quantize, int8)
    if lm_int8:  # dynamic int8 rounds each activation per tensor: a language model's outliers break it
        int8 = "block"
    schemes = _site_schemes(quantize, block_size, int8)
    _check_half(sites, quantize, int8)
    if quantize != "auto":
        _check_divisible(sites, schemes[0])
    if bias_correction is None:
        bias_correction = get_method(method).bias_correction
    spill = spill_needed(sites)  # large models: weightings and plans wait on disk (pipeline.quantized_store)
    by_weight = {s.weight: s for s in sites}
    metrics = LazyMetrics(list(by_weight), lambda weight: _metric(prepared, by_weight[weight], bias_correction),
                          SpillStore(spill))
    job = QuantizeJob(prepared, sites, skipped, metrics, schemes, quantize, block_size, int8, rank_step,
                      bias_correction, alternate, factors,
                      original_bytes=source.input_bytes if source is not None else _bytes(prepared.model),
                      merge=merge, progress=progress, source=source, outliers=outliers, plans=SpillStore(spill))
    if lm_int8:
        job.warnings.append(LM_INT8_NOTE)
    if embeddings != "keep":
        job.tables = find_tables(prepared.model, exclude={s.weight for s in prepared.sites})
    if budgeted and not get_method(prepared.method).loss_units and sites:
        job.warnings.append(f"{prepared.method} weighs each site's error by its input activations only (no "
                            "gradients): the budget compares sites by their output error, not by the loss, and "
                            "embedding tables follow `embeddings`.")
    if budgeted:
        priced, inputs = _priced(prepared.model, prepared.method, sites, job.tables, schemes, embeddings, timed)
        _measure_quantization(job, priced, inputs if prepared.stats is not None else {}, calibration, batch_size,
                              mask_input, shapes, fisher_options, progress)
        if priced and alternate == 0:
            job.ties = _tied_pairs(job)
    if timed or accuracy_level != 0:
        job.feed = feed if feed is not None else timing_feed(prepared.model, calibration, batch_size, shapes)
    if accuracy_level != 0:
        _choose_levels(job, accuracy_level, level_timer)
    job.rule_tables = {t.name: _table_rule(t, quantize, embeddings, block_size, job.warnings) for t in job.tables}
    job.fixed_tables = {name: s for name, s in job.rule_tables.items() if name not in job.table_loss}
    return job


@threadpool_limits.wrap(limits=1, user_api="blas")  # SVDs and Grams: one BLAS thread (docs/speed.md)
def build_quantized(job: QuantizeJob, *, target_size: int | None = None, ratio: float | None = None,
                    rank: int = 0, target_latency: float | None = None, latency=None, input_forms=None,
                    checked: bool = False) -> tuple[onnx.ModelProto, Report]:
    """The model and its report for one budget (or, without one, the scheme plus a rank-`rank` correction);
    `checked`: the budget was checked by the caller."""
    if not checked:
        check_budget(job.quantize, job.prepared.method, target_size, ratio, rank, target_latency)
    target = target_size if target_size is not None else (None if ratio is None else int(ratio * job.original_bytes))
    speed = None
    if target_latency is not None:
        model_out, results, tables, speed = _build_for_latency(job, target_latency, latency, input_forms)
    elif target is None:
        chosen = [_fixed_option(s, job.site_schemes(s)[0], rank, _factor_bytes(job, s)) for s in job.sites]
        tables = dict(job.rule_tables)
        model_out, results = _build(job, chosen, tables)
    else:
        model_out, results, tables = _build_within(job, target)
    report = _report(job, model_out, results, tables)
    report.rewritten = job.rewritten
    report.allocation = "latency" if speed else "budget" if target is not None else "uniform"
    report.budget = {"quantize": job.quantize, "block_size": job.block_size, "int8": job.int8, "rank": rank,
                     "target_size": target, "ratio": ratio, "bias_correction": job.bias_correction,
                     "bytes_before": job.original_bytes, "bytes_after": _bytes(model_out),
                     "target_latency": target_latency}
    if speed:
        report.budget["speed"] = speed
        report.warnings += latency_notes(speed)
    if job.levels:
        report.budget["accuracy_levels"] = _level_rows(job, results)
        report.warnings += _level_notes(report.budget["accuracy_levels"])
    return model_out, report


ACCURACY_MODES = (0, 4, "auto")


def check_accuracy_level(accuracy_level, level_timer) -> None:
    if accuracy_level not in ACCURACY_MODES:
        raise FwlrError(f"unknown `accuracy_level` {accuracy_level!r}; choose 0 (float compute), 4 (int8 "
                        "activations) or auto (per site, measured here).")
    if accuracy_level == "auto" and level_timer is None:
        raise ValueError("accuracy_level auto needs a level_timer")


def _choose_levels(job: QuantizeJob, accuracy_level, level_timer) -> None:
    """Per site and MatMulNBits scheme, level 4 when it is asked for or measures faster at the site's rows
    (each shape timed once), and its check on the site's calibration activations passes (cost.levels)."""
    from onnx_fwlr.cost import levels
    from onnx_fwlr.cost.latency import site_rows

    blocked = [s for s in job.schemes if s.kind == "nbits"]
    if not blocked or not job.sites:
        return
    model = job.prepared.model
    rows = site_rows(model, job.sites, job.feed)
    activations = levels.site_activations(model, job.sites, job.feed)
    timings: dict = {}
    forced = None if accuracy_level == "auto" else int(accuracy_level)
    for site, site_rows_count in zip(job.sites, rows):
        for scheme in blocked:
            if site.K % scheme.block_size:
                continue
            measured = None
            if forced is None and site_rows_count:
                key = (site.K, site.N, site_rows_count, scheme.label)
                if key not in timings:
                    timings[key] = levels.time_levels(site.K, site.N, site_rows_count, scheme, level_timer)
                measured = timings[key]
            X = activations.get(site.weight)
            wanted = forced == levels.FAST or (measured is not None and measured[levels.FAST] < measured[0])
            ratio = levels.check_ratio(job.prepared.weights[site.weight], scheme, X) if wanted and X is not None \
                else None
            job.levels[(site.weight, scheme.label)] = levels.choose_level(measured, ratio, site_rows_count, forced)


def _level_rows(job: QuantizeJob, results) -> list[dict]:
    """Per site whose chosen option is a MatMulNBits scheme: its level and why."""
    rows = []
    for site, result in zip(job.sites, results):
        label = result.note.split(":")[0].split(" + ")[0]
        if not label.startswith("int") or label == INT8_DYNAMIC.label:
            continue
        base = label.replace(" acc4", "")
        choice = job.levels.get((site.weight, base))
        if choice is not None:
            rows.append({"site": site.name, "scheme": base, "level": choice.level, "rows": choice.rows,
                         "ms": {str(k): v for k, v in (choice.ms or {}).items()}, "check_ratio": choice.check_ratio,
                         "why": choice.reason})
    return rows


def _level_notes(rows: list[dict]) -> list[str]:
    """One sentence: how many MatMulNBits sites run at each accuracy_level, and the sites the check kept at 0."""
    if not rows:
        return []
    fast = [r for r in rows if r["level"] == 4]
    failed = [r for r in rows if r["check_ratio"] is not None and r["level"] == 0]
    note = (f"MatMulNBits accuracy_level: 4 (int8 activations) for {len(fast)} of {len(rows)} site"
            f"{'s' if len(rows) > 1 else ''}, 0 (float) for the rest")
    if failed:
        worst = max(failed, key=lambda r: r["check_ratio"])
        note += (f"; kept at 0 by the check (ONNX Runtime issue 29849, large activations): "
                 f"{', '.join(r['site'] for r in failed)} (e.g. {worst['site']}: {worst['why']})")
    slower = [r for r in rows if r["level"] == 0 and r["check_ratio"] is None and r["ms"]]
    if slower:
        note += f"; level 4 measured no faster at {slower[0]['rows']} rows for {len(slower)}"
    return [note]


def fastest_latency(job: QuantizeJob, latency=None, input_forms=None) -> float:
    """The predicted latency ratio of the model with every site at its fastest option (pipeline.quantized_speed):
    a latency budget needs at least this."""
    if job.feed is None:
        raise RuntimeError("a latency budget needs the job prepared with timed=True")
    latency = latency if latency is not None else MeasuredLatency()
    forms = input_forms or InputForms(job.prepared.model)
    return fastest_ratio(job.prepared.model, job.sites, _options(job)[:len(job.sites)], latency, job.feed, forms,
                         _site_share(job, latency, forms))


def _site_share(job: QuantizeJob, latency, forms) -> float | None:
    """The sites' share of the original's time, profiled once per job (None without sites)."""
    if job.share is None and job.sites:
        job.share = latency.site_share(forms.model, forms.nodes(job.sites), job.feed)
    return job.share


def _build_for_latency(job: QuantizeJob, target: float, latency, input_forms):
    """The options within the latency budget (pipeline.quantized_speed), built, each site's report line with
    its predicted time; embedding tables follow the rule (a lookup is not where the time goes)."""
    if job.feed is None:
        raise RuntimeError("a latency budget needs the job prepared with timed=True")
    latency = latency if latency is not None else MeasuredLatency()
    forms = input_forms or InputForms(job.prepared.model)
    site_choices = _options(job)[:len(job.sites)]
    chosen, speed = allocate_latency(job.prepared.model, job.sites, site_choices, target, latency, job.feed, forms,
                                     job.quantize, _site_share(job, latency, forms))
    tables = dict(job.fixed_tables)
    model_out, results = _build(job, chosen, tables)
    for result, row in zip(results, speed["sites"]):
        result.note += f", {row['ms']:.3g} ms predicted ({speed['own_form']} as it is {row['own_ms']:.3g} ms)"
    return model_out, results, tables, speed


def check_options(quantize, block_size, method, embeddings, int8, factors, rank_step, alternate) -> None:
    """Every option error in one sentence, before any work."""
    if quantize not in QUANTIZE_MODES:
        raise FwlrError(f"unknown `quantize` '{quantize}'; choose one of {', '.join(QUANTIZE_MODES)}.")
    if embeddings not in EMBEDDING_MODES:
        raise FwlrError(f"unknown `embeddings` '{embeddings}'; choose one of {', '.join(EMBEDDING_MODES)}.")
    if int8 not in INT8_KINDS:
        raise FwlrError(f"unknown `int8` '{int8}'; choose one of {', '.join(INT8_KINDS)}.")
    if factors not in FACTOR_DTYPES:
        raise FwlrError(f"unknown factor storage '{factors}'; choose one of {', '.join(FACTOR_DTYPES)}.")
    check_block_size(block_size)
    get_method(method)
    if rank_step < 1 or alternate < 0:
        raise FwlrError("the rank step must be a positive integer and the alternation rounds non-negative.")


def check_budget(quantize, method, target_size, ratio, rank, target_latency=None) -> None:
    if sum(b is not None for b in (target_size, ratio, target_latency)) > 1:
        given = [f"`{n}`" for n, b in (("target_size", target_size), ("ratio", ratio),
                                       ("target_latency", target_latency)) if b is not None]
        raise FwlrError(f"{' and '.join(given)} given together; pass one budget.")
    if target_latency is not None:
        Budget(target_latency=target_latency).check()  # its range, checked where every budget is
    if target_size is not None and target_size <= 0:
        raise FwlrError(f"`target_size` {target_size} is out of range; give a positive number of bytes.")
    if ratio is not None and not 0 < ratio <= 1:
        raise FwlrError(f"`ratio` {ratio} is out of range; it must satisfy 0 < ratio <= 1 (of the input's bytes).")
    budgeted = target_size is not None or ratio is not None or target_latency is not None
    if quantize == "auto" and not budgeted:
        raise FwlrError("`quantize` auto chooses per site under a budget; pass `target_size` or `ratio` (bytes), "
                        "or `target_latency`.")
    if budgeted and not get_method(method).loss_units and ACTIVATIONS not in get_method(method).needs:
        what = "a latency budget" if target_latency is not None else "a byte budget"
        raise FwlrError(f"{what} compares sites in loss units, which needs gradient statistics (or, short of "
                        f"them, activation statistics); use `method` kfac, fwsvd or whiten instead of {method}, or "
                        "drop the budget.")
    if rank < 0:
        raise FwlrError(f"`rank` {rank} is out of range; give a non-negative correction rank.")


def _quantizable(prepared: Prepared) -> tuple[list[Site], list[Skipped]]:
    sites, skipped = [], list(prepared.skipped)
    for site in prepared.sites:
        reason = None
        if is_recurrent(site):
            reason = "an LSTM/GRU weight: ONNX Runtime's block quantizers take MatMul weights only"
        elif site.dtype not in ("float32", "float16"):
            reason = f"a {site.dtype} weight: quantized from float32 or float16 weights only"
        elif prepared.site_methods.get(site.weight) != prepared.method:
            reason = "no calibration statistics reach it (inside a subgraph?), so its loss cannot be measured"
        if reason:
            skipped.append(Skipped(site.name, site.uses[0].op_type, site.weight, f"kept dense: {reason}"))
        else:
            sites.append(site)
    return sites, skipped


def _site_schemes(quantize: str, block_size: int, int8: str) -> list[Scheme]:
    eight = INT8_DYNAMIC if int8 == "dynamic" else nbits(8, block_size)
    if quantize == "int4":
        return [nbits(4, block_size)]
    if quantize == "int8":
        return [eight]
    blocks = sorted(set(AUTO_BLOCKS) | {block_size})
    return [nbits(4, b) for b in blocks] + [eight]


def _check_half(sites: list[Site], quantize: str, int8: str) -> None:
    """Dynamic int8 quantizes activations with DynamicQuantizeLinear, which reads float32 only: a float16 site
    can take MatMulNBits (int4, or int8 blocks) but not it."""
    half = [s for s in sites if s.dtype == "float16"]
    if half and quantize == "int8" and int8 == "dynamic":
        raise FwlrError(f"{half[0].name}: its weight is float16, and dynamic int8 (MatMulInteger) needs float32 "
                        "activations; use `int8` block (weight-only MatMulNBits) or `quantize` int4/auto.")


def _usable_schemes(site: Site, schemes: list[Scheme]) -> list[Scheme]:
    """The schemes a site can take: blocks dividing its K; no dynamic int8 for a float16 site (_check_half)."""
    return [s for s in schemes if (s.kind != "nbits" or site.K % s.block_size == 0)
            and not (s.kind == "dynamic" and site.dtype == "float16")]


def _check_divisible(sites: list[Site], scheme: Scheme) -> None:
    if scheme.kind != "nbits":
        return
    for site in sites:
        if site.K % scheme.block_size:
            raise FwlrError(f"{site.name}: `block_size` {scheme.block_size} does not divide its input size K = "
                            f"{site.K}; pick a block size that divides every K (see `onnx-fwlr inspect`) or "
                            "`exclude` it.")


def _metric(prepared: Prepared, site: Site, bias_correction: bool) -> plan.Metric:
    stats, method = prepared.stats, prepared.method
    if stats is None:
        return plan.Metric()
    mean = stats.mean_input(site) if bias_correction and stats.has_activations(site) else None
    return plan.Metric(input_scaling(method, site, stats), output_scaling(method, site, stats), mean)


def _fixed_option(site: Site, scheme: Scheme, rank: int, factor_bytes: int) -> Option:
    """No budget: the scheme with the requested correction rank (below min(K, N))."""
    r = min(rank, min(site.K, site.N) - 1)
    size = scheme.matmul_bytes(site.K, site.N) + factor_bytes * r * (site.K + site.N)
    return Option(scheme.label, r, size, math.nan, scheme)


def _table_rule(table: Table, quantize: str, embeddings: str, block_size: int, warnings: list) -> Scheme:
    """The scheme a table gets without loss statistics: the one asked for, else the sites' scheme (int8 for auto)."""
    wanted = embeddings if embeddings != "auto" else ("int4" if quantize == "int4" else "int8")
    if wanted == "int8":
        return INT8_DYNAMIC
    if table.D % block_size == 0:
        return nbits(4, block_size)
    warnings.append(f"embedding table {table.name}: `block_size` {block_size} does not divide its width {table.D}; "
                    "stored as int8 instead.")
    return INT8_DYNAMIC


def _lm_int8(model: onnx.ModelProto, sites: list[Site], quantize: str, int8: str) -> bool:
    """Whether `quantize` auto offers 8-bit weight-only instead of dynamic int8 (a language model: LM_INT8_NOTE)."""
    return quantize == "auto" and int8 == "dynamic" and bool(sites) and is_language_model(model)


def _priced(model, method: str, sites: list[Site], tables: list[Table], schemes: list[Scheme], embeddings: str,
            timed: bool) -> tuple[list[Table], dict]:
    """What a byte budget prices beyond the sites' statistics: the tables (--embeddings auto, with a loss-units
    method, no latency budget) and, per float32 site, the input tensors of its dynamic int8 rounding (with an
    output-gradient weighting to price it through). Asked before the Fisher pass (prepare_quantized: the pass
    folds them) and after it (_measure_quantization), by the same rule."""
    chosen = get_method(method)
    priced = tables if embeddings == "auto" and not timed and chosen.loss_units else []
    if not any(s.kind == "dynamic" for s in schemes) or chosen.output_scaling is None:
        return priced, {}
    visible = main_graph_tensors(model)
    return priced, {s.weight: [u.input for u in s.uses if u.input in visible] for s in sites if s.dtype == "float32"}


def _measure_quantization(job: QuantizeJob, tables, inputs, calibration, batch_size, mask_input, shapes,
                          fisher_options, progress) -> None:
    """The losses the budget needs beyond the sites' statistics (quant.calibration): the `tables`' (budgeted
    ones: --embeddings auto under a byte budget) and dynamic int8's activation rounding of the sites' `inputs`
    (with a K-FAC output Gram). Folded by the sites' Fisher pass when it ran here (prepare's `pricing`);
    otherwise (statistics loaded from a file or measured in shards) measured in a pass of their own."""
    prepared = job.prepared
    tensors = sorted({name for names in inputs.values() for name in names})
    if not tables and not tensors:
        return
    if calibration is None:
        job.warnings.append("no calibration data (`calibration`) to price embedding tables and int8's activation "
                            "rounding: "
                            "tables follow `quantize`, and int8's predicted loss counts its weight error only.")
        return
    measured = prepared.quant_stats
    if measured is None or not ({t.name for t in tables} <= set(measured.tables)
                                and set(tensors) <= set(measured.step_squares)):
        measured = _quantization_pass(job, tables, tensors, calibration, batch_size, mask_input, shapes,
                                      fisher_options, progress)
    job.table_loss = {t.name: measured.tables[t.name] for t in tables}
    for site in job.sites:  # priced with each site's weighting when its options are made (_rounding_loss)
        if inputs.get(site.weight):
            job.rounding_variance[site.weight] = np.mean([measured.rounding_variance(t) for t in inputs[site.weight]])
            _outlier_variances(job, site, inputs[site.weight], measured)


def _quantization_pass(job: QuantizeJob, tables, tensors, calibration, batch_size, mask_input, shapes,
                       fisher_options, progress):
    """quant.calibration.collect_quant_stats: a pass of its own, seeded like the sites' Fisher pass."""
    from onnx_fwlr.stats.fisher import GroupedFisherStatistics  # the backward pass: imported when needed

    prepared = job.prepared
    batches = open_data(calibration, prepared.model, batch_size=batch_size, shapes=shapes)
    if isinstance(prepared.stats, GroupedFisherStatistics):
        prepared.stats.release()  # the first group's Grams wait on disk while this pass runs (the options fold them)
    meta = prepared.stats.meta
    options = {k: v for k, v in fisher_options.items() if k in ("samples", "seed")}
    return collect_quant_stats(prepared.model, tables, tensors, batches, loss=meta.get("loss"),
                               output=meta.get("fisher_output"), mask_input=mask_input, progress=progress, **options)


def _outlier_variances(job: QuantizeJob, site: Site, tensors: list[str], measured) -> None:
    """The rounding variance once the site's `job.outliers` largest input channels are computed in float (the
    int8 input's step then follows the other channels); priced in loss units with the site's weighting when its
    options are made (_scheme_losses). One input tensor only (a weight read from two places has no single set of
    channels)."""
    if not job.outliers or len(set(tensors)) != 1 or max(job.outliers) >= site.K:
        return
    order = measured.largest_channels(tensors[0])
    job.outlier_channels[site.weight] = order[:max(job.outliers)]
    for count in job.outliers:
        job.outlier_variance[(site.weight, count)] = measured.rounding_variance_without(tensors[0], order[:count])


def _tied_pairs(job: QuantizeJob) -> dict:
    """Heads that are their (priced, float32) embedding table transposed (sites.tied): head weight -> (tie, table).
    The budget then chooses for the pair as one weight (_tied_options)."""
    tables = {t.name: t for t in job.tables if t.name in job.table_loss}
    heads = [s for s in job.sites if s.dtype == "float32"]
    return {tie.head: (tie, tables[tie.table]) for tie in find_ties(job.prepared.model, heads) if tie.table in tables}


def _tied_options(job: QuantizeJob, site: Site, options: list[Option]) -> list[Option]:
    """A tied head's options as the pair's: the head as it is reads Transpose(table) (the table's bytes, once);
    the head stored its own way keeps the float table beside it; and for each MatMulNBits scheme (4 or 8 bits)
    whose blocks divide the table's width, the table reads the head's own numbers (no bytes of its own), its
    error (the same numbers, so the head's quantization error transposed, without the head's correction)
    priced by the table's statistics on top of the head's."""
    _, table = job.ties[site.weight]
    table_bytes = 4 * table.params
    pair = [o if o.storage == plan.FP32 else replace(o, bytes=o.bytes + table_bytes) for o in options]
    schemes = {o.key for o in options if o.key is not None and o.key.kind == "nbits" and o.key.bits in (4, 8)
               and table.D % o.key.block_size == 0}
    if schemes:
        W = _weight(job, site)  # [D, V]: the table transposed
        for scheme in sorted(schemes, key=lambda k: k.label):
            deq = plan.dequantized(W, scheme, site_dtype(site), float64=False)
            loss = job.table_loss[table.name].head_loss(W, deq)
            del deq
            pair += [replace(o, storage=o.storage + TIED, loss=o.loss + loss) for o in options if o.key == scheme]
        del W
    return pair


def _head_bytes(job: QuantizeJob, site: Site, option: Option) -> int:
    """A tied head's own bytes within its pair option (the table's are on the table's report line)."""
    if site.weight not in job.ties or option.storage.endswith(TIED):
        return option.bytes
    return 0 if option.storage == plan.FP32 else option.bytes - 4 * job.ties[site.weight][1].params


def _scheme_losses(job: QuantizeJob, site: Site, metric: plan.Metric) -> dict:
    """Dynamic int8's activation rounding in loss units, its variance times ‖W Q‖² (0 when not measured), and
    the same with each outlier count's channels in float (σ'² ‖W_kept Q‖²), priced once with the site's
    weighting and kept (a few numbers per site): job.scheme_loss(site)."""
    variance = job.rounding_variance.get(site.weight)
    if variance is not None and site.weight not in job.rounding_loss:
        W = job.prepared.weights[site.weight]
        weighted = metric.right.apply_right(W)
        job.rounding_loss[site.weight] = float(variance * np.sum(weighted * weighted))
        for count in job.outliers:
            if (site.weight, count) in job.outlier_variance:
                kept = W.copy()
                kept[job.outlier_channels[site.weight][:count]] = 0.0
                weighted = metric.right.apply_right(kept)
                job.outlier_loss[(site.weight, count)] = float(job.outlier_variance[(site.weight, count)]
                                                               * np.sum(weighted * weighted))
    return job.scheme_loss(site)


def _table_schemes(table: Table, quantize: str, block_size: int) -> list[Scheme]:
    blocks = [block_size] if quantize == "int4" else sorted(set(AUTO_BLOCKS) | {block_size})
    return [INT8_DYNAMIC] + [nbits(4, b) for b in blocks if table.D % b == 0]


def _options(job: QuantizeJob) -> list[list[Option]]:
    """Every site's and budgeted table's options, computed once per run, site by site in site order (the order
    grouped statistics are measured in): each site's weighting is made here, used, and kept or spilled for the
    build (job.metrics); only the options (bytes and predicted loss) stay in memory."""
    if job.choices is None:
        job.choices = []
        for index, site in enumerate(tqdm(job.sites, desc="quantize options", unit="site", disable=not job.progress,
                                          leave=False)):
            metric = job.metrics[site.weight]
            _release_finished_group(job, index)
            tied = site.weight in job.ties
            options = plan.site_options(
                _weight(job, site), metric, job.site_schemes(site),
                dense=job.quantize == "auto" or site.weight in _stored(job) or tied,
                dense_bytes=_dense_bytes(job, site), low_rank=job.quantize == "auto",
                low_rank_bytes=_stored_factor_bytes(job.source, site), rank_step=job.rank_step,
                factor_bytes=_factor_bytes(job, site), scheme_loss=_scheme_losses(job, site, metric),
                dtype=site_dtype(site))
            job.choices.append(_tied_options(job, site, options) if tied else options)
            del metric
        for table in _budgeted_tables(job):
            job.choices.append(plan.table_options(table_array(job.prepared.model, table),
                                                  job.table_loss[table.name].loss,
                                                  _table_schemes(table, job.quantize, job.block_size)))
    return job.choices


def _release_finished_group(job: QuantizeJob, index: int) -> None:
    """Once the last site of a group of grouped statistics has its weighting, drop the group's Grams
    (GroupedFisherStatistics.release): in site order nothing asks for them again (had anything, they would be
    folded again from the recorded pass, the same sums), and the last group's (the LM head's sketch: 101 MB on
    SmolLM2) would otherwise stay through the head's options and every fit attempt."""
    stats = job.prepared.stats
    group_of = getattr(stats, "group_of", None)
    if group_of is None or stats.current is None or group_of.get(job.sites[index].weight) != stats.current:
        return
    following = job.sites[index + 1] if index + 1 < len(job.sites) else None
    if following is None or group_of.get(following.weight) != stats.current:
        stats.release()


def _stored(job: QuantizeJob) -> dict[str, int]:
    """Weight -> bytes the quantized input stores it in (empty for a float input)."""
    return job.source.stored if job.source is not None else {}


def _dense_bytes(job: QuantizeJob, site: Site) -> int:
    """The bytes of a site left as it is: as the quantized input stored it, else at its float storage."""
    return _stored(job).get(site.weight, np.dtype(site_dtype(site)).itemsize * site.params)


def _stored_factor_bytes(source, site: Site):
    """For a weight of a quantized input: rank r -> bytes of its two factors stored in the input's own scheme
    (they are quantized with it once built); None otherwise (factors at the factor storage's bytes)."""
    scheme = source.scheme_of(site.weight) if source is not None and site.weight in source.stored else None
    if scheme is None:
        return None
    return lambda r: scheme.matrix_bytes(site.K, r) + scheme.matrix_bytes(r, site.N)


def check_reachable(model, *, target_size, ratio, quantize, block_size, int8, embeddings, factors, rank_step,
                    include, exclude, source=None) -> None:
    """Refuse a byte budget below the smallest model the options can reach, from the sites' shapes alone, so
    it is said before any statistics are gathered (a lower bound: the allocation checks the exact one)."""
    loaded = load_model(model, copy=False)
    sites, _ = find_all_sites(loaded, include, exclude, fisher=False)
    stored = source.stored if source is not None else {}
    original = source.input_bytes if source is not None else _bytes(loaded)
    target = target_size if target_size is not None else int(ratio * original)
    schemes = _site_schemes(quantize, block_size, int8)
    tables = [] if embeddings == "keep" else find_tables(loaded, exclude={s.weight for s in sites})
    if not tables and not any(not is_recurrent(s) and s.dtype == "float32" for s in sites):
        return  # nothing to quantize: the command says so, whatever the budget
    smallest = original
    for site in sites:
        if is_recurrent(site) or site.dtype not in ("float32", "float16"):
            continue  # kept as it is
        dense = stored.get(site.weight, np.dtype(site_dtype(site)).itemsize * site.params)
        sizes = [s.matmul_bytes(site.K, site.N) for s in _usable_schemes(site, schemes)]
        if quantize == "auto" and rank_step < min(site.K, site.N):
            low_rank = _stored_factor_bytes(source, site)
            per_number = 2 if site.dtype == "float16" else FACTOR_DTYPES[factors]
            sizes.append(low_rank(rank_step) if low_rank else rank_step * (site.K + site.N) * per_number)
        if quantize == "auto" or site.weight in stored or not sizes:
            sizes.append(dense)
        smallest += min(sizes) - dense
    tied = {t.table for t in find_ties(loaded, sites)} if tables and quantize == "auto" else set()
    for table in tables:
        sizes = [s.table_bytes(table.V, table.D) for s in _table_schemes(table, quantize, block_size)]
        if table.name in tied:
            sizes.append(0)  # it may read its head's 4-bit numbers (_tied_options)
        smallest += min(sizes) - 4 * table.params
    if target < smallest:
        what = "the options of `quantize` auto" if quantize == "auto" else f"{quantize} quantization"
        raise FwlrError(f"the target of {target:,} bytes is below the smallest model {what} can reach here "
                        f"(about {smallest:,} bytes{' of the quantized input' if source is not None else ''}); "
                        "raise `target_size`/`ratio`"
                        + (" or use `quantize` auto, which can also use low rank." if quantize != "auto" else "."))


def _budgeted_tables(job: QuantizeJob) -> list[Table]:
    """Tables the budget chooses for on their own (a tied table is chosen for with its head)."""
    tied = {table.name for _, table in job.ties.values()}
    return [t for t in job.tables if t.name in job.table_loss and t.name not in tied]


def _allocate(job: QuantizeJob, available: int, target: int) -> tuple[list[Option], dict[str, Scheme]]:
    """The option of every site and budgeted table within `available` bytes with the least predicted loss."""
    choices = _options(job)
    picked = allocate(choices, available)
    if picked is None:
        smallest = target - available + minimum_bytes(choices)
        what = "the options of `quantize` auto" if job.quantize == "auto" else f"{job.quantize} quantization"
        raise FwlrError(f"the target of {target:,} bytes is below the smallest model {what} can reach here "
                        f"(about {smallest:,} bytes); raise `target_size`/`ratio`"
                        + (" or use `quantize` auto, which can also use low rank." if job.quantize != "auto" else "."))
    n = len(job.sites)
    tables = dict(job.fixed_tables)
    tables.update({t.name: o.key for t, o in zip(_budgeted_tables(job), picked[n:]) if o.key is not None})
    for site, option in zip(job.sites, picked[:n]):
        if site.weight in job.ties and option.storage.endswith(TIED):
            tables[job.ties[site.weight][1].name] = option.key
    return picked[:n], tables


def _fixed_bytes(job: QuantizeJob) -> int:
    """Bytes the budget cannot move: everything but the budgeted weights, plus the records rewriting adds."""
    fixed = job.original_bytes - sum(_dense_bytes(job, s) for s in job.sites) + SITE_OVERHEAD * len(job.sites)
    for table in job.tables:
        fixed += TABLE_OVERHEAD - 4 * table.V * table.D
        if table.name in job.fixed_tables:
            fixed += job.fixed_tables[table.name].table_bytes(table.V, table.D)
    return fixed


def _build_within(job: QuantizeJob, target: int):
    """Allocate, build, and measure; when the records cost more than estimated, allocate again with the
    excess taken off (the bytes of a model are only known once it is built)."""
    if not job.sites and not _budgeted_tables(job):  # nothing the budget can move: nothing to allocate
        model_out, results = _build(job, [], dict(job.fixed_tables))
        return model_out, results, dict(job.fixed_tables)
    available, slack = target - _fixed_bytes(job), 0
    for _ in range(FIT_ATTEMPTS):
        chosen, tables = _allocate(job, available - slack, target)
        model_out, results = _build(job, chosen, tables)
        excess = _written_bytes(model_out) - target
        if excess <= 0:
            return model_out, results, tables
        slack = 2 * slack + excess  # another choice may bring other records: close in fast
        del model_out, results  # not held while the next attempt builds its own
    raise RuntimeError(f"the built model stays {excess:,} bytes above the target after {FIT_ATTEMPTS} allocations")


def _dense_label(site: Site) -> str:
    return "fp16" if site.dtype == "float16" else "fp32"


def _weight(job: QuantizeJob, site: Site) -> np.ndarray:
    """The site's weight [K, N] as its float32 (or float16) numbers in float32: half the memory of the float64 copy
    SiteWeights reads (a vocabulary-wide head: 113 MB, not 226); every use converts it exactly, so the numbers
    are the same. A float64 weight stays float64."""
    W = job.prepared.weights[site.weight]
    return W.astype(np.float32) if site.dtype in ("float32", "float16") else W


def _factor_bytes(job: QuantizeJob, site: Site) -> int:
    """Bytes per stored correction entry: float16 sites always store float16 factors."""
    return 2 if site.dtype == "float16" else FACTOR_DTYPES[job.factors]


def _bytes(model: onnx.ModelProto) -> int:
    """Serialised size plus external data, measured without serialising (ByteSize did: twice the model's bytes
    for a moment, and EncodeError above 2 GB)."""
    return message_bytes(model) + external_bytes(model)


RECORD_BYTES = 128  # at most, one tensor's external-data record as written (location, offset, length)


def _written_bytes(model: onnx.ModelProto) -> int:
    """The bytes a byte budget is held to: the model's own for a model written whole; for one that is written
    with external data (it keeps lazily loaded weights of a large input, or is too large for one message), also
    each moved tensor's record and the data file's alignment padding, as io.model.save_model writes them, so
    the files on disk stay within the target."""
    in_memory = message_bytes(model)
    size = in_memory + external_bytes(model)
    if external_base(model) is None and in_memory <= EXTERNAL_DATA_THRESHOLD:
        return size
    end = 0
    for _, offset, length in external_layout(model):
        size += (offset - end) + RECORD_BYTES  # the alignment padding before it, and its record
        end = offset + length
    return size


def _build(job: QuantizeJob, chosen: list[Option], tables: dict[str, Scheme]):
    """The rewritten model for these options, and one SiteResult per site."""
    plans, results, low_rank = {}, [], set()
    pairs = list(zip(job.sites, chosen))
    for site, option in tqdm(pairs, desc="quantize build", unit="site", disable=not job.progress, leave=False):
        W = _weight(job, site)
        metric = job.metrics[site.weight]
        key = (site.weight, option.label)  # the same option gives the same plan: another allocation reuses it
        if key not in job.plans:
            site_plan, job.plan_errors[key] = plan.site_plan(W, metric, option, bias_correction=job.bias_correction,
                                                             alternate_rounds=job.alternate, dtype=site_dtype(site),
                                                             outliers=_outliers_of(job, site, option))
            if site_plan is not None and option.storage == plan.LOW_RANK and site.weight in _stored(job):
                site_plan.factor_dtype = "float32"  # quantized with the input's scheme below
            job.plans.put(key, site_plan)
            del site_plan
        error = job.plan_errors[key]
        if isinstance(option.key, Scheme) and option.key.kind == "dynamic":
            error += job.scheme_loss(site).get(option.key, 0.0)
        if site.weight not in job.totals:
            job.totals[site.weight] = compensate.weighted_error(W, metric.left, metric.right)
        total = job.totals[site.weight]
        del metric
        stored = site.params if option.storage in (plan.FP32, plan.LOW_RANK) and option.rank == 0 else (
            option.rank * (site.K + site.N) + (0 if option.storage == plan.LOW_RANK else site.params))
        results.append(SiteResult(
            name=site.name, weight=site.weight, op_type=site.uses[0].op_type, K=site.K, N=site.N,
            rank=None if option.storage == plan.FP32 else option.rank, params_before=site.params,
            params_after=stored, weighted_error=error, relative_error=relative_frobenius(error, total),
            note=_site_note(job, site, option), form=_form(option), bytes_before=_dense_bytes(job, site),
            bytes_after=_head_bytes(job, site, option), rank_of=_rank_of(option)))
        if option.storage == plan.LOW_RANK and site.weight in _stored(job):
            low_rank.add(site.weight)
        if option.storage != plan.FP32:
            plans[site.weight] = key
    tied = {job.ties[w][1].name: w for w in job.ties if job.ties[w][1].name in tables}  # table reads the head's
    stored = StoredPlans(plans, job.plans)
    model_out = rewrite(job.prepared.model, stored, tables, job.factors, merge=job.merge, tied=tied)
    retie(model_out, [job.ties[s.weight][0] for s, o in pairs if s.weight in job.ties and o.storage == plan.FP32])
    job.rewritten = None if job.source is not None else Rewrite(stored, dict(tables), job.factors, job.merge, tied)
    if job.source is not None:  # the input's own scheme for weights kept and for factors of low rank alone, so
        model_out = job.source.kept_as_input(model_out, low_rank)  # the bytes are measured as written
    return model_out, results


def _outliers_of(job: QuantizeJob, site: Site, option: Option):
    """The input channels an outlier option computes in float (sorted), else None."""
    count = option.key.outliers if isinstance(option.key, Scheme) else 0
    return np.sort(job.outlier_channels[site.weight][:count]) if count else None


def _form(option: Option) -> str:
    """How the report counts a site: kept, low rank alone, quantized, or quantized with a correction."""
    if option.storage in (plan.FP32, plan.LOW_RANK):
        return option.storage if option.storage == plan.LOW_RANK and option.rank else "fp32"
    return "quantized + correction" if option.rank else "quantized"


def _rank_of(option: Option) -> str:
    """What the report's rank counts for this option (SiteResult.rank_of)."""
    if option.storage == plan.FP32:
        return ""
    return LOW_RANK if option.storage == plan.LOW_RANK else CORRECTION


def _site_note(job: QuantizeJob, site: Site, option: Option) -> str:
    """'int4 b32 + rank 8: 12,345 bytes (fp32 65,536)'; for a quantized input, bytes before and after."""
    if site.weight in job.ties:
        return _tied_note(job, site, option)
    if site.weight not in _stored(job):
        return f"{option.label}: {option.bytes:,} bytes ({_dense_label(site)} {_dense_bytes(job, site):,})"
    label = "as the input stored it" if option.storage == plan.FP32 else option.label
    return f"{label}: {_stored(job)[site.weight]:,} -> {option.bytes:,} bytes"


def _tied_note(job: QuantizeJob, site: Site, option: Option) -> str:
    """What happened to a tied head and its table, on the head's report line."""
    tie, table = job.ties[site.weight]
    if option.storage == plan.FP32:
        return (f"fp32, tied: reads Transpose('{table.name}'), so the pair stores the table once "
                f"({4 * table.params:,} bytes instead of {8 * table.params:,})")
    own = _head_bytes(job, site, option)
    if option.storage.endswith(TIED):
        return (f"{option.label}: {own:,} bytes (fp32 {_dense_bytes(job, site):,}); the table '{table.name}' reads "
                f"these {option.key.bits}-bit numbers (GatherBlockQuantized): one copy for the pair")
    return f"{option.label}: {own:,} bytes (fp32 {_dense_bytes(job, site):,}); the table '{table.name}' stays fp32"


def _tied_table(job: QuantizeJob, name: str) -> str | None:
    """The head weight whose 4-bit numbers a tied table reads (None: not tied)."""
    return next((head for head, (_, table) in job.ties.items() if table.name == name), None)


def _report(job: QuantizeJob, model_out, results, tables: dict[str, Scheme]) -> Report:
    prepared = job.prepared
    report = Report(method=prepared.method, allocation="", budget={}, skipped=list(job.skipped),
                    warnings=list(prepared.warnings) + list(job.warnings), timings=dict(prepared.timings),
                    calibration=dict(prepared.stats.meta) if prepared.stats is not None else {})
    report.sites = list(results)
    for table in job.tables:
        scheme = tables.get(table.name)
        label = "fp32" if scheme is None else scheme.label
        size = 4 * table.params if scheme is None else scheme.table_bytes(table.V, table.D)
        note = f"embedding table {label}: {size:,} bytes (fp32 {4 * table.params:,})"
        head = _tied_table(job, table.name)
        if head is not None and scheme is not None:
            size, note = 0, (f"embedding table {label}, tied: reads the {scheme.bits}-bit numbers of its head "
                             f"'{head}' (GatherBlockQuantized), no bytes of its own (fp32 {4 * table.params:,})")
        elif head is not None:
            note += f", tied: its head '{head}' is on its own line"
        report.sites.append(SiteResult(name=table.name, weight=table.name, op_type="Gather", K=table.V, N=table.D,
                                       rank=None, params_before=table.params, params_after=table.params,
                                       note=note, form="fp32" if scheme is None else "quantized",
                                       bytes_before=4 * table.params, bytes_after=size))
    report.tied = [f"{r.name}: {r.note}" for r in results if r.weight in job.ties]
    report.model_params_before, report.ops_before = model_parameters(prepared.model), op_counts(prepared.model)
    report.model_params_after, report.ops_after = model_parameters(model_out), op_counts(model_out)
    if any(s.note.startswith(INT8_DYNAMIC.label) for s in report.sites):
        from onnx_fwlr.quant.int8_kernels import WHY, int8_saturates

        if int8_saturates():  # the same file from a VNNI machine would have 8-bit weights: say why not here
            report.warnings.append(f"dynamic int8 sites have {WHY}.")
    return report
