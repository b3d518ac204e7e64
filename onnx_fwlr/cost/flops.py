"""FLOPs of the matrix products in a model, per node, from the shapes seen when it runs.

Counted: MatMul, MatMulInteger and Gemm (2·M·K·N), and the recurrent ops LSTM, GRU and RNN, whose input part
(X @ Wᵀ at every step) and recurrent part (H @ Rᵀ at every step) are both matrix products: per direction
2 · seq · batch · gates·H · (input_size + H), with 4 gates for LSTM, 3 for GRU, 1 for RNN. Element-wise work
(activations, biases, the gate arithmetic) is not counted. Shapes come from one run of the model with every
operand exposed as an output, so symbolic and data-dependent shapes are the real ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from onnx_fwlr.io import runtime
from onnx_fwlr.sites.find import walk_graphs

# Ops whose FLOPs we count, with the input positions of the operands whose shapes the count needs.
MATMUL_OPERANDS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "Gemm": (0, 1)}
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
COUNTED_OPERANDS = {**MATMUL_OPERANDS, **{op: (0, 1, 2) for op in RECURRENT_GATES}}  # X, W, R


def matmul_flops(op_type, a_shape, b_shape, attributes=None):
    """2*M*K*N for one MatMul/Gemm given its operand shapes (MatMul: NumPy matmul rules; Gemm: transA/transB)."""
    attributes = attributes or {}
    if op_type == "Gemm":
        m, k = (a_shape[1], a_shape[0]) if attributes.get("transA", 0) else (a_shape[0], a_shape[1])
        n = b_shape[0] if attributes.get("transB", 0) else b_shape[1]
        return 2 * int(m) * int(k) * int(n)
    a_shape, b_shape = list(a_shape), list(b_shape)
    m = a_shape[-2] if len(a_shape) >= 2 else 1
    k = a_shape[-1]
    n = b_shape[-1] if len(b_shape) >= 2 else 1
    batch = np.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2]))
    return 2 * int(np.prod(batch, dtype=np.int64)) * int(m) * int(k) * int(n)


def recurrent_flops(op_type, x_shape, w_shape, r_shape, attributes=None):
    """Matrix-product FLOPs of one LSTM/GRU/RNN run: input part 2·S·B·G·I plus recurrent part 2·S·B·G·H per
    direction, with G = gates·H rows of W [dirs, G, I] and R [dirs, G, H], and X [S, B, I] (layout=1: [B, S, I]).
    """
    attributes = attributes or {}
    if attributes.get("layout", 0):
        batch, seq = x_shape[0], x_shape[1]
    else:
        seq, batch = x_shape[0], x_shape[1]
    directions, gate_rows, input_size = (int(d) for d in w_shape)
    hidden = int(r_shape[2])
    if gate_rows != RECURRENT_GATES[op_type] * hidden:
        raise RuntimeError(f"{op_type} weight has {gate_rows} rows, expected {RECURRENT_GATES[op_type]} x {hidden}")
    per_direction = 2 * int(seq) * int(batch) * gate_rows * (input_size + hidden)
    return directions * per_direction


def node_flops(op_type, shapes, attributes=None):
    """FLOPs of one counted node given the shapes of its COUNTED_OPERANDS inputs, in order."""
    if op_type in RECURRENT_GATES:
        return recurrent_flops(op_type, *shapes, attributes)
    return matmul_flops(op_type, *shapes, attributes)


def node_key(node):
    """How a node is named in per-node tables: its name, or its first output when it has none."""
    return node.name or node.output[0]


def _shape_probe_model(model):
    """A copy of the model's structure whose outputs also expose every operand of a main-graph counted node.

    Returns (probe model, counted nodes of the main graph, count of counted nodes inside subgraphs).
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    constant_names = {init.name for init in graph.initializer} | {inp.name for inp in graph.input}
    exposed = {out.name for out in graph.output}
    nodes = [node for node in graph.node if node.op_type in COUNTED_OPERANDS]
    for node in nodes:
        for index in COUNTED_OPERANDS[node.op_type]:
            name = node.input[index]
            if name not in constant_names and name not in exposed:
                graph.output.append(onnx.ValueInfoProto(name=name))
                exposed.add(name)
    nested = sum(node.op_type in COUNTED_OPERANDS for sub in walk_graphs(model)[1:] for node in sub.node)
    return probe, nodes, nested


def _constant_shapes(model):
    """Shapes of initializers and Constant-node tensors of the main graph (the weights)."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(attr.t.dims)
    return shapes


def measure_node_flops(model_path, model, feed, providers):
    """Run the model once with its operands exposed; return ({node key: FLOPs}, nodes counted in subgraphs)."""
    probe, nodes, nested = _shape_probe_model(model)
    options = runtime.session_options(optimize=False, external_data_dir=Path(model_path).resolve().parent)
    session = runtime.make_session(probe, options, providers)
    output_names = [out.name for out in session.get_outputs()]
    shapes = dict(zip(output_names, (value.shape for value in session.run(None, feed))))
    shapes.update({name: value.shape for name, value in feed.items()})
    shapes.update(_constant_shapes(model))
    flops = {}
    for node in nodes:
        attributes = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
        operands = [shapes[node.input[i]] for i in COUNTED_OPERANDS[node.op_type]]
        key = node_key(node)
        flops[key] = flops.get(key, 0) + node_flops(node.op_type, operands, attributes)
    return flops, nested
