"""Cast+Mul weights: Mul(Cast(int), scale), or Cast → Sub(zero point) → Mul, feeding MatMul/Gemm weights → a float
initializer in its place; written again from ONNX Runtime's quantize_data."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_fwlr.quant.formats.common import (
    Format,
    _consumer_shape,
    _integer_kind,
    _is_symmetric,
    _label,
    _unsupported,
    _weight_consumers,
    affine_weights,
)
from onnx_fwlr.quant.quantized_site import QuantizedSite, QuantScheme, _Graph
from onnx_fwlr.sites.find import FLOAT_TYPES, node_attribute


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


FORMAT = Format("cast_mul", {("", "Mul"): _cast_mul}, affine_weights, "fold", lambda scheme: "weights",
                lambda scheme: None)
