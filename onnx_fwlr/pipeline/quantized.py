"""Quantization with an importance-weighted low-rank correction, under one byte budget (docs/quantization.md).

    model, report = compress_quantized("model.onnx", quantize="int4", target_size=20_000_000,
                                       method="kfac", calibration="calib.npz")

Each site becomes deq(Q(W)) + A B with Q one of ONNX Runtime's quantizers and A B the weighted best rank-r
fit of the residual (quant.compensate); a byte budget is spread over every site and embedding table by
predicted loss per byte (quant.budget). quantize "int4"/"int8" fixes the main branch's scheme and spends the
rest of the budget on correction ranks; "auto" lets each site choose among dense, int8, int4 (block sizes),
either with a correction, and low rank alone. A latency budget (`target_latency`) spends measured milliseconds
instead of bytes (pipeline.quantized_speed).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_fwlr.cost.latency import MeasuredLatency
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.evaluate.report import Report, SiteResult, op_counts, relative_frobenius
from onnx_fwlr.io.data import open_data
from onnx_fwlr.io.model import external_bytes
from onnx_fwlr.methods.registry import get_method, input_scaling, output_scaling
from onnx_fwlr.pipeline.budget import Budget
from onnx_fwlr.pipeline.prepare import Prepared, prepare
from onnx_fwlr.pipeline.quantized_speed import allocate_latency, latency_notes
from onnx_fwlr.pipeline.speed import InputForms, timing_feed
from onnx_fwlr.quant import compensate, plan
from onnx_fwlr.quant.budget import Option, allocate, minimum_bytes
from onnx_fwlr.quant.calibration import collect_quant_stats
from onnx_fwlr.quant.embedding import Table, find_tables, table_array
from onnx_fwlr.quant.graph import rewrite
from onnx_fwlr.quant.ortquant import INT8_DYNAMIC, Scheme, check_block_size, nbits
from onnx_fwlr.sites.find import Site, Skipped, model_parameters
from onnx_fwlr.sites.recurrent import is_recurrent
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
    table_loss: dict = field(default_factory=dict)  # budgeted tables: name -> loss(ΔT)
    rounding_loss: dict = field(default_factory=dict)  # weight -> predicted loss of dynamic int8's activation rounding
    rule_tables: dict = field(default_factory=dict)  # every table's scheme without a budget: name -> Scheme
    fixed_tables: dict = field(default_factory=dict)  # tables the budget does not choose for: name -> Scheme
    original_bytes: int = 0
    warnings: list = field(default_factory=list)
    choices: list | None = None
    feed: dict | None = None  # one batch at the size a latency budget times the sites at


def compress_quantized(
    model, *, quantize: str = "int4", block_size: int = 32, target_size: int | None = None,
    ratio: float | None = None, rank: int = 0, method: str = "kfac", calibration=None, stats=None,
    embeddings: str = "auto", int8: str = "dynamic", factors: str = "float16", rank_step: int = 8,
    alternate: int = 0, bias_correction: bool | None = None, include: str | None = None, exclude: str | None = None,
    batch_size: int = 32, mask_input: str | None = None, shapes: dict | None = None,
    fisher_options: dict | None = None, progress: bool = True, target_latency: float | None = None, latency=None,
    input_forms=None, checked: bool = False, feed=None,
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
    given was already int8 and this is its float form. `checked`: the caller (pipeline.run, through
    RunConfig) has checked every option already; `feed`: the batch a latency budget times at (default
    speed.timing_feed).
    """
    if not checked:
        check_options(quantize, block_size, method, embeddings, int8, factors, rank_step, alternate)
        check_budget(quantize, method, target_size, ratio, rank, target_latency)
    job = prepare_quantized(
        model, quantize=quantize, block_size=block_size, method=method, calibration=calibration, stats=stats,
        embeddings=embeddings, int8=int8, factors=factors, rank_step=rank_step, alternate=alternate,
        bias_correction=bias_correction,
        budgeted=target_size is not None or ratio is not None or target_latency is not None, include=include,
        exclude=exclude, batch_size=batch_size, mask_input=mask_input, shapes=shapes, fisher_options=fisher_options,
        progress=progress, timed=target_latency is not None, checked=True, feed=feed)
    return build_quantized(job, target_size=target_size, ratio=ratio, rank=rank, target_latency=target_latency,
                           latency=latency, input_forms=input_forms, checked=True)


