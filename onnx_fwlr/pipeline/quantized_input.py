"""Already-quantized models in `compress`: dequantize each recognised quantized weight (float64, exact), let the
float pipeline compress the float model, then quantize the result back with each weight's own scheme through
ONNX Runtime's quantizers (quant/dequantize.py, quant/requantize.py)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import onnx
from onnx import external_data_helper

from onnx_fwlr.evaluate.report import Report, op_counts
from onnx_fwlr.io.model import external_bytes, load_model, message_bytes
from onnx_fwlr.quant.dequantize import Dequantized, dequantize_model
from onnx_fwlr.quant.requantize import float_weight_nodes, requantize
from onnx_fwlr.sites.find import constant_tensors, model_parameters, walk_graphs

# site.tensors roles holding the stored weight (integers, scales, zero points); an LSTM's site is its input
# weight W (its recurrent weight R is no site: it stays as stored)
STORED_ROLES = ("q", "scale", "zero_point", "W", "W_scale", "W_zero_point")

logger = logging.getLogger(__name__)


@dataclass
class QuantizedInput:
    """What dequantize_input did: the float model to compress, the record of each recovered weight, and the
    quantized input's counts for the report's before-columns."""

    float_model: onnx.ModelProto
    dequantized: Dequantized
    params_before: int
    ops_before: dict
    input_bytes: int = 0  # the quantized input's bytes (protobuf plus external data): what budgets count
    stored: dict = field(default_factory=dict)  # float weight name -> bytes the input stores that weight in
    kept: list = field(default_factory=list)  # sites.find.Skipped: weights no site covers (recurrent R, kernels)

    def scheme_of(self, weight: str):
        """The QuantScheme the input stored this float weight in (None: not a recovered weight)."""
        return next((s.scheme for s in self.dequantized.sites if s.float_weight == weight), None)

    def kept_as_input(self, model: onnx.ModelProto, low_rank: set[str] = frozenset()) -> onnx.ModelProto:
        """`model` with each recovered weight whose float node is still there (kept as it was) quantized back
        with its own scheme (the same integers, so the same bytes as the input), and the float32 factors of
        the weights in `low_rank` (low rank alone) quantized with their weight's scheme."""
        holding = float_weight_nodes(model)
        nodes = {}
        for site in self.dequantized.sites:
            names = list(site.float_nodes)
            if site.float_weight in low_rank:
                names += sorted(n for n in holding for f in site.float_nodes if n.startswith(f"{f}/correction_"))
            nodes[site.node] = names
        return requantize(model, self.dequantized.sites, nodes=nodes)


def dequantize_input(model: str | onnx.ModelProto) -> QuantizedInput | None:
    """None when the model holds nothing quantized (the input then goes on untouched). A quantized op in a
    scheme we cannot read raises FwlrError. With only ops we leave alone (QLinearMatMul, …), float_model is
    the input, unchanged."""
    loaded = load_model(model)
    dequantized = dequantize_model(loaded)
    if not dequantized.sites and not dequantized.left:
        return None
    logger.info("quantized input: %s", dequantized.summary())
    return QuantizedInput(dequantized.model, dequantized, model_parameters(loaded), op_counts(loaded),
                          message_bytes(loaded) + external_bytes(loaded), stored_bytes(loaded, dequantized.sites),
                          _weights_kept(loaded, dequantized))


def _weights_kept(model: onnx.ModelProto, dequantized: Dequantized) -> list:
    """The input's weights that neither a float nor a quantized site covers (sites.left_alone)."""
    from onnx_fwlr.sites.left_alone import left_alone
    from onnx_fwlr.sites.recurrent import find_all_sites

    sites, skipped = find_all_sites(model, None, None, fisher=False)
    listed = {s.weight for s in sites} | {s.weight for s in skipped if s.weight}
    return left_alone(model, listed, dequantized.sites + dequantized.left)


# Bytes of the records (nodes, scales, zero points, names) each use of a factorised weight adds once its two
# factors are quantized again (two dynamic int8 chains: 1.1-1.4 kB measured on tests/test_shipped.py's models).
FACTOR_OVERHEAD = 1400


def site_budget_ratio(quantized: QuantizedInput, include=None, exclude=None, *, ratio: float | None = None,
                      target_size: int | None = None) -> float:
    """The share of its factorisable weights' bytes the float pipeline may keep so that the requantized output
    is about `ratio` of the input's bytes (or `target_size` bytes): budgets of a quantized input count its
    bytes, not float parameters. Checked before any statistics; too small a target is one sentence."""
    from onnx_fwlr.errors import FwlrError
    from onnx_fwlr.sites.recurrent import find_all_sites

    sites, _ = find_all_sites(quantized.float_model, include, exclude, fisher=False)
    target = target_size if target_size is not None else int(ratio * quantized.input_bytes)
    stored = sum(quantized.stored.get(s.weight, 4 * s.params) for s in sites)
    # each use adds its factor chains' records and (bias correction) its own mean shift of N floats
    fixed = quantized.input_bytes - stored + sum((FACTOR_OVERHEAD + 4 * s.N) * len(s.uses) for s in sites)
    if not sites or target <= fixed:
        raise FwlrError(f"the target of {target:,} bytes is too small: the quantized input without its factorisable "
                        f"weights already takes about {fixed:,} bytes (of {quantized.input_bytes:,}).")
    return min(1.0, (target - fixed) / stored)


