"""What every quantized-weight format shares: the Format record the registry (formats/__init__.py) lists, and
the small readers its matchers use (labels, integer kinds, symmetric zero points, scale counts, weight readers)
and the affine dequantization every documented op computes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_fwlr.io.model import tensor_array
from onnx_fwlr.quant.quantized_site import INTEGER_TYPES, QuantizedSite, QuantScheme, _Graph, same_domain
from onnx_fwlr.sites.find import FLOAT_TYPES, node_attribute

WEIGHT_SLOTS = {"MatMul": 1, "Gemm": 1}  # the input of each float op that takes the weight


@dataclass(frozen=True)
class Format:
    """One quantized-weight format (a QuantScheme.format), all in one file: the ops it recognises, how its
    weight is read back exactly as float, what float form the graph gets, and how ONNX Runtime writes it again.

    `matchers`: (domain, op type) -> match(model, view, node index, node) -> QuantizedSite (scheme None with a
    reason when recognised but unreadable) or None (not a weight use). `dequantize(arr, site)`: float64 weights
    in the layout the float node takes ({"B": ...}, or {"W": ..., "R": ...} for an LSTM), `arr(role)` reading
    the site's tensors. `float_form`: "matmul" (the op becomes MatMul (+ Add)), "lstm" (an LSTM) or "fold" (a
    float initializer in place of the pattern's output). `writer(scheme)`: requantize.py's route ("dynamic",
    "nbits" or "weights"); `cannot_write(scheme)`: why no ONNX Runtime quantizer writes it back, or None."""

    name: str
    matchers: dict[tuple[str, str], Callable]
    dequantize: Callable[[Callable, QuantizedSite], dict[str, np.ndarray]]
    float_form: str
    writer: Callable[[QuantScheme], str]
    cannot_write: Callable[[QuantScheme], str | None]


def affine(q: np.ndarray, zero_point: np.ndarray | None, scale: np.ndarray) -> np.ndarray:
    """(q − zero_point) · scale in float64 with numpy (= ONNX) broadcasting."""
    shifted = q.astype(np.float64) - (0.0 if zero_point is None else zero_point.astype(np.float64))
    return shifted * scale.astype(np.float64)


def affine_weights(arr: Callable, site: QuantizedSite) -> dict[str, np.ndarray]:
    """{"B": (q − zero_point) · scale} with the stored layout's broadcasting (dynamic int8, Cast+Mul)."""
    return {"B": affine(arr("q"), arr("zero_point"), arr("scale"))}


def eight_bits_only(scheme: QuantScheme) -> str | None:
    return None if scheme.bits == 8 else f"quantize_dynamic writes 8-bit weights, not {scheme.bits}-bit ones"


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
