"""Quantizing recovered sites again, with the scheme each had in the input model (or one asked for).

ONNX Runtime's own quantizers do the work, restricted to the nodes that now hold each recovered weight (the
float node, or the factor nodes a compression put in its place):
- dynamic, dynamic_lstm: `quantize_dynamic` (per_channel, weight type, symmetry and reduce_range as found);
- nbits: `MatMulNBitsQuantizer` (same bits, block size, symmetry); blocked qdq: the same in QDQ format (4 bits);
- qdq and cast_mul per tensor or per channel: `quant_utils.quantize_data`, the function ONNX Runtime's QDQ
  quantizer applies to each weight (per slice for per-channel), written back as DequantizeLinear or Cast+Mul.

A weight dequantized from the input and requantized with the same scheme comes back with the same integers
(round to nearest of an exact multiple of the scale), so the round trip changes nothing but float rounding.
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import message_bytes, tensor_array
from onnx_fwlr.quant.formats import FORMATS
from onnx_fwlr.quant.ortquant import _nbits_module, _quiet_ort_logging, ensure_ms_domain
from onnx_fwlr.quant.quantized_site import QuantizedSite, QuantScheme
from onnx_fwlr.sites.find import FLOAT_TYPES, constant_tensors, node_attribute, walk_graphs

logger = logging.getLogger(__name__)

WEIGHT_OPS = ("MatMul", "Gemm", "LSTM")
_QTYPES = {(8, True): onnx.TensorProto.INT8, (8, False): onnx.TensorProto.UINT8,
           (4, True): onnx.TensorProto.INT4, (4, False): onnx.TensorProto.UINT4,
           (16, True): onnx.TensorProto.INT16, (16, False): onnx.TensorProto.UINT16}


def float_weight_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the MatMul/Gemm/LSTM nodes that multiply by a float constant (their input 1)."""
    constants = constant_tensors(walk_graphs(model))
    return {node.name for graph in walk_graphs(model) for node in graph.node
            if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in constants
            and constants[node.input[1]][2].data_type in FLOAT_TYPES}


def derived_nodes(model: onnx.ModelProto, float_nodes: tuple[str, ...]) -> list[str]:
    """The nodes holding a recovered weight now: each float node itself, or the nodes a rewrite named after it
    (`name/factor_A`, `name/factor_B`, `name/input_projection`, …) that multiply by a float constant."""
    holding = float_weight_nodes(model)
    return sorted(name for name in holding if any(name == n or name.startswith(f"{n}/") for n in float_nodes if n))


def requantize(model: onnx.ModelProto, sites: list[QuantizedSite], nodes: dict[str, list[str]] | None = None,
               scheme: QuantScheme | None = None) -> onnx.ModelProto:
    """A copy of `model` with each site's weight nodes quantized by ONNX Runtime with the site's scheme (`scheme`,
    when given, for all). `nodes` maps a site's node name to the nodes holding its weight now (default:
    derived_nodes); only those that still multiply by a float constant are quantized. Nodes of other sites
    and every other node are left as they are."""
    holding = float_weight_nodes(model)
    groups: dict[QuantScheme, list[str]] = defaultdict(list)
    for site in sites:
        names = nodes.get(site.node, []) if nodes is not None else derived_nodes(model, site.float_nodes)
        names = [n for n in names if n in holding]
        if not names:
            logger.info("%s: no float node holds its weight any more; nothing to requantize", site.node)
        target = groups[scheme or site.scheme]
        target.extend(n for n in names if n not in target)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for target, names in groups.items():
        if names:
            result = _APPLY[_route(target)](result, names, target)
    return result


def cannot_requantize(scheme: QuantScheme) -> str | None:
    """Why ONNX Runtime's quantizers cannot write a weight back in this scheme (None: they can), so that such a
    weight is left as the input has it rather than found out after the work (each format's own rule)."""
    if scheme.format not in FORMATS:
        return f"no ONNX Runtime quantizer writes the '{scheme.format}' scheme"
    return FORMATS[scheme.format].cannot_write(scheme)


