"""Dynamic int8 (`quantize_dynamic`): DynamicQuantizeLinear → MatMulInteger → Cast → Mul(x_scale·w_scale),
and DynamicQuantizeMatMul / MatMulIntegerToFloat (com.microsoft: what ONNX Runtime fuses that chain into) → MatMul
(+ Add); written again by quantize_dynamic."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_fwlr.io.model import tensor_array
from onnx_fwlr.quant.formats.common import (
    Format,
    _input,
    _integer_kind,
    _is_symmetric,
    _label,
    _scale_count,
    _unsupported,
    affine_weights,
    eight_bits_only,
)
from onnx_fwlr.quant.quantized_site import MS_DOMAIN, QuantizedSite, QuantScheme, _Graph
from onnx_fwlr.sites.find import FLOAT_TYPES, node_attribute


def _dynamic_scheme(model, view: _Graph, q_name: str, zero_point: str, scales: int) -> QuantScheme:
    q_tensor = view.const(q_name)
    bits, signed = _integer_kind(q_tensor)
    q = tensor_array(model, q_tensor).astype(np.int64)
    zero = view.const(zero_point)
    zero_values = 0 if zero is None else tensor_array(model, zero).astype(np.int64)
    reduced = (np.abs(q - zero_values).max(initial=0) <= 64) if signed else (q.max(initial=0) <= 127)
    return QuantScheme("dynamic", bits, signed, "per-channel" if scales > 1 else "per-tensor",
                       _is_symmetric(model, view, zero_point, bits, signed), 1 if scales > 1 else None,
                       reduce_range=bool(reduced) and q.size > 1)


def _int8_matrix(view: _Graph, node: onnx.NodeProto, op_type: str, b: str, consumer: str = "MatMul"):
    """(tensor, None) for a constant int8/uint8 2-D weight, else (None, the unsupported site)."""
    tensor = view.const(b)
    if tensor is None:
        return None, _unsupported(view, node, op_type, b, f"{op_type}'s weight is computed at run time, so there is "
                                  "no constant weight to dequantize", consumer)
    if tensor.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) or len(tensor.dims) != 2:
        kind = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        return None, _unsupported(view, node, op_type, b, f"{op_type} with a {len(tensor.dims)}-D {kind} weight is "
                                  "not supported (only 2-D int8/uint8 weights are)", consumer)
    return tensor, None


def _dynamic_site(model, view, node, op_type, b, b_scale, b_zero, nodes, x, output, bias="") -> QuantizedSite:
    tensor, bad = _int8_matrix(view, node, op_type, b)
    if bad is not None:
        return bad
    K, N = tensor.dims
    scales = _scale_count(view, b_scale, N)
    if scales is None or (b_zero and view.const(b_zero) is None):
        return _unsupported(view, node, op_type, b, f"{op_type}'s weight scale or zero point is not a constant "
                            "per tensor or per output column", "MatMul")
    scheme = _dynamic_scheme(model, view, b, b_zero, scales)
    tensors = {"q": b, "scale": b_scale, "zero_point": b_zero, "x": x, "output": output, "bias": bias}
    return QuantizedSite(_label(node), op_type, view.index, b, "MatMul", K, N, scheme, "", tuple(nodes), tensors)


def _dql_feeding(view: _Graph, activation: str, scale: str | None, zero: str) -> tuple[int, onnx.NodeProto] | None:
    """The DynamicQuantizeLinear producing `activation` (and, when given, its scale and zero point)."""
    dql = view.node_of(activation, "DynamicQuantizeLinear")
    if dql is None or list(dql.output[:1]) != [activation] or (zero and zero != dql.output[2]):
        return None
    if scale is not None and scale != dql.output[1]:
        return None
    return view.producer[activation], dql


def _matmul_integer(model, view: _Graph, n_index: int, node: onnx.NodeProto) -> QuantizedSite:
    """DynamicQuantizeLinear(x) → MatMulInteger(x_q, W_q, x_zp, W_zp) → Cast → Mul(·, Mul(x_scale, W_scale))."""
    a, b, a_zero, b_zero = (_input(node, i) for i in range(4))
    dql = _dql_feeding(view, a, None, a_zero)
    chain = _dynamic_output_chain(view, node, dql[1].output[1]) if dql else None
    if chain is None:
        return _unsupported(view, node, "MatMulInteger", b, "MatMulInteger outside ONNX Runtime's dynamic "
                            "quantization chain (DynamicQuantizeLinear → MatMulInteger → Cast → Mul) has no weight "
                            "scale to dequantize with", "MatMul")
    cast, mul, scales_mul, w_scale = chain
    nodes = (n_index, cast, mul, scales_mul, dql[0])
    output = view.graph.node[mul].output[0]
    return _dynamic_site(model, view, node, "MatMulInteger", b, w_scale, b_zero, nodes, dql[1].input[0], output)


def _dynamic_output_chain(view: _Graph, node: onnx.NodeProto, x_scale: str):
    """(Cast index, Mul index, scale-Mul index, weight scale) after a MatMulInteger, or None."""
    cast = view.sole_reader(node.output[0])
    if cast is None or cast.op_type != "Cast" or node_attribute(cast, "to", None) not in FLOAT_TYPES:
        return None
    mul = view.sole_reader(cast.output[0])
    if mul is None or mul.op_type != "Mul":
        return None
    scale = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
    scales_mul = view.node_of(scale, "Mul")
    if scales_mul is None or x_scale not in scales_mul.input:
        return None
    w_scale = next((i for i in scales_mul.input if i != x_scale), "")
    if view.const(w_scale) is None:
        return None
    return view.producer[cast.output[0]], view.producer[mul.output[0]], view.producer[scale], w_scale


def _dynamic_quantize_matmul(model, view: _Graph, n_index: int, node: onnx.NodeProto) -> QuantizedSite:
    """DynamicQuantizeMatMul(A, B, b_scale, b_zero_point, bias): A quantized inside the op."""
    a, b, b_scale, b_zero, bias = (_input(node, i) for i in range(5))
    return _dynamic_site(model, view, node, "DynamicQuantizeMatMul", b, b_scale, b_zero, (n_index,), a,
                         node.output[0], bias)


def _matmul_integer_to_float(model, view: _Graph, n_index: int, node: onnx.NodeProto) -> QuantizedSite:
    """MatMulIntegerToFloat(A, B, a_scale, b_scale, a_zp, b_zp, bias) with A from a DynamicQuantizeLinear."""
    a, b, a_scale, b_scale, a_zero, b_zero, bias = (_input(node, i) for i in range(7))
    dql = _dql_feeding(view, a, a_scale, a_zero)
    if dql is None:
        return _unsupported(view, node, "MatMulIntegerToFloat", b, "MatMulIntegerToFloat whose activation is "
                            "not quantized by a DynamicQuantizeLinear (static activation scales) is not supported",
                            "MatMul")
    return _dynamic_site(model, view, node, "MatMulIntegerToFloat", b, b_scale, b_zero, (n_index, dql[0]),
                         dql[1].input[0], node.output[0], bias)


FORMAT = Format(
    "dynamic",
    {("", "MatMulInteger"): _matmul_integer,
     (MS_DOMAIN, "DynamicQuantizeMatMul"): _dynamic_quantize_matmul,
     (MS_DOMAIN, "MatMulIntegerToFloat"): _matmul_integer_to_float},
    affine_weights, "matmul", lambda scheme: "dynamic", eight_bits_only)
