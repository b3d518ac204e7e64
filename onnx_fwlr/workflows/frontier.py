"""The size/fidelity frontier: ONNX Runtime's own quantizations of the original as reference points, our
quantized configurations under byte budgets (one prepare_quantized per mode, then every budget), Pareto
points, and compress's closing comparison with the plain ONNX Runtime quantizations.

A user who wants a smaller model tries ONNX Runtime's quantizers first (docs/quantization.md); any table of ours that
leaves them out cannot say whether the tool is worth running.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import onnx

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import external_bytes, load_model, message_bytes
from onnx_fwlr.quant.ortquant import BASELINES, LEVEL4_BASELINES, ort_baseline

logger = logging.getLogger(__name__)

INT8_BASELINE = "ORT int8 dynamic per-channel"
INT4_BASELINE = "ORT int4 b32 (MatMul only)"
COMPRESS_BASELINES = (INT8_BASELINE, INT4_BASELINE)  # what compress's closing sentence measures (with --val)
SAID = {INT8_BASELINE: "int8 per-channel dynamic quantization (quantize_dynamic)",
        INT4_BASELINE: "int4 block-32 quantization (MatMulNBits)"}
DEFAULT_INT8_FRACTIONS = (0.7, 0.8, 0.9, 1.0)  # sweep --quantize budgets without --sizes: of the int8 model's bytes
QUANT_METHOD = "kfac"  # a byte budget compares sites in loss units


def model_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model as saved (its protobuf plus any external data)."""
    return message_bytes(model) + external_bytes(model)


def fidelity(original, model, validation, batch_size: int, outputs=None, common_prefix: bool = False,
             judge: str | None = None) -> dict:
    """How close `model` stays to the original on the validation data (output `judge`, else the first compared
    output), and accuracy."""
    from onnx_fwlr.pipeline.compress import validate

    check = validate(original, model, validation, batch_size=batch_size, progress=False, outputs=outputs,
                     common_prefix=common_prefix)
    return judged(check, judge)


def judged(check, judge: str | None = None) -> dict:
    """The numbers of a Validation that the frontier compares: the cosines and error of output `judge` (the one
    the loss was defined on, say) or else the first compared output, and accuracy."""
    first = next((o for o in check.outputs if o.name == judge), check.outputs[0])
    return {"output": first.name, "mean_cosine": first.mean_cosine, "min_cosine": first.min_cosine,
            "rel_l2_error": first.rel_l2_error, "top1_agreement": first.top1_agreement,
            "accuracy": check.compressed_accuracy, "original_accuracy": check.original_accuracy}


def baseline_models(original: onnx.ModelProto, names=tuple(BASELINES)) -> Iterator[tuple[str, onnx.ModelProto]]:
    """(name, model) of each ONNX Runtime baseline its quantizer can make of this model; one it cannot make is
    logged and left out (a baseline is a reference point, never a reason to fail)."""
    for name in names:
        try:
            yield name, ort_baseline(original, name)
        except Exception as exc:  # noqa: BLE001 - ORT's quantizers raise many types on models they do not take
            logger.info("%s of this model could not be made (%s: %s)", name, type(exc).__name__, exc)


def quantized_models(original: onnx.ModelProto, modes: list[str], budgets: list[tuple[int, str]], *, stats,
                     calibration,
                     block_size: int = 32, batch_size: int = 32, mask_input=None, fisher_options=None,
                     progress: bool = True, skipped: list[str]) -> Iterator[tuple[dict, onnx.ModelProto]]:
    """(row fields, model) for every quantize mode at every byte budget ((bytes, label) pairs, the label saying
    how the budget was asked for); the sites are measured and decomposed
    once per mode (prepare_quantized), the statistics once for all. A budget a mode cannot reach is a sentence
    in `skipped`."""
    from onnx_fwlr.pipeline.quantized import build_quantized, prepare_quantized

    for mode in modes:
        job = prepare_quantized(original, quantize=mode, block_size=block_size, method=QUANT_METHOD,
                                calibration=calibration, stats=stats, budgeted=True, batch_size=batch_size,
                                mask_input=mask_input, fisher_options=fisher_options, progress=progress)
        for size, label in budgets:
            try:
                model, report = build_quantized(job, target_size=size)
            except FwlrError as exc:
                skipped.append(f"quantize {mode} at {label} ({size:,} bytes) skipped: {exc}")
                continue
            schemes = Counter(s.note.split(":")[0] for s in report.sites if s.note)
            yield {"config": f"quantize {mode}", "kind": "quantized", "method": QUANT_METHOD, "allocation": mode,
                   "target_size": size, "budget": label, "schemes": dict(sorted(schemes.items())),
                   "params_kept": None, "param_ratio": None}, model