def _route(scheme: QuantScheme) -> str:
    if scheme.format not in FORMATS:
        raise FwlrError(f"quantization scheme '{scheme.format}' cannot be applied; use dynamic int8 or int4 blocks.")
    return FORMATS[scheme.format].writer(scheme)


def _quantize_dynamic(model: onnx.ModelProto, names: list[str], scheme: QuantScheme) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if scheme.bits != 8:
        raise FwlrError(f"dynamic quantization takes 8-bit weights, not {scheme.bits}-bit; ask for int8.")
    op_types = sorted({node.op_type for g in walk_graphs(model) for node in g.node if node.name in set(names)})
    large = message_bytes(model) > 1_800_000_000
    with tempfile.TemporaryDirectory() as folder, _quiet_ort_logging():
        output = Path(folder) / "quantized.onnx"
        quantize_dynamic(model, output, op_types_to_quantize=op_types, nodes_to_quantize=list(names),
                         per_channel=scheme.granularity == "per-channel", reduce_range=scheme.reduce_range,
                         weight_type=QuantType.QInt8 if scheme.signed else QuantType.QUInt8,
                         use_external_data_format=large,
                         extra_options={"WeightSymmetric": scheme.symmetric, "MatMulConstBOnly": True})
        return onnx.load(str(output))


def _quantize_nbits(model: onnx.ModelProto, names: list[str], scheme: QuantScheme) -> onnx.ModelProto:
    """MatMulNBits (or, for blocked QDQ, DequantizeLinear with int4 blocks) of exactly these MatMul nodes."""
    from onnxruntime.quantization import QuantFormat

    module = _nbits_module()
    targets = set(names)
    matmuls = {node.name for g in walk_graphs(model) for node in g.node if node.op_type == "MatMul"}
    qdq = scheme.format == "qdq"
    if qdq and scheme.bits != 4:
        raise FwlrError(f"blocked QDQ weights are requantized at 4 bits only, not {scheme.bits}; ask for int4.")
    quantizer = module.MatMulNBitsQuantizer(
        model, bits=scheme.bits, block_size=scheme.block_size, is_symmetric=scheme.symmetric,
        nodes_to_exclude=sorted(matmuls - targets), op_types_to_quantize=("MatMul",),
        quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator)
    with _quiet_ort_logging():
        quantizer.process()
    result = quantizer.model.model
    ensure_ms_domain(result)
    return result


def _quantize_weights(model: onnx.ModelProto, names: list[str], scheme: QuantScheme) -> onnx.ModelProto:
    """QDQ or Cast+Mul weights, per tensor or per channel, from ONNX Runtime's quantize_data."""
    targets = set(names)
    graphs = walk_graphs(model)
    constants = constant_tensors(graphs)
    done: dict[str, str] = {}  # float weight -> its dequantized tensor (a weight shared by targets is done once)
    for graph in graphs:
        new_nodes = []
        for node in graph.node:
            if node.name in targets and node.op_type in ("MatMul", "Gemm") and node.input[1] in constants:
                weight = node.input[1]
                if weight not in done:
                    axis = _stored_axis(scheme, node)
                    values = tensor_array(model, constants[weight][2])
                    done[weight], nodes = _write_quantized(graph, weight, values, axis, scheme,
                                                           constants[weight][2].data_type)
                    new_nodes.extend(nodes)
                node.input[1] = done[weight]
            new_nodes.append(node)
        graph.ClearField("node")
        graph.node.extend(new_nodes)
    _drop_unread_initializers(graphs, set(done))
    return model


def _stored_axis(scheme: QuantScheme, node: onnx.NodeProto) -> int | None:
    """The scheme's [K, N]-view axis as an axis of the stored weight (Gemm transB=1 stores [N, K])."""
    if scheme.granularity == "per-tensor" or scheme.axis is None:
        return None
    transposed = node.op_type == "Gemm" and bool(node_attribute(node, "transB", 0))
    return 1 - scheme.axis if transposed else scheme.axis