def prepare_quantized(
    model, *, quantize: str = "int4", block_size: int = 32, method: str = "kfac", calibration=None, stats=None,
    embeddings: str = "auto", int8: str = "dynamic", factors: str = "float16", rank_step: int = 8,
    alternate: int = 0, bias_correction: bool | None = None, budgeted: bool = True, include=None, exclude=None,
    batch_size: int = 32, mask_input=None, shapes=None, fisher_options: dict | None = None, progress: bool = True,
    timed: bool = False, checked: bool = False, feed=None,
) -> QuantizeJob:
    """Load, find sites and tables, gather statistics (and, when `budgeted`, the tables' loss statistics; when
    `timed`, for a latency budget, the timing batch instead, the tables following the rule). `checked`: the
    options were checked by the caller; `feed`: the timing batch, when the caller has it."""
    if not checked:
        check_options(quantize, block_size, method, embeddings, int8, factors, rank_step, alternate)
    fisher_options = fisher_options or {}
    prepared = prepare(model, method=method, include=include, exclude=exclude, calibration=calibration,
                       stats=stats, batch_size=batch_size, mask_input=mask_input, shapes=shapes,
                       fisher_options=fisher_options, progress=progress)
    sites, skipped = _quantizable(prepared)
    schemes = _site_schemes(quantize, block_size, int8)
    if quantize != "auto":
        _check_divisible(sites, schemes[0])
    if bias_correction is None:
        bias_correction = get_method(method).bias_correction
    job = QuantizeJob(prepared, sites, skipped, {s.weight: _metric(prepared, s, bias_correction) for s in sites},
                      schemes, quantize, block_size, int8, rank_step, bias_correction, alternate, factors,
                      original_bytes=_bytes(prepared.model))
    if embeddings != "keep":
        job.tables = find_tables(prepared.model, exclude={s.weight for s in prepared.sites})
    if budgeted:
        priced = job.tables if embeddings == "auto" and not timed else []
        _measure_quantization(job, priced, calibration, batch_size, mask_input, shapes, fisher_options, progress)
    if timed:
        job.feed = feed if feed is not None else timing_feed(prepared.model, calibration, batch_size, shapes)
    job.rule_tables = {t.name: _table_rule(t, quantize, embeddings, block_size, job.warnings) for t in job.tables}
    job.fixed_tables = {name: s for name, s in job.rule_tables.items() if name not in job.table_loss}
    return job


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
        chosen = [_fixed_option(s, job.schemes[0], rank, FACTOR_DTYPES[job.factors]) for s in job.sites]
        tables = dict(job.rule_tables)
        model_out, results = _build(job, chosen, tables)
    else:
        model_out, results, tables = _build_within(job, target)
    report = _report(job, model_out, results, tables)
    report.allocation = "latency" if speed else "budget" if target is not None else "uniform"
    report.budget = {"quantize": job.quantize, "block_size": job.block_size, "int8": job.int8, "rank": rank,
                     "target_size": target, "ratio": ratio, "bias_correction": job.bias_correction,
                     "bytes_before": job.original_bytes, "bytes_after": _bytes(model_out),
                     "target_latency": target_latency}
    if speed:
        report.budget["speed"] = speed
        report.warnings += latency_notes(speed)
    return model_out, report


