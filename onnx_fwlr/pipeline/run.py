"""The one compress run behind `onnx_fwlr.compress` and `onnx-fwlr compress`:

    quantized input → float (dequantize) → replacement (low rank | structured | quantized + correction)
    → [sequential] → [refine] → requantize → speed guard → validate

`run(config)` owns that sequence; what it derives once (the loaded quantized input, its latency forms, the
latency model, the form timer) lives in a RunContext, so no stage builds its own.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import onnx

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.evaluate.report import Report
from onnx_fwlr.io.model import external_bytes, file_size, load_model, message_bytes
from onnx_fwlr.pipeline.budget import budget_record
from onnx_fwlr.pipeline.checks import quantize_method
from onnx_fwlr.pipeline.config import RunConfig
from onnx_fwlr.pipeline.defaults import check_data_first
from onnx_fwlr.pipeline.distributed import ready_executor
from onnx_fwlr.pipeline.quantized_input import (
    QuantizedInput,
    dequantize_input,
    measure_against_input,
    requantize_output,
    site_budget_ratio,
)
from onnx_fwlr.pipeline.speed import InputForms, check_measured_speed, input_forms, timing_feed


@dataclass
class Reuse:
    """What runs of one model under several budgets share (workflows.sweep): each method's prepared sites and
    their whole decompositions, made by the first run that needs them. Give runs with different budgets and
    the same model, sites, statistics and method options only."""

    prepared: dict = field(default_factory=dict)  # method asked for -> pipeline.prepare.Prepared
    shared: dict = field(default_factory=dict)  # method -> what its first run had beside the budget

    def check(self, config: RunConfig) -> None:
        """Refuse a run that differs from its method's first run in more than the budget and the allocation
        (the decompositions would not be this run's)."""
        shared = (id(config.model), id(config.data.stats), config.data.calibration, config.sites, config.fisher,
                  dataclasses.replace(config.method, allocation=None, bias_correction=None), config.structured,
                  config.quantize.mode)
        if self.shared.setdefault(config.method.method, shared) != shared:
            raise FwlrError("`reuse` shares a method's decompositions between runs of one model, data and site "
                            "selection under different budgets; this run differs in more than its budget.")


@dataclass
class RunContext:
    """What a run derives from its config once: the quantized input's float form (None for a float input), the
    forms its sites are timed in, the batch everything is timed at (its first calibration batch or `shapes`),
    and the latency model and form timer (given by the caller, e.g. with a fake timer in tests, or made here
    from the speed options when the run times anything)."""

    quantized: QuantizedInput | None
    input_forms: InputForms | None
    latency: object = None
    form_timer: object = None
    feed: dict | None = None


def make_context(config: RunConfig, latency=None, form_timer=None) -> RunContext:
    """Dequantize a quantized input, and make the latency model and form timer the options need (a latency
    budget, ranks rounded by measurement, Kronecker shapes chosen by measured speed, `forms` measured)."""
    quantized = dequantize_input(config.model)
    timed = config.timed if config.quantize.mode is None else config.budget.target_latency is not None
    forms = input_forms(config.model, quantized) if timed else None
    feed = None
    if timed or config.structured.forms == "measured":
        data = config.data
        structure = quantized.float_model if quantized else load_model(config.model, lazy=True)
        feed = timing_feed(structure, data.calibration, data.batch_size, data.shapes)
    if latency is None and (timed or _kron_timed(config)):
        from onnx_fwlr.cost.latency import MeasuredLatency

        latency = MeasuredLatency(threads=config.speed.latency_threads, cache_dir=config.speed.latency_cache)
    if form_timer is None and config.structured.forms == "measured":
        from onnx_fwlr.cost.forms import OrtFormTimer

        form_timer = OrtFormTimer(threads=config.speed.latency_threads)
    return RunContext(quantized, forms, latency, form_timer, feed)


def _kron_timed(config: RunConfig) -> bool:
    """Whether Kronecker shapes are chosen by measured speed (no `kron_shape`): the latency model's threads and
    cache folder then time the candidate shapes (pipeline.structured.site_speeds)."""
    structured = config.structured
    kron = config.method.method == "kron" or "kron" in (structured.methods or ())
    return config.quantize.mode is None and kron and structured.kron_shape is None


def run(config: RunConfig, *, latency=None, form_timer=None, reuse: Reuse | None = None
        ) -> tuple[onnx.ModelProto, Report]:
    """Compress `config.model` as `config` asks; returns the new model and its report (the input is never
    modified). `latency` (cost.latency.MeasuredLatency) and `form_timer` (cost.forms.OrtFormTimer)
    replace the ones the speed options would make (tests pass fakes). `reuse`: low-rank decompositions shared
    with earlier runs of the same model under other budgets (Reuse)."""
    data = config.data
    if reuse is not None:
        reuse.check(config)
    executor = ready_executor(config.method.executor, config.method.workers)  # Ray: connected before any work
    check_data_first(config.model, [data.calibration, data.validation], data.batch_size, data.shapes)
    context = make_context(config, latency, form_timer)
    source = context.quantized.float_model if context.quantized else config.model  # what the replacement reads
    if config.quantize.mode is not None:
        compressed, report = _quantized_replacement(source, config, context)
    else:
        compressed, report = _factorised_replacement(source, config, context, executor, reuse)
        compressed = _refine(source, compressed, report, config)
    if context.quantized:
        compressed = _requantize(compressed, context.quantized, report, config)
    if _speed_checked(config, report):  # timed as written, before anything is written
        check_measured_speed(config.model, compressed, report, context.latency, data.calibration, data.batch_size,
                             data.shapes, context.feed)
    elif context.quantized and _changed(config, report) and config.speed.latency_check:
        measure_against_input(config.model, compressed, report, context.latency, data.calibration, data.batch_size,
                              data.shapes)
    _validate(compressed, report, config, context)
    counted = "bytes" if "input_bytes" in report.budget else config.currency  # a quantized input's own bytes
    report.budget.update(budget_record(counted, config.budget, report, _model_bytes(counted, config, compressed,
                                                                                    report)))
    report.config = config.to_dict(strict=False)
    return compressed, report


def _model_bytes(currency: str | None, config: RunConfig, compressed, report: Report) -> tuple[int, int] | None:
    """(input, output) bytes of a byte budget the replacement counted in parameters (low rank under
    `target_size`, or a share of a quantized input's bytes); None otherwise (the quantized path counts the
    model's bytes itself)."""
    if currency != "bytes" or config.quantize.mode is not None:
        return None
    model = config.model
    if "input_bytes" in report.budget:
        before = report.budget["input_bytes"]
    elif isinstance(model, (str, os.PathLike)):
        before = file_size(model)
    else:
        before = message_bytes(model) + external_bytes(model)
    return before, message_bytes(compressed) + external_bytes(compressed)


def _factorised_replacement(source, config: RunConfig, context: RunContext, executor=None, reuse=None):
    """Low rank (or structured) factors of every selected site (pipeline.compress._factorise). A quantized
    input's `ratio`/`target_size` count its bytes: the float sites keep the share of their stored bytes that
    meets it (pipeline.quantized_input.site_budget_ratio), and the report says so."""
    from onnx_fwlr.pipeline.compress import _factorise

    data, method, budget, structured = config.data, config.method, config.budget, config.structured
    quantized = context.quantized
    ratio, target_size = budget.ratio, budget.target_size
    in_bytes = quantized is not None and bool(quantized.dequantized.sites) and (
        ratio is not None or target_size is not None)
    if in_bytes:
        ratio = site_budget_ratio(quantized, config.sites.include, config.sites.exclude, ratio=budget.ratio,
                                  target_size=budget.target_size)
        target_size = None
    compressed, report = _factorise(
        source, ratio=ratio, rank=budget.rank, ranks=dict(budget.ranks), target_size=target_size,
        max_error=budget.max_error, validation=data.validation, method=method.method, allocation=method.allocation,
        include=config.sites.include, exclude=config.sites.exclude, keep_attention=config.sites.keep_attention,
        calibration=data.calibration, stats=data.stats, batch_size=data.batch_size, mask_input=data.mask_input,
        shapes=data.shapes, bias_correction=method.bias_correction, fisher_options=config.fisher.as_dict(),
        sequential=method.sequential, executor=executor,
        methods=list(structured.methods) if structured.methods else None,
        dope=structured.dope, kron_shape=structured.kron_shape, svd=method.svd, workers=method.workers,
        stats_memory=data.stats_memory, progress=config.progress, rank_multiple=config.speed.rank_multiple,
        target_latency=budget.target_latency, latency=context.latency, compare=_compare(config),
        structured_options=dict(dope_share=structured.dope_share, forms=structured.forms,
                                form_timer=context.form_timer),
        input_forms=context.input_forms, timing_feed=context.feed, reuse=reuse)
    if in_bytes:
        report.budget.update(ratio=budget.ratio, target_size=budget.target_size, input_bytes=quantized.input_bytes,
                             sites_ratio=ratio)
        report.input_quantization += (f"; the budget counted the input's {quantized.input_bytes:,} bytes (the "
                                      f"factorised weights kept {ratio:.3f} of their stored bytes)")
    return compressed, report


def _quantized_replacement(source, config: RunConfig, context: RunContext):
    """ONNX Runtime's quantizer plus a low-rank correction per site (pipeline.quantized.compress_quantized)."""
    from onnx_fwlr.pipeline.quantized import compress_quantized

    data, budget, quantize = config.data, config.budget, config.quantize
    return compress_quantized(
        source, quantize=quantize.mode, block_size=quantize.block_size, target_size=budget.target_size,
        ratio=budget.ratio, rank=budget.rank or 0, method=quantize_method(config), calibration=data.calibration,
        stats=data.stats, embeddings=quantize.embeddings, int8=quantize.int8, factors=quantize.factor_dtype,
        bias_correction=config.method.bias_correction, include=config.sites.include, exclude=config.sites.exclude,
        batch_size=data.batch_size, mask_input=data.mask_input, shapes=data.shapes,
        fisher_options=config.fisher.as_dict(), progress=config.progress, target_latency=budget.target_latency,
        latency=context.latency, input_forms=context.input_forms, checked=True, feed=context.feed,
        accuracy_level=quantize.accuracy_level, level_timer=_level_timer(config, context),
        merge=quantize.merge_corrections, source=context.quantized,
        fallback="whiten" if config.method.method is None and data.calibration is not None else None,
        stats_memory=data.stats_memory)


def _level_timer(config: RunConfig, context: RunContext):
    """The timer accuracy_level auto times the levels with: the latency model's, else ONNX Runtime's at the
    speed options' threads (None: the levels are not timed)."""
    level = config.quantize.accuracy_level
    if level == "auto" or (level is None and config.budget.target_latency is not None):
        if context.latency is not None:
            return context.latency.timer
        from onnx_fwlr.cost.latency import OrtTimer

        return OrtTimer(threads=config.speed.latency_threads)
    return None


def _refine(source, compressed, report: Report, config: RunConfig):
    """Distil the factors against the (float) input when asked and something was factorised."""
    if config.refine.steps is None or not report.factorised:
        return compressed
    from onnx_fwlr.refine.loop import refine  # the training loop and its backward pass: only when asked for

    data = config.data
    compressed, report.refined = refine(
        source, compressed, data.calibration, steps=config.refine.steps, lr=config.refine.lr,
        batch_size=data.batch_size, seed=config.fisher.seed, output=config.fisher.output,
        dope_dropout=config.refine.dope_dropout, progress=config.progress)
    return compressed


def _requantize(compressed, quantized: QuantizedInput, report: Report, config: RunConfig):
    """A quantized input's weights back in their own scheme; with `quantize`, only the weights it kept in float
    (it quantized the others its own way)."""
    if config.quantize.mode is None:
        return requantize_output(compressed, quantized, report)
    return requantize_output(compressed, quantized, report, only_float_nodes=True,
                             how=f"as `quantize` {config.quantize.mode} asks (weights it kept get their own scheme)")


def _changed(config: RunConfig, report: Report) -> bool:
    """Whether the run replaced anything: a site quantized, or a site factorised."""
    return bool(report.sites) if config.quantize.mode is not None else bool(report.factorised)


def _speed_checked(config: RunConfig, report: Report) -> bool:
    """Whether the finished model is timed against the input: whenever speed was asked for and a site changed."""
    if config.quantize.mode is not None:
        return config.budget.target_latency is not None and bool(report.sites)
    return bool(report.factorised) and config.timed


def _validate(compressed, report: Report, config: RunConfig, context: RunContext) -> None:
    """Compare the result with the input on the validation data (kept from the max_error search when that
    result is still the final model)."""
    from onnx_fwlr.pipeline.compress import validate

    validation = config.data.validation
    if validation is None or not (report.sites or config.quantize.mode is not None):
        return
    if report.checked is None or report.refined is not None or context.quantized or config.quantize.mode:
        report.checked = validate(config.model, compressed, validation, batch_size=config.data.batch_size,
                                  progress=config.progress, set_aside=True, **_compare(config))
    report.validation = report.checked.to_dict()


def _compare(config: RunConfig) -> dict:
    outputs = config.compare.outputs
    batch_axes = config.compare.batch_axes
    return dict(outputs=list(outputs) if outputs is not None else None, common_prefix=config.compare.common_prefix,
                batch_axes=dict(batch_axes) if batch_axes else None)