def _quantize_values(values: np.ndarray, axis: int | None, scheme: QuantScheme):
    """(q, scale, zero_point) by onnxruntime.quantization.quant_utils.quantize_data, per tensor or per slice
    along `axis` (as ONNX Runtime's per-channel weight quantization does)."""
    from onnxruntime.quantization.quant_utils import quantize_data

    qtype = _QTYPES[(scheme.bits, scheme.signed)]
    data = np.asarray(values, dtype=np.float32)
    if axis is None:
        zero, scale, q = quantize_data(data.ravel(), qtype, scheme.symmetric, scheme.reduce_range)
        return np.asarray(q).reshape(data.shape), np.asarray(scale), np.asarray(zero)
    parts = [quantize_data(np.take(data, i, axis=axis).ravel(), qtype, scheme.symmetric, scheme.reduce_range)
             for i in range(data.shape[axis])]
    slice_shape = np.take(data, 0, axis=axis).shape
    q = np.stack([np.asarray(p[2]).reshape(slice_shape) for p in parts], axis=axis)
    scale = np.array([np.asarray(p[1]).item() for p in parts])
    zero = np.array([np.asarray(p[0]).item() for p in parts])
    return q, scale, zero


def _write_quantized(graph: onnx.GraphProto, weight: str, values: np.ndarray, axis: int | None,
                     scheme: QuantScheme, float_type: int):
    """Initializers and the DequantizeLinear (qdq) or Cast → [Sub] → Mul (cast_mul) nodes computing the weight."""
    q, scale, zero = _quantize_values(values, axis, scheme)
    qtype = _QTYPES[(scheme.bits, scheme.signed)]
    float_dtype = helper.tensor_dtype_to_np_dtype(float_type)
    q_name, s_name, z_name = f"{weight}_quantized", f"{weight}_scale", f"{weight}_zero_point"
    out = f"{weight}_dequantized"
    graph.initializer.append(packed_integers(q, qtype, q_name))
    if scheme.format == "qdq":
        graph.initializer.append(numpy_helper.from_array(scale.astype(float_dtype), s_name))
        graph.initializer.append(packed_integers(zero, qtype, z_name))
        attrs = {} if axis is None else {"axis": axis}
        return out, [helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [out], name=out, **attrs)]
    shape = [1] * values.ndim
    if axis is not None:
        shape[axis] = -1
    graph.initializer.append(numpy_helper.from_array(scale.astype(float_dtype).reshape(shape), s_name))
    nodes = [helper.make_node("Cast", [q_name], [f"{weight}_cast"], name=f"{weight}_cast", to=float_type)]
    operand = f"{weight}_cast"
    if np.any(zero != 0):
        graph.initializer.append(numpy_helper.from_array(zero.astype(float_dtype).reshape(shape), z_name))
        nodes.append(helper.make_node("Sub", [operand, z_name], [f"{weight}_shifted"], name=f"{weight}_shift"))
        operand = f"{weight}_shifted"
    nodes.append(helper.make_node("Mul", [operand, s_name], [out], name=out))
    return out, nodes


def packed_integers(values: np.ndarray, qtype: int, name: str) -> onnx.TensorProto:
    """An integer initializer stored as packed bytes (raw_data: one byte per int8, two int4 per byte), not as one
    varint per element (helper.make_tensor from a list: up to 10 bytes for each negative int8)."""
    dtype = helper.tensor_dtype_to_np_dtype(qtype)
    return numpy_helper.from_array(np.asarray(values).astype(np.int64).astype(dtype), name)


def _drop_unread_initializers(graphs: list[onnx.GraphProto], names: set[str]) -> None:
    read = {i for g in graphs for node in g.node for i in node.input} | {o.name for g in graphs for o in g.output}
    for graph in graphs:
        for tensor in [t for t in graph.initializer if t.name in names and t.name not in read]:
            graph.initializer.remove(tensor)


_APPLY = {"dynamic": _quantize_dynamic, "nbits": _quantize_nbits, "weights": _quantize_weights}
