"""The whole pipeline behind `onnx_fwlr.compress` and `onnx-fwlr compress`, and the other public stages.

    model, report = onnx_fwlr.compress("model.onnx", ratio=0.5, method="kfac", calibration="calib.npz")

prepare (load, sites, statistics) → budget.choose_ranks → [sequential correction] → build; structured
replacements go through pipeline.structured. `calibrate` and `validate` are the other stages users call.
"""

from __future__ import annotations

import numpy as np
import onnx
from tqdm.auto import tqdm

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.evaluate.report import Report
from onnx_fwlr.io.data import open_data
from onnx_fwlr.io.model import load_model
from onnx_fwlr.methods.registry import METHODS, get_method
from onnx_fwlr.pipeline.budget import ALLOCATIONS, Budget, check_reachable, choose_ranks
from onnx_fwlr.pipeline.build import build
from onnx_fwlr.pipeline.config import (
    BudgetOptions,
    CompareOptions,
    DataOptions,
    MethodOptions,
    QuantizeOptions,
    RefineOptions,
    RunConfig,
    SiteOptions,
    SpeedOptions,
    StructuredOptions,
    fisher_group,
)
from onnx_fwlr.pipeline.defaults import (
    ACTIVATION_DEFAULT,
    DATA_FREE_NOTE,
    default_allocation,
    default_method,
)
from onnx_fwlr.pipeline.distributed import ready_executor
from onnx_fwlr.pipeline.prepare import Prepared, ensure_decompositions, prepare
from onnx_fwlr.pipeline.sequential import correct_sequentially
from onnx_fwlr.pipeline.speed import choose_ranks_for_speed, speed_notes
from onnx_fwlr.pipeline.structured import compress_structured
from onnx_fwlr.sites.find import validate_regex
from onnx_fwlr.sites.recurrent import find_all_sites
from onnx_fwlr.stats.activations import collect_activation_stats
from onnx_fwlr.stats.store import Statistics

__all__ = ["ALLOCATIONS", "METHODS", "Budget", "Prepared", "build", "calibrate", "check_method", "choose_ranks",
           "compress", "ensure_decompositions", "prepare", "validate"]


def check_method(method: str, allocation: str) -> None:
    if method not in METHODS:
        raise FwlrError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}.")
    if allocation not in ALLOCATIONS:
        raise FwlrError(f"unknown allocation '{allocation}'; choose one of {', '.join(ALLOCATIONS)}.")
    if allocation == "global" and not METHODS[method].loss_units:
        raise FwlrError(
            "`allocation` global ranks sites in loss units and needs gradient statistics; use `method` fwsvd or "
            "kfac with it, or `allocation` uniform."
        )