def measure_against_input(source, compressed: onnx.ModelProto, report: Report, latency, calibration,
                          batch_size: int, shapes) -> None:
    """Time the output against the quantized input it came from at the data's row count (one calibration batch,
    or `shapes`), alternating pairs in a fresh process, and say in the report how it compares; nothing when
    there is no data to time with. `latency`: cost.latency.MeasuredLatency (a fake in tests)."""
    from onnx_fwlr.cost.latency import MeasuredLatency
    from onnx_fwlr.pipeline.speed import feed_shape, timing_feed

    if not shapes and not (isinstance(calibration, (str, os.PathLike)) and calibration != "random"):
        return
    structure = source if isinstance(source, onnx.ModelProto) else load_model(source, lazy=True)
    feed = timing_feed(structure, calibration, batch_size, shapes)
    measured = (latency if latency is not None else MeasuredLatency()).model_ratio(source, compressed, feed)
    p50, p10, p90 = measured["ratio_p50"], measured["ratio_p10"], measured["ratio_p90"]
    report.budget["input_latency"] = {"ratio_p50": p50, "ratio_p10": p10, "ratio_p90": p90,
                                      "pairs": measured["pairs"], "feed": feed_shape(feed)}
    verdict = "slower than the input here" if p50 > 1.0 else "not slower than the input"
    report.warnings.append(f"latency: the output measures {p50:.2f}x the quantized input's (p10-p90 {p10:.2f}-"
                           f"{p90:.2f}, {measured['pairs']} alternating pairs) at {feed_shape(feed)} on this "
                           f"machine: {verdict}")


def _note_site_bytes(model: onnx.ModelProto, quantized: QuantizedInput, report: Report) -> None:
    """Each factorised site's bytes in the input and as written (the tensors named after its weight: its
    quantized factors, or the weight itself with its scales and zero points)."""
    sizes: dict[str, int] = {}
    for tensor in walk_graphs(model)[0].initializer:
        for weight in quantized.stored:
            if tensor.name.startswith((f"{weight}/", f"{weight}_")):
                sizes[weight] = sizes.get(weight, 0) + _tensor_bytes(tensor)
    for row in report.sites:
        if row.weight in quantized.stored and row.weight in sizes and row.rank is not None:
            bytes_note = f"{quantized.stored[row.weight]:,} -> {sizes[row.weight]:,} bytes"
            row.note = f"{row.note}; {bytes_note}" if row.note else bytes_note


def stored_bytes(model: onnx.ModelProto, sites) -> dict[str, int]:
    """Float weight name -> bytes of the tensors the input stores it in (integers, scales, zero points), each
    tensor counted once however many sites read it."""
    constants = constant_tensors(walk_graphs(model))
    tensors: dict[str, set[str]] = {}
    for site in sites:
        names = {site.tensors.get(role, "") for role in STORED_ROLES} & set(constants)
        tensors.setdefault(site.float_weight, set()).update(names)
    return {weight: sum(_tensor_bytes(constants[name][2]) for name in sorted(names))
            for weight, names in tensors.items()}


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if external_data_helper.uses_external_data(tensor):
        return tensor.ByteSize() + (external_data_helper.ExternalDataInfo(tensor).length or 0)
    return tensor.ByteSize()


def requantize_output(compressed: onnx.ModelProto, quantized: QuantizedInput, report: Report,
                      only_float_nodes: bool = False, how: str = "with the same scheme") -> onnx.ModelProto:
    """`compressed` with every recovered weight (its float node, or the factors that replaced it) quantized again
    with its original scheme; the report's before/after columns count the quantized models, and its one line
    says what happened. `only_float_nodes`: requantize the float nodes themselves only (not the nodes named
    after them), for pipelines that quantize the factors their own way (--quantize)."""
    sites, left = quantized.dequantized.sites, quantized.dequantized.left
    if left:
        ops = ", ".join(sorted({site.op_type for site in left}))
        report.warnings.append(f"the model holds quantized ops that compress does not dequantize ({ops}); they are "
                               "left as they are (a QDQ or dynamically quantized model of the float original can be "
                               "compressed)")
    if quantized.kept:
        names = ", ".join(f"{s.weight} ({s.op_type})" for s in quantized.kept[:4])
        more = f" and {len(quantized.kept) - 4} more" if len(quantized.kept) > 4 else ""
        report.warnings.append(f"{len(quantized.kept)} weight(s) of the input are kept as it stored them, not "
                               f"factorised: {names}{more}; `onnx-fwlr inspect` says why for each")
    if not sites:
        return compressed
    nodes = {site.node: list(site.float_nodes) for site in sites} if only_float_nodes else None
    result = requantize(compressed, sites, nodes=nodes)
    if not only_float_nodes:  # --quantize writes its own per-site bytes
        _note_site_bytes(result, quantized, report)
    report.model_params_before, report.ops_before = quantized.params_before, quantized.ops_before
    report.model_params_after, report.ops_after = model_parameters(result), op_counts(result)
    report.input_quantization = (f"the input was quantized ({quantized.dequantized.summary()}): dequantized in "
                                 f"float64, compressed, and quantized again {how}")
    return result
