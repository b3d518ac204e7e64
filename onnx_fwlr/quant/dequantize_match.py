"""Recognising each quantized weight pattern (dequantize.py lists them) and recording its scheme.

One function per pattern: each returns a QuantizedSite (scheme None with a one-sentence reason when the op is
recognised but stored in a way we cannot read), or None when the node is not a quantized weight use.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_fwlr.io.model import tensor_array
from onnx_fwlr.quant.quantized_site import (
    INTEGER_TYPES,
    MS_DOMAIN,
    OTHER_QUANTIZED_OPS,
    QuantizedSite,
    QuantScheme,
    _Graph,
    same_domain,
)
from onnx_fwlr.sites.find import FLOAT_TYPES, node_attribute

WEIGHT_SLOTS = {"MatMul": 1, "Gemm": 1}  # the input of each float op that takes the weight


def match_node(model: onnx.ModelProto, view: _Graph, n_index: int, node: onnx.NodeProto) -> QuantizedSite | None:
    """The quantized weight use `node` is the main node of, if any."""
    matcher = _MATCHERS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type))
    if matcher is not None:
        return matcher(model, view, n_index, node)
    if node.op_type in OTHER_QUANTIZED_OPS:
        return _unsupported(view, node, node.op_type, "", f"{node.op_type} is a quantized op that compress does not "
                            "dequantize, so it is left as it is")
    return None


def _label(node: onnx.NodeProto) -> str:
    return node.name or next((o for o in node.output if o), node.op_type)


def _unsupported(view: _Graph, node: onnx.NodeProto, op_type: str, weight: str, reason: str,
                 consumer: str = "") -> QuantizedSite:
    return QuantizedSite(_label(node), op_type, view.index, weight, consumer, 0, 0, None, reason)


def _input(node: onnx.NodeProto, slot: int) -> str:
    return node.input[slot] if len(node.input) > slot else ""


def _integer_kind(tensor: onnx.TensorProto) -> tuple[int, bool] | None:
    return INTEGER_TYPES.get(tensor.data_type)


def _is_symmetric(model, view: _Graph, zero_point: str, bits: int, signed: bool) -> bool:
    """No zero point, or every zero point at the middle of the range (0 signed, 2^(bits−1) unsigned)."""
    tensor = view.const(zero_point)
    if tensor is None:
        return True
    middle = 0 if signed else 1 << (bits - 1)
    return bool(np.all(tensor_array(model, tensor).astype(np.float64) == middle))


def _scale_count(view: _Graph, scale: str, N: int) -> int | None:
    """Number of scales when they are one per tensor or one per output column, else None."""
    tensor = view.const(scale)
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor is not None else -1
    return count if count in (1, N) and tensor.data_type in FLOAT_TYPES else None


# --- dynamic quantization (quantize_dynamic and what ONNX Runtime fuses it into) ------------------------------


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


def _dynamic_quantize_lstm(model, view: _Graph, n_index: int, node: onnx.NodeProto) -> QuantizedSite:
    """DynamicQuantizeLSTM(X, W, R, B, seq_lens, h0, c0, P, W_scale, W_zp, R_scale, R_zp): W [dirs, in, 4H]."""
    names = {"W": _input(node, 1), "R": _input(node, 2), "W_scale": _input(node, 8),
             "W_zero_point": _input(node, 9), "R_scale": _input(node, 10), "R_zero_point": _input(node, 11)}
    tensors = {role: view.const(name) for role, name in names.items()}
    if any(tensors[role] is None for role in ("W", "R", "W_scale", "R_scale")) or any(
            names[z] and tensors[z] is None for z in ("W_zero_point", "R_zero_point")):
        return _unsupported(view, node, "DynamicQuantizeLSTM", names["W"], "DynamicQuantizeLSTM whose weights, "
                            "scales or zero points are computed at run time is not supported", "LSTM")
    W = tensors["W"]
    if W.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) or len(W.dims) != 3:
        return _unsupported(view, node, "DynamicQuantizeLSTM", names["W"], "DynamicQuantizeLSTM with weights other "
                            "than 3-D int8/uint8 is not supported", "LSTM")
    dirs, K, gates = W.dims
    scheme = _lstm_scheme(model, view, names, tensors)
    roles = dict(names, x=node.input[0], output=next((o for o in node.output if o), ""))
    return QuantizedSite(_label(node), "DynamicQuantizeLSTM", view.index, names["W"], "LSTM", K, dirs * gates,
                         scheme, "", (n_index,), roles)


def _lstm_scheme(model, view: _Graph, names: dict, tensors: dict) -> QuantScheme:
    bits, signed = _integer_kind(tensors["W"])
    per_channel = len(tensors["W_scale"].dims) == 2
    symmetric = all(_is_symmetric(model, view, names[z], bits, signed) for z in ("W_zero_point", "R_zero_point"))
    reduced = all(_lstm_reduced(model, view, names[w], names[f"{w}_zero_point"], signed) for w in ("W", "R"))
    return QuantScheme("dynamic_lstm", bits, signed, "per-channel" if per_channel else "per-tensor", symmetric,
                       1 if per_channel else None, reduce_range=reduced)


def _lstm_reduced(model, view: _Graph, weight: str, zero_point: str, signed: bool) -> bool:
    """Whether a DynamicQuantizeLSTM weight [dirs, K, 4H] holds 7-bit values (reduce_range), so that it is
    requantized as 7-bit (zero points per direction, or per direction and column)."""
    q = tensor_array(model, view.const(weight)).astype(np.int64)
    zero = view.const(zero_point) if zero_point else None
    z = np.zeros(1, np.int64) if zero is None else tensor_array(model, zero).astype(np.int64)
    z = z.reshape(q.shape[0], 1, -1) if z.size > 1 else z.reshape(())
    return bool(np.abs(q - z).max(initial=0) <= 64 if signed else q.max(initial=0) <= 127)


# --- weight-only: QDQ, Cast+Mul, MatMulNBits ----------------------------------------------------------------------


def _weight_consumers(view: _Graph, tensor: str):
    """[(graph, node index, node)] reading `tensor` when every reader takes it as a MatMul/Gemm weight; [] when
    none does (not a weight); None when some readers take it otherwise."""
    graphs = view.all_graphs
    readers = view.readers.get(tensor, [])
    uses = [(g, n, graphs[g].node[n]) for g, n, slot in readers if n >= 0 and slot == WEIGHT_SLOTS.get(
        graphs[g].node[n].op_type) and same_domain(graphs[g].node[n], "")]
    if not uses:
        return []
    return uses if len(uses) == len(readers) else None


def _consumer_shape(dims, uses) -> tuple[str, int, int, bool] | None:
    """(consumer op, K, N, transposed) of a 2-D weight read by MatMul/Gemm nodes, or None."""
    if len(dims) != 2:
        return None
    node = uses[0][2]
    transposed = node.op_type == "Gemm" and bool(node_attribute(node, "transB", 0))
    K, N = (dims[1], dims[0]) if transposed else (dims[0], dims[1])
    return node.op_type, K, N, transposed


def _dequantize_linear(model, view: _Graph, n_index: int, node: onnx.NodeProto) -> QuantizedSite | None:
    """DequantizeLinear(q, scale, zero_point) of constants whose output is only ever a MatMul/Gemm weight."""
    q_name, scale_name, zero_name = (_input(node, i) for i in range(3))
    q, scale = view.const(q_name), view.const(scale_name)
    if q is None or scale is None:
        return None  # an activation's dequantization
    uses = _weight_consumers(view, node.output[0])
    if not uses:
        return None if uses == [] else _unsupported(view, node, "DequantizeLinear", q_name, "this dequantized "
                                                    "weight is also read as something other than a MatMul/Gemm "
                                                    "weight, so it is left as it is")
    shape = _consumer_shape(q.dims, uses)
    kind = _integer_kind(q)
    if shape is None or kind is None or (zero_name and view.const(zero_name) is None):
        return _unsupported(view, node, "DequantizeLinear", q_name, "only 2-D 4/8/16-bit integer weights with "
                            "constant scales and zero points are dequantized; this one is left as it is")
    consumer, K, N, transposed = shape
    bits, signed = kind
    block = int(node_attribute(node, "block_size", 0))
    axis = int(node_attribute(node, "axis", 1)) % 2
    per_tensor = int(np.prod(scale.dims, dtype=np.int64)) == 1 and block == 0
    granularity = "per-tensor" if per_tensor else ("block" if block else "per-channel")
    scheme = QuantScheme("qdq", bits, signed, granularity, _is_symmetric(model, view, zero_name, bits, signed),
                         None if per_tensor else (1 - axis if transposed else axis), block or None)
    tensors = {"q": q_name, "scale": scale_name, "zero_point": zero_name, "output": node.output[0],
               "axis": str(axis), "block_size": str(block)}
    return QuantizedSite(_label(node), "DequantizeLinear", view.index, q_name, consumer, K, N, scheme, "",
                         (n_index,), tensors)


def _cast_mul(model, view: _Graph, n_index: int, node: onnx.NodeProto) -> QuantizedSite | None:
    """Mul(Cast(q), scale) or Mul(Sub(Cast(q), zero_point), scale) of constants, only ever a MatMul/Gemm weight."""
    for operand, scale_name in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        scale = view.const(scale_name)
        chain = _cast_chain(view, operand)
        if scale is not None and scale.data_type in FLOAT_TYPES and chain is not None:
            break
    else:
        return None
    cast_index, sub_index, q_name, zero_name = chain
    uses = _weight_consumers(view, node.output[0])
    if not uses:
        return None if uses == [] else _unsupported(view, node, "Cast+Mul", q_name, "this dequantized weight is "
                                                    "also read as something other than a MatMul/Gemm weight, so it "
                                                    "is left as it is")
    q = view.const(q_name)
    shape, axis = _consumer_shape(q.dims, uses), _broadcast_axis(list(q.dims), list(scale.dims))
    if shape is None or axis is False:
        return _unsupported(view, node, "Cast+Mul", q_name, "only 2-D integer weights scaled per tensor or per "
                            "row/column are dequantized; this one is left as it is")
    consumer, K, N, transposed = shape
    bits, signed = _integer_kind(q)
    scheme = QuantScheme("cast_mul", bits, signed, "per-tensor" if axis is None else "per-channel",
                         _is_symmetric(model, view, zero_name, bits, signed) if zero_name else True,
                         None if axis is None else (1 - axis if transposed else axis))
    nodes = (n_index, cast_index) if sub_index is None else (n_index, sub_index, cast_index)
    tensors = {"q": q_name, "scale": scale_name, "zero_point": zero_name, "output": node.output[0]}
    return QuantizedSite(_label(node), "Cast+Mul", view.index, q_name, consumer, K, N, scheme, "", nodes, tensors)


def _cast_chain(view: _Graph, tensor: str):
    """(Cast index, Sub index or None, integer constant, zero point constant or '') behind `tensor`, or None."""
    sub, zero_name = view.node_of(tensor, "Sub"), ""
    if sub is not None:
        if view.const(sub.input[1]) is None:
            return None
        zero_name, tensor = sub.input[1], sub.input[0]
    cast = view.node_of(tensor, "Cast")
    if cast is None or node_attribute(cast, "to", None) not in FLOAT_TYPES:
        return None
    q = view.const(cast.input[0])
    if q is None or _integer_kind(q) is None:
        return None
    sub_index = None if sub is None else view.producer[sub.output[0]]
    return view.producer[cast.output[0]], sub_index, cast.input[0], zero_name


def _broadcast_axis(q_dims: list[int], scale_dims: list[int]):
    """None for one scale, the axis of q the scales run along for per-row/column scales, False otherwise."""
    count = int(np.prod(scale_dims, dtype=np.int64))
    if count == 1:
        return None
    padded = [1] * (len(q_dims) - len(scale_dims)) + scale_dims
    varying = [i for i, d in enumerate(padded) if d != 1]
    if len(padded) != len(q_dims) or len(varying) != 1 or padded[varying[0]] != q_dims[varying[0]]:
        return False
    return varying[0]


def _matmul_nbits(model, view: _Graph, n_index: int, node: onnx.NodeProto) -> QuantizedSite:
    """MatMulNBits(A, B, scales, zero_points, g_idx, bias) with attributes K, N, bits, block_size."""
    a, b, scale_name, zero_name, g_idx, bias = (_input(node, i) for i in range(6))
    K, N = int(node_attribute(node, "K", 0)), int(node_attribute(node, "N", 0))
    bits, block = int(node_attribute(node, "bits", 4)), int(node_attribute(node, "block_size", 0))
    if view.const(b) is None or view.const(scale_name) is None or (zero_name and view.const(zero_name) is None):
        return _unsupported(view, node, "MatMulNBits", b, "MatMulNBits whose weight, scales or zero points are "
                            "computed at run time is not supported", "MatMul")
    if g_idx:
        return _unsupported(view, node, "MatMulNBits", b, "MatMulNBits with a g_idx input (act-order) is not "
                            "supported; quantize the float model without act-order", "MatMul")
    if bits not in (2, 4, 8) or block <= 0 or view.const(b).data_type != onnx.TensorProto.UINT8:
        return _unsupported(view, node, "MatMulNBits", b, f"MatMulNBits with {bits} bits and block size {block} "
                            "is not supported (2, 4 or 8 bits packed in uint8 are)", "MatMul")
    symmetric = not zero_name
    scheme = QuantScheme("nbits", bits, symmetric, "block", symmetric, 0, block)
    tensors = {"q": b, "scale": scale_name, "zero_point": zero_name, "x": a, "output": node.output[0], "bias": bias}
    return QuantizedSite(_label(node), "MatMulNBits", view.index, b, "MatMul", K, N, scheme, "", (n_index,), tensors)


_MATCHERS = {
    ("", "MatMulInteger"): _matmul_integer,
    (MS_DOMAIN, "DynamicQuantizeMatMul"): _dynamic_quantize_matmul,
    (MS_DOMAIN, "MatMulIntegerToFloat"): _matmul_integer_to_float,
    (MS_DOMAIN, "DynamicQuantizeLSTM"): _dynamic_quantize_lstm,
    ("", "DequantizeLinear"): _dequantize_linear,
    ("", "Mul"): _cast_mul,
    (MS_DOMAIN, "MatMulNBits"): _matmul_nbits,
}