def budget_label(row: dict) -> str:
    """What the row's budget was, for the table."""
    if row.get("kind") == "quantized":
        return row["budget"]
    if row.get("kind") == "lowrank":
        return f"ratio {row['ratio']:.2f}"
    return ""


def frontier_metric(rows: list[dict]) -> str:
    """Accuracy where every row has one (labelled data), else the mean cosine with the original's output."""
    return "accuracy" if rows and all(r.get("accuracy") is not None for r in rows) else "mean_cosine"


def mark_pareto(rows: list[dict], metric: str) -> None:
    """row['pareto']: the axes ('bytes', 'latency') along which no other row is at least as small and at least
    as good, and better in one of the two."""
    for axis, key in (("bytes", "bytes"), ("latency", "latency_ratio")):
        points = [r for r in rows if r.get(key) is not None and r.get(metric) is not None]
        for row in rows:
            row.setdefault("pareto", [])
            if row in points and not any(_dominates(other, row, key, metric) for other in points if other is not row):
                row["pareto"].append(axis)


def _dominates(a: dict, b: dict, key: str, metric: str) -> bool:
    """a at most b's size and at least as good, better in one; accuracy ties (common on small test sets) are
    broken by the mean cosine with the original."""
    def good(row):
        return (row[metric], row["mean_cosine"])

    return a[key] <= b[key] and good(a) >= good(b) and (a[key] < b[key] or good(a) > good(b))


def ort_comparison(original, ours_bytes: int, ours, validation, *, batch_size: int = 32, outputs=None,
                   common_prefix: bool = False, quantized: bool = False, judge: str | None = None,
                   measured: list[dict] | None = None) -> tuple[str | None, list[dict]]:
    """Compress's closing check: ONNX Runtime's int8 per-channel and int4 block-32 quantizations of the original,
    measured on the same validation data as our model (`ours`, its Validation), judged on output `judge` (else
    the first compared one). Returns one sentence when one of
    them is at least as small and better, else None, and the measured rows (for the JSON report). A model that
    already holds quantized weights is not compared (quantizing it again is not what a user would run).
    `measured`: rows of latency_points already judged on the same data (their baselines are not made again)."""
    reference = load_model(original)
    from onnx_fwlr.quant.dequantize import detect_quantized

    if detect_quantized(reference):
        return None, []
    if measured is not None:
        rows = [r for r in measured if r["config"] in COMPRESS_BASELINES and r.get("mean_cosine") is not None]
    else:
        rows = [{"config": name, "bytes": model_bytes(model),
                 **fidelity(reference, model, validation, batch_size, outputs, common_prefix, judge)}
                for name, model in baseline_models(reference, COMPRESS_BASELINES)]
    return better_baseline(dict(judged(ours, judge), bytes=ours_bytes), rows, quantized), rows


def latency_points(original, ours: dict, latency, feed: dict, validation=None, *, batch_size: int = 32,
                   outputs=None, common_prefix: bool = False, judge: str | None = None) -> list[dict]:
    """The rows of `compress --quantize ... --target-latency`'s closing table, as `sweep --latency` has them: the
    original, ONNX Runtime's int8 per-channel and int4 (block 32 and 128, accuracy_level 0 and 4) models of it,
    and `ours` (its row: config, bytes, latency_ratio and its p10/p90, fidelity fields or None). Each baseline's
    latency is its time over the original's at `feed` (latency.model_ratio: alternating pairs in a fresh
    process, as compress's own check measured ours), its fidelity measured on `validation` when given."""
    from onnx_fwlr.workflows.sweep import _reference_row

    reference = load_model(original)
    rows = []
    for name, model in baseline_models(reference, tuple(BASELINES) + tuple(LEVEL4_BASELINES)):
        timed = latency.model_ratio(reference, model, feed)
        row = {"config": name, "kind": "baseline", "bytes": model_bytes(model), "latency_ratio": timed["ratio_p50"],
               "latency_ratio_p10": timed["ratio_p10"], "latency_ratio_p90": timed["ratio_p90"]}
        row.update(fidelity(reference, model, validation, batch_size, outputs, common_prefix, judge)
                   if validation is not None else _UNJUDGED)
        rows.append(row)
    rows.append(dict(_UNJUDGED, kind="quantized", **ours))
    first = next((r for r in rows if r.get("output")), {})
    reference_row = _reference_row([first], model_bytes(reference))
    reference_row["latency_ratio"] = 1.0
    if validation is None:
        reference_row.update(_UNJUDGED)
    rows.insert(0, reference_row)
    mark_pareto(rows, frontier_metric(rows))
    return rows


