"""QDQ weights: DequantizeLinear of constants feeding MatMul/Gemm weights → a float initializer in its place;
written again per tensor/channel from ONNX Runtime's quantize_data, blocked (4 bits) by MatMulNBitsQuantizer's QDQ
format."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from onnx_fwlr.quant.formats.common import (
    Format,
    _consumer_shape,
    _input,
    _integer_kind,
    _is_symmetric,
    _label,
    _unsupported,
    _weight_consumers,
    affine,
)
from onnx_fwlr.quant.quantized_site import QuantizedSite, QuantScheme, _Graph
from onnx_fwlr.sites.find import node_attribute


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


def _dequantized_values(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
                       tensors: dict[str, str]) -> np.ndarray:
    """ONNX DequantizeLinear: per tensor (scalar scale), per axis (1-D scale), or blocked (scale of q's rank)."""
    axis, block = int(tensors.get("axis", 1)), int(tensors.get("block_size", 0))
    axis = axis % q.ndim
    if scale.size == 1 and block == 0:
        return affine(q, None if zero_point is None else zero_point.reshape(()), scale.reshape(()))
    if block == 0:
        shape = [1] * q.ndim
        shape[axis] = -1
        zero = None if zero_point is None else zero_point.reshape(shape)
        return affine(q, zero, scale.reshape(shape))
    repeat = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
    zero = None if zero_point is None else np.repeat(zero_point, block, axis=axis).take(range(q.shape[axis]), axis=axis)
    return affine(q, zero, repeat)


def _weights(arr: Callable, site: QuantizedSite) -> dict[str, np.ndarray]:
    return {"B": _dequantized_values(arr("q"), arr("scale"), arr("zero_point"), site.tensors)}


def _cannot_write(scheme: QuantScheme) -> str | None:
    if scheme.granularity == "block" and scheme.bits != 4:
        return f"ONNX Runtime writes blocked QDQ weights at 4 bits only, not {scheme.bits}"
    return None


FORMAT = Format("qdq", {("", "DequantizeLinear"): _dequantize_linear}, _weights, "fold",
                lambda scheme: "nbits" if scheme.granularity == "block" else "weights", _cannot_write)