def _build_for_latency(job: QuantizeJob, target: float, latency, input_forms):
    """The options within the latency budget (pipeline.quantized_speed), built, each site's report line with
    its predicted time; embedding tables follow the rule (a lookup is not where the time goes)."""
    if job.feed is None:
        raise RuntimeError("a latency budget needs the job prepared with timed=True")
    latency = latency if latency is not None else MeasuredLatency()
    forms = input_forms or InputForms(job.prepared.model)
    site_choices = _options(job)[:len(job.sites)]
    chosen, speed = allocate_latency(job.prepared.model, job.sites, site_choices, target, latency, job.feed, forms,
                                     job.quantize)
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
    if budgeted and not get_method(method).loss_units:
        what = "a latency budget" if target_latency is not None else "a byte budget"
        raise FwlrError(f"{what} compares sites in loss units, which needs gradient statistics; use `method` "
                        f"kfac or fwsvd instead of {method}, or drop the budget.")
    if rank < 0:
        raise FwlrError(f"`rank` {rank} is out of range; give a non-negative correction rank.")


def _quantizable(prepared: Prepared) -> tuple[list[Site], list[Skipped]]:
    sites, skipped = [], list(prepared.skipped)
    for site in prepared.sites:
        reason = None
        if is_recurrent(site):
            reason = "an LSTM/GRU weight: ONNX Runtime's block quantizers take MatMul weights only"
        elif site.dtype != "float32":
            reason = f"a {site.dtype} weight: quantized from float32 weights only"
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


def _measure_quantization(job: QuantizeJob, tables, calibration, batch_size, mask_input, shapes, fisher_options,
                          progress) -> None:
    """The losses the budget needs beyond the sites' statistics, in one pass (quant.calibration): the `tables`'
    (budgeted ones: --embeddings auto under a byte budget) and dynamic int8's activation rounding (with a K-FAC
    output Gram)."""
    prepared = job.prepared
    dynamic = any(s.kind == "dynamic" for s in job.schemes) and prepared.stats is not None and all(
        m.right is not None for m in job.metrics.values())
    visible = main_graph_tensors(prepared.model)
    inputs = {s.weight: [u.input for u in s.uses if u.input in visible] for s in job.sites} if dynamic else {}
    tensors = sorted({name for names in inputs.values() for name in names})
    if not tables and not tensors:
        return
    if calibration is None:
        job.warnings.append("no calibration data (`calibration`) to price embedding tables and int8's activation "
                            "rounding: "
                            "tables follow `quantize`, and int8's predicted loss counts its weight error only.")
        return
    batches = open_data(calibration, prepared.model, batch_size=batch_size, shapes=shapes)
    meta = prepared.stats.meta
    options = {k: v for k, v in fisher_options.items() if k in ("samples", "seed")}
    measured = collect_quant_stats(prepared.model, tables, tensors, batches, loss=meta.get("loss"),
                                   output=meta.get("fisher_output"), mask_input=mask_input, progress=progress,
                                   **options)
    job.table_loss = {name: s.loss for name, s in measured.tables.items()}
    for site in job.sites:
        if inputs.get(site.weight):
            variance = np.mean([measured.rounding_variance(t) for t in inputs[site.weight]])
            weighted = job.metrics[site.weight].right.apply_right(job.prepared.weights[site.weight])
            job.rounding_loss[site.weight] = float(variance * np.sum(weighted * weighted))


def _table_schemes(table: Table, quantize: str, block_size: int) -> list[Scheme]:
    blocks = [block_size] if quantize == "int4" else sorted(set(AUTO_BLOCKS) | {block_size})
    return [INT8_DYNAMIC] + [nbits(4, b) for b in blocks if table.D % b == 0]