def compress_latency_points(config, report, model):
    """ONNX Runtime's fp32, int8 dynamic and int4 (accuracy_level 0 and 4) points beside the model `run(config)`
    made under `--quantize ... --target-latency` (its `report`): bytes, latency over the original's at the
    timing batch (alternating pairs, as the run timed ours), fidelity on the validation data when the run judged
    ours; a workflows.sweep.SweepResult whose format() is sweep --latency's table (latency_points)."""
    from onnx_fwlr.cost.latency import MeasuredLatency
    from onnx_fwlr.pipeline.speed import feed_shape, timing_feed
    from onnx_fwlr.workflows.sweep import SweepResult

    data, speed = config.data, report.budget["speed"]
    feed = timing_feed(load_model(config.model, lazy=True), data.calibration, data.batch_size, data.shapes)
    ours = {"config": f"ours --quantize {config.quantize.mode}", "budget": f"latency {config.budget.target_latency:g}",
            "bytes": model_bytes(model), "latency_ratio": speed["measured_ratio"],
            "latency_ratio_p10": speed["measured_p10"], "latency_ratio_p90": speed["measured_p90"]}
    checked = report.checked if report.checked is not None and not report.checked.unjudged else None
    if checked is not None:
        ours.update(judged(checked, config.fisher.output))
    latency = MeasuredLatency(threads=config.speed.latency_threads, cache_dir=config.speed.latency_cache)
    outputs = list(config.compare.outputs) if config.compare.outputs is not None else None
    rows = latency_points(config.model, ours, latency, feed, data.validation if checked is not None else None,
                          batch_size=data.batch_size, outputs=outputs, common_prefix=config.compare.common_prefix,
                          judge=config.fisher.output)
    return SweepResult(rows=rows, metric=frontier_metric(rows), timed_on=f"the timing batch ({feed_shape(feed)})")


_UNJUDGED = {"mean_cosine": None, "min_cosine": None, "rel_l2_error": None, "top1_agreement": None, "accuracy": None}


def better_baseline(ours: dict, baselines: list[dict], quantized: bool = False) -> str | None:
    """One sentence naming the closest baseline that is at most our bytes and better than ours, or None when none
    is. Better: a higher mean cosine with the original's first output and, with labels, an accuracy at least as
    high (accuracy alone moves by single samples on small sets, and can rise above the original's)."""
    def better(row):
        accurate = row.get("accuracy") is None or ours.get("accuracy") is None or row["accuracy"] >= ours["accuracy"]
        return row["bytes"] <= ours["bytes"] and row["mean_cosine"] > ours["mean_cosine"] and accurate

    candidates = [row for row in baselines if better(row)]
    if not candidates:
        return None
    best = max(candidates, key=lambda row: row["mean_cosine"])
    same = "the same" if best["bytes"] == ours["bytes"] else "fewer"
    hint = "" if quantized else ("; try ``quantize` auto` with a byte budget (ONNX Runtime's quantizers plus a "
                                 "low-rank correction)")
    return (f"A plain ONNX Runtime {_said(best['config'])} of the original would have been "
            f"better at {same} bytes on the `validation` data: {best['bytes']:,} bytes and {_quality(best)}, "
            f"against this model's {ours['bytes']:,} bytes and {_quality(ours)}{hint}.")


def _said(config: str) -> str:
    """The baseline in words; the int8 one says when it was made with 7-bit weights because this CPU's u8s8
    kernels saturate on 8-bit ones (quant.int8_kernels), as a user following the sentence must make it too."""
    from onnx_fwlr.quant.int8_kernels import int8_saturates

    said = SAID.get(config, config)
    if config == INT8_BASELINE and int8_saturates():
        said = said[:-1] + " with reduce_range=True, the 7-bit weights ONNX Runtime advises on this CPU)"
    return said


def _quality(row: dict) -> str:
    text = f"mean cosine {row['mean_cosine']:.5f} on '{row['output']}'"
    if row.get("accuracy") is not None:
        text = f"accuracy {100 * row['accuracy']:.2f} % ({text})"
    return text
