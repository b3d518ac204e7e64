"""Constant weights no command factorises (convolution kernels, recurrent R, tables, ...), each with the reason
compress leaves it: read by `inspect` (workflows.listing) and by a quantized input's report (pipeline.quantized_input),
so it lives below both."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_fwlr.io.onnx_utils import walk_graphs
from onnx_fwlr.sites.find import Skipped, constant_tensors

LEFT_ALONE_MIN = 1024  # elements: smaller constants (biases, scales, shapes) are not weights worth listing
# ops a stored weight passes through on its way to the op that computes with it (int8 storage, layout)
_STORAGE_OPS = {"Cast", "Sub", "Mul", "DequantizeLinear", "Transpose", "Reshape", "Identity", "Unsqueeze", "Squeeze"}
_RECURRENT = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"}
_CONV = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"}


def left_alone(model: onnx.ModelProto, listed: set[str], quantized: list) -> list[Skipped]:
    """Every constant weight (>= LEFT_ALONE_MIN elements) that is neither a site nor listed already, with why
    compress leaves it: recurrent weights, convolution kernels (float or stored as integers), tables, ..."""
    graphs = walk_graphs(model)
    constants = constant_tensors(graphs)
    producers = {o: n for g in graphs for n in g.node for o in n.output}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for graph in graphs:
        for node in graph.node:
            for slot, name in enumerate(node.input):
                readers.setdefault(name, []).append((node, slot))
    taken = set(listed) | {q.weight for q in quantized if q.scheme is not None and q.consumer != "LSTM"}
    taken |= {q.tensors.get("W", "") for q in quantized if q.scheme is not None and q.consumer == "LSTM"}
    found = []
    for name, (_, _, tensor) in constants.items():
        count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
        if name in taken or name in producers or count < LEFT_ALONE_MIN or len(tensor.dims) < 2:
            continue
        node, slot, stored = _final_reader(name, readers)
        if node is None:
            continue
        reason = f"{_left_alone_reason(node, slot, stored)} ({count:,} numbers)"
        found.append(Skipped(node.name or node.output[0], node.op_type, name, reason))
    return found


def _final_reader(name: str, readers: dict, depth: int = 0):
    """(node, slot, storage ops passed) of the op that computes with a constant, following int8 storage
    chains (Cast, Sub, Mul, DequantizeLinear) and layout ops; (None, ..) when several ops read it apart."""
    users = readers.get(name, [])
    if len(users) != 1 or depth > 4:
        return (users[0][0], users[0][1], []) if users and depth == 0 else (None, -1, [])
    node, slot = users[0]
    if node.op_type in _STORAGE_OPS and node.output:
        after, after_slot, ops = _final_reader(node.output[0], readers, depth + 1)
        if after is not None:
            return after, after_slot, [node.op_type] + ops
    return node, slot, []


def _left_alone_reason(node: onnx.NodeProto, slot: int, stored: list[str]) -> str:
    how = ""
    if "DequantizeLinear" in stored:
        how = "stored quantized (QDQ); "
    elif "Cast" in stored:
        how = "stored as integers (Cast" + ("+Sub" if "Sub" in stored else "") + "+Mul); "
    if node.op_type in _RECURRENT and slot == 2:
        return (f"{how}recurrent weight R of {node.op_type}: it multiplies the hidden state inside the op at "
                "every step, so it is kept as it is (input weights W are factorised)")
    if node.op_type in _CONV:
        return f"{how}a convolution kernel: compress factorises MatMul/Gemm and LSTM/GRU input weights only"
    if node.op_type in ("Gather", "GatherBlockQuantized"):
        return f"{how}an embedding table: kept by compress (`--quantize` may quantize it)"
    return f"{how}read by {node.op_type} (input {slot}), not as a MatMul/Gemm weight, so it is kept as it is"