# Long: the public signature (one keyword per pipeline option) and its docstring; the body is short.
def compress(
    model: str | onnx.ModelProto,
    *,
    ratio: float | None = None,
    rank: int | None = None,
    ranks: dict | None = None,
    target_size: int | None = None,
    max_error: float | None = None,
    validation=None,
    outputs: list[str] | None = None,
    common_prefix: bool = False,
    method: str | None = None,
    allocation: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    keep_attention: bool = False,
    calibration=None,
    stats=None,
    batch_size: int = 32,
    mask_input: str | None = None,
    shapes: dict | None = None,
    bias_correction: bool | None = None,
    fisher_options: dict | None = None,
    sequential: bool = False,
    methods: list[str] | None = None,
    dope: float = 0.0,
    dope_share: float | None = None,
    kron_shape: tuple[int, int, int, int] | None = None,
    forms: str = "default",
    form_timer=None,
    svd: str = "auto",
    workers: int = 1,
    executor=None,
    stats_memory: int | None = None,
    refine_steps: int | None = None,
    refine_lr: float = 3e-5,
    refine_dope_dropout: float | None = None,
    rank_multiple: int | str | None = None,
    target_latency: float | None = None,
    latency=None,
    latency_threads: int | None = None,
    latency_cache: str | None = None,
    quantize: str | None = None,
    block_size: int = 32,
    embeddings: str = "auto",
    int8: str = "dynamic",
    factor_dtype: str = "float16",
    accuracy_level: int | str | None = None,
    merge_corrections: bool = False,
    progress: bool = True,
    latency_check: bool = False,
    batch_axes: dict[str, int] | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Factorise every selected constant MatMul/Gemm weight; returns the new model and a report.

    `method` and `allocation` None (the defaults) mean the best the data allows (pipeline/defaults.py,
    docs/defaults.md): with `calibration` data, kfac with loss-unit global allocation (its loss seeds need no
    labels; whiten with uniform ranks when the backward pass cannot run on the model); with `stats`, kfac
    and global when they hold gradients, else whiten and uniform; without data, svd with uniform ranks, and
    the report says the result is data-free. A method given with no allocation gets global allocation when
    it has loss-unit (gradient) statistics, else uniform. Every argument is checked, and every sample of
    `validation` and file or list `calibration` data is read and checked, before any work. `outputs` and
    `common_prefix` (and `batch_axes`) choose what `validation` compares (evaluate.validation.compare_models).
    The input (path or ModelProto) is never modified. Methods other than svd need statistics: give
    `calibration` data (a .npz path, a folder of them, an iterable of feed dicts, a CalibrationDataReader,
    or "random" for a smoke test) or precomputed `stats` (a Statistics object or a stats file path).
    `max_error` searches the smallest ratio whose outputs stay within that relative L2 error on
    `validation` data. `sequential` refits every site, depth by depth, to the input it receives in the
    partially compressed model (sequential.py); it reads `calibration` once per depth. `svd` "auto" uses a
    randomised SVD where the rank is known first and small (methods.lowrank.use_randomized); `workers` decomposes
    sites in that many processes (same output bytes); `executor` (pipeline.distributed.Executor) measures
    calibration in shards and decomposes on a Ray cluster instead (docs/distributed.md).
    `stats_memory` (bytes; default a third of physical
    memory) bounds the activation Grams held at once: beyond it calibration reads the data once per group
    of sites (calibration.GroupedStatistics). `refine_steps` then distils the factors against the original
    on `calibration` (refine.loop.refine; early stopping on held-back calibration data, so `validation` stays
    unseen), and `validation` data last compares the result with the original (report.checked).
    `rank_multiple` (an int, or "auto" to measure it) rounds ranks to values the kernels run fast at;
    `target_latency` (a fraction of the original's latency, a budget of its own) allocates ranks by measured
    latency in loss units (pipeline/speed.py); `latency` is the latency model to use (default
    cost.latency.MeasuredLatency(); tests pass one with a fake timer). An already-quantized input is
    dequantized, compressed in float and quantized back; its `ratio`/`target_size` count the input's bytes,
    and `latency_check` times the output against it at the data's row count and says how they compare.
    Structured (`--method kron`, `--dope`): `dope_share` spends that share of each site's stored numbers on
    doping instead of `dope`; `forms` "measured" times each site's ONNX forms here and keeps dense a site none of
    whose forms beats its dense weight (`form_timer`: cost.forms.OrtFormTimer by default, a fake in tests);
    without `kron_shape`, Kronecker shapes are chosen by error and time measured with `form_timer` (at `latency`'s
    threads and cache folder when given; cost.kron_speed); `kron_shape="balanced"`: by error alone, no timing;
    `refine_dope_dropout` is refine's co-matrix dropout probability (refine.loop.refine).
    `latency_threads` and `latency_cache` set the measured latency model made when none is given.
    `quantize` "int4" | "int8" | "auto" stores each weight with ONNX Runtime's quantizer plus a low-rank
    correction instead (pipeline.quantized.compress_quantized: `block_size`, `embeddings`, `int8`, and
    `factor_dtype` its `factors`); `ratio`/`target_size` then count bytes, `rank` is the correction rank;
    `accuracy_level` 0 | 4 | "auto" sets MatMulNBits' accuracy_level per site (default "auto" under a latency
    budget, else 0) and `merge_corrections` lets sites reading one activation share their correction's first
    factor (compress_quantized's `accuracy_level` and `merge`).
    The keywords fill a pipeline.config.RunConfig, which pipeline.run.run carries out.
    """
    from onnx_fwlr.pipeline.run import run  # run calls back into _factorise and validate below

    config = RunConfig(
        model=model,
        data=DataOptions(calibration=calibration, stats=stats, validation=validation, batch_size=batch_size,
                         mask_input=mask_input, shapes=shapes, stats_memory=stats_memory),
        fisher=fisher_group(fisher_options),
        sites=SiteOptions(include=include, exclude=exclude, keep_attention=keep_attention),
        budget=BudgetOptions(ratio=ratio, rank=rank, ranks=dict(ranks or {}), target_size=target_size,
                             max_error=max_error, target_latency=target_latency),
        method=MethodOptions(method=method, allocation=allocation, bias_correction=bias_correction,
                             sequential=sequential, svd=svd, workers=workers, executor=executor),
        structured=StructuredOptions(methods=tuple(methods) if methods else None, dope=dope, dope_share=dope_share,
                                     kron_shape=_kron_shape(kron_shape), forms=forms),
        quantize=QuantizeOptions(mode=quantize, block_size=block_size, embeddings=embeddings, int8=int8,
                                 factor_dtype=factor_dtype, accuracy_level=accuracy_level,
                                 merge_corrections=merge_corrections),
        refine=RefineOptions(steps=refine_steps, lr=refine_lr, dope_dropout=refine_dope_dropout),
        speed=SpeedOptions(rank_multiple=rank_multiple, latency_threads=latency_threads,
                           latency_cache=latency_cache, latency_check=latency_check),
        compare=CompareOptions(outputs=tuple(outputs) if outputs is not None else None, common_prefix=common_prefix,
                               batch_axes=dict(batch_axes) if batch_axes else None),
        progress=progress)
    return run(config, latency=latency, form_timer=form_timer)


def _kron_shape(kron_shape):
    """`kron_shape` as the config holds it: "balanced" as given, four numbers as a tuple."""
    if kron_shape is None or isinstance(kron_shape, str):
        return kron_shape
    return tuple(kron_shape)


# Long: a keyword-only signature mirroring compress(); the body is one decision per stage.
def _factorise(model, *, ratio, rank, ranks, target_size, max_error, validation, method, allocation, include,
               exclude, keep_attention, calibration, stats, batch_size, mask_input, shapes, bias_correction,
               fisher_options, sequential, methods, dope, kron_shape, svd, workers, stats_memory, progress,
               executor=None, rank_multiple=None, target_latency=None, latency=None, compare=None,
               structured_options=None, input_forms=None, timing_feed=None, reuse=None):
    """compress() up to the factorised model: budget, structure choice, statistics, ranks, build (pipeline.run
    calls it with options RunConfig has checked, and the executor ready). `reuse` (pipeline.run.Reuse): the
    method's prepared sites and whole decompositions, taken from it or left in it for the next run."""
    budget = Budget(ratio, rank, target_size, max_error, dict(ranks or {}), target_latency=target_latency)
    defaulted = method is None and not methods
    structured_options = structured_options or {}
    structured = bool(methods and len(methods) > 1) or "kron" in (methods or [method]) or bool(dope) \
        or kron_shape is not None or structured_options.get("dope_share") is not None
    if defaulted:
        method = default_method(calibration, stats, structured)
    if allocation is None and structured:
        allocation = "uniform"
    mix = list(methods) if methods else [method]  # speed options and `forms`: checked by pipeline.checks
    if structured:
        if executor is not None and executor.sharded:
            raise FwlrError("`executor` ray and `shards` spread plain low-rank compression; drop them with `method` "
                            "kron, `methods` or `dope`.")
        if sequential:
            raise FwlrError("`sequential` refits plain low-rank factors only; drop it with `method` kron, `methods` "
                            "or `dope`.")
        return compress_structured(
            model, mix, budget, allocation, bias_correction, dope, kron_shape,
            dict(include=include, exclude=exclude, keep_attention=keep_attention, calibration=calibration, stats=stats,
                 batch_size=batch_size, mask_input=mask_input, shapes=shapes, fisher_options=fisher_options,
                 stats_memory=stats_memory, progress=progress), latency=latency, **structured_options,
            feed=timing_feed)
    method = mix[0]
    check_method(method, allocation or "uniform")
    if max_error is not None and validation is None:
        raise FwlrError("`max_error` needs validation data to measure the error on; pass `validation`.")
    prepared = reuse.prepared.get(method) if reuse is not None else None
    if prepared is not None:
        check_reachable(prepared, budget)  # prepare checks a new preparation's budget before its statistics
    else:
        prepared = prepare(
            model, method=method, include=include, exclude=exclude, keep_attention=keep_attention,
            calibration=calibration, stats=stats, batch_size=batch_size, mask_input=mask_input, shapes=shapes,
            fisher_options=fisher_options, svd=svd, workers=workers, stats_memory=stats_memory, progress=progress,
            executor=executor, fallback=ACTIVATION_DEFAULT if defaulted and get_method(method).loss_units else None,
            tie_heads=True, budget=budget,
        )
        if reuse is not None:  # every later budget reads whole spectra: decompose fully once
            ensure_decompositions(prepared)
            reuse.prepared[method] = prepared
    method = prepared.method  # a default gradient method may have fallen back to whiten
    allocation = _resolve_allocation(prepared, allocation, data_free=defaulted and method == "svd")
    if bias_correction is None:
        bias_correction = get_method(method).bias_correction
    if not prepared.sites:
        return build(prepared, [], allocation, budget, bias_correction)
    if max_error is not None:
        return _search_max_error(prepared, budget, allocation, bias_correction, validation, batch_size, progress,
                                 compare or {})
    ranks_chosen, speed = choose_ranks_for_speed(prepared, budget, allocation, rank_multiple, latency, calibration,
                                                 batch_size, shapes, input_forms, timing_feed)
    corrected = None
    if sequential:
        corrected = correct_sequentially(prepared, ranks_chosen, calibration, bias_correction, batch_size=batch_size,
                                         mask_input=mask_input, shapes=shapes, progress=progress)
    if budget.target_latency is not None:
        allocation = "latency"
    compressed, report = build(prepared, ranks_chosen, allocation, budget, bias_correction, corrected=corrected,
                               keep_decompositions=reuse is not None)
    if speed is not None:
        report.budget["speed"] = speed
        report.warnings += speed_notes(speed)
        for row in report.sites:
            if row.name in speed.get("kept_dense", []):
                row.note = "kept dense: its factored form is not faster than its dense op here (measured)"
    return compressed, report


def _resolve_allocation(prepared: Prepared, allocation: str | None, data_free: bool) -> str:
    """The caller's allocation (checked against the method actually used), or the default one; the report
    says when the result is data-free or global allocation had to give way."""
    if data_free and prepared.sites and DATA_FREE_NOTE not in prepared.warnings:  # once, with `reuse` too
        prepared.warnings.append(DATA_FREE_NOTE)
    if allocation is None:
        allocation, why = default_allocation(prepared)
        if why and why not in prepared.warnings:
            prepared.warnings.append(why)
    check_method(prepared.method, allocation)
    return allocation


def _search_max_error(prepared, budget, allocation, bias_correction, validation, batch_size, progress, compare):
    """Bisection over the ratio: the smallest one whose worst relative output error stays under max_error."""
    low, high, best = 0.0, 1.0, None
    history = []
    ensure_decompositions(prepared)  # the search moves up and down in rank: decompose fully once
    for _ in tqdm(range(8), desc="search ratio", disable=not progress, leave=False):
        middle = (low + high) / 2
        trial = Budget(ratio=middle, ranks=budget.ranks)
        model, report = build(prepared, choose_ranks(prepared, trial, allocation), allocation, budget, bias_correction)
        result = validate(prepared.model, model, validation, batch_size=batch_size, progress=False, **compare)
        error = max(o.rel_l2_error for o in result.outputs)
        history.append({"ratio": middle, "rel_error": error})
        if error <= budget.max_error:
            high, best = middle, (model, report, result, middle)
        else:
            low = middle
    if best is None:
        model, report = build(prepared, [None] * len(prepared.sites), allocation, budget, bias_correction)
        report.warnings.append(f"no ratio met `max_error` {budget.max_error}; every site was kept dense.")
        report.budget["search"] = history
        return model, report
    model, report, result, ratio = best
    report.budget.update(ratio_found=ratio, search=history)
    report.validation = result.to_dict()
    report.checked = result
    return model, report


def calibrate(
    model: str | onnx.ModelProto,
    calibration,
    *,
    fisher: bool = False,
    include: str | None = None,
    exclude: str | None = None,
    batch_size: int = 32,
    mask_input: str | None = None,
    shapes: dict | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    executor=None,
    **fisher_options,
) -> Statistics:
    """Statistics for every site, to save and reuse across compress runs (and to merge across shards).
    `executor` (pipeline.distributed.Executor): measured in `executor.shards` shards, on a Ray cluster
    when its kind is "ray", and added up in shard order (the same bytes for the same shard count)."""
    executor = ready_executor(executor, 1)
    if executor is not None and executor.sharded and shard is not None:
        raise FwlrError("`shard` measures one part of the data here; drop it to let `executor` measure every shard.")
    source = model
    model = load_model(model)
    validate_regex(include, "`include`")
    validate_regex(exclude, "`exclude`")
    sites, _ = find_all_sites(model, include, exclude, fisher=fisher)
    if not sites:
        raise FwlrError("the model has no factorisable MatMul/Gemm weight, so there is nothing to calibrate.")
    if executor is not None and executor.sharded:
        from onnx_fwlr.pipeline.distributed import sharded_statistics

        return sharded_statistics(source, model, sites, calibration, executor, gradients=fisher,
                                  batch_size=batch_size, shapes=shapes, mask_input=mask_input,
                                  fisher_options=fisher_options)
    batches = open_data(calibration, model, batch_size=batch_size, shapes=shapes, shard=shard)
    if fisher:
        from onnx_fwlr.stats.fisher import collect_fisher_stats

        return collect_fisher_stats(model, sites, batches, mask_input=mask_input, progress=progress, **fisher_options)
    return collect_activation_stats(model, sites, batches, mask_input=mask_input, progress=progress)


def validate(
    original: str | onnx.ModelProto,
    compressed: str | onnx.ModelProto,
    data,
    *,
    batch_size: int = 32,
    outputs: list[str] | None = None,
    progress: bool = True,
    common_prefix: bool = False,
    set_aside: bool = False,
    batch_axes: dict[str, int] | None = None,
):
    """Compare both models on the same batches (labels from the data's `labels` key, when present); `outputs`,
    `common_prefix`, `set_aside` and `batch_axes` as in evaluate.validation.compare_models."""
    from onnx_fwlr.evaluate.validation import compare_models

    reference = original if isinstance(original, onnx.ModelProto) else load_model(original)
    batches = open_data(data, reference, batch_size=batch_size)
    labels = [lab for _, lab in batches if lab is not None]
    feeds = (feed for feed, _ in batches)
    return compare_models(original, compressed, feeds, labels=np.concatenate(labels) if labels else None,
                          outputs=outputs, progress=progress, common_prefix=common_prefix,
                          total=getattr(batches, "total", None), set_aside=set_aside, batch_axes=batch_axes)