def _options(job: QuantizeJob) -> list[list[Option]]:
    """Every site's and budgeted table's options, computed once per run."""
    if job.choices is None:
        job.choices = []
        for site in job.sites:
            usable = [s for s in job.schemes if s.kind != "nbits" or site.K % s.block_size == 0]
            job.choices.append(plan.site_options(
                job.prepared.weights[site.weight], job.metrics[site.weight], usable, dense=job.quantize == "auto",
                low_rank=job.quantize == "auto", rank_step=job.rank_step, factor_bytes=FACTOR_DTYPES[job.factors],
                scheme_loss={INT8_DYNAMIC: job.rounding_loss.get(site.weight, 0.0)}))
        for table in _budgeted_tables(job):
            job.choices.append(plan.table_options(table_array(job.prepared.model, table), job.table_loss[table.name],
                                                  _table_schemes(table, job.quantize, job.block_size)))
    return job.choices


def _budgeted_tables(job: QuantizeJob) -> list[Table]:
    return [t for t in job.tables if t.name in job.table_loss]


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
    return picked[:n], tables


def _fixed_bytes(job: QuantizeJob) -> int:
    """Bytes the budget cannot move: everything but the budgeted weights, plus the records rewriting adds."""
    fixed = job.original_bytes - sum(4 * s.K * s.N for s in job.sites) + SITE_OVERHEAD * len(job.sites)
    for table in job.tables:
        fixed += TABLE_OVERHEAD - 4 * table.V * table.D
        if table.name in job.fixed_tables:
            fixed += job.fixed_tables[table.name].table_bytes(table.V, table.D)
    return fixed


def _build_within(job: QuantizeJob, target: int):
    """Allocate, build, and measure; when the records cost more than estimated, allocate again with the
    excess taken off (the bytes of a model are only known once it is built)."""
    available, slack = target - _fixed_bytes(job), 0
    for _ in range(FIT_ATTEMPTS):
        chosen, tables = _allocate(job, available - slack, target)
        model_out, results = _build(job, chosen, tables)
        excess = _bytes(model_out) - target
        if excess <= 0:
            return model_out, results, tables
        slack = 2 * slack + excess  # another choice may bring other records: close in fast
    raise RuntimeError(f"the built model stays {excess:,} bytes above the target after {FIT_ATTEMPTS} allocations")


def _bytes(model: onnx.ModelProto) -> int:
    return model.ByteSize() + external_bytes(model)


def _build(job: QuantizeJob, chosen: list[Option], tables: dict[str, Scheme]):
    """The rewritten model for these options, and one SiteResult per site."""
    plans, results = {}, []
    for site, option in zip(job.sites, chosen):
        W = job.prepared.weights[site.weight]
        metric = job.metrics[site.weight]
        site_plan, error = plan.site_plan(W, metric, option, bias_correction=job.bias_correction,
                                          alternate_rounds=job.alternate)
        if option.key == INT8_DYNAMIC:
            error += job.rounding_loss.get(site.weight, 0.0)
        total = compensate.weighted_error(W, metric.left, metric.right)
        stored = site.params if option.storage in (plan.FP32, plan.LOW_RANK) and option.rank == 0 else (
            option.rank * (site.K + site.N) + (0 if option.storage == plan.LOW_RANK else site.params))
        results.append(SiteResult(
            name=site.name, weight=site.weight, op_type=site.uses[0].op_type, K=site.K, N=site.N,
            rank=None if option.storage == plan.FP32 else option.rank, params_before=site.params,
            params_after=stored, weighted_error=error, relative_error=relative_frobenius(error, total),
            note=f"{option.label}: {option.bytes:,} bytes (fp32 {4 * site.params:,})"))
        if site_plan is not None:
            plans[site.weight] = site_plan
    return rewrite(job.prepared.model, plans, tables, job.factors), results


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
        report.sites.append(SiteResult(name=table.name, weight=table.name, op_type="Gather", K=table.V, N=table.D,
                                       rank=None, params_before=table.params, params_after=table.params,
                                       note=f"embedding table {label}: {size:,} bytes (fp32 {4 * table.params:,})"))
    report.model_params_before, report.ops_before = model_parameters(prepared.model), op_counts(prepared.model)
    report.model_params_after, report.ops_after = model_parameters(model_out), op_counts(model_out)
    return report
