"""Rewriting a quantized model into its float form, site by site (see dequantize.py).

Each site's main node (or the node producing its output) is replaced by float nodes that produce the same
output; the other nodes of its pattern (DynamicQuantizeLinear, Cast, scale Mul, …) and its integer tensors are
removed once nothing reads them, so an activation quantizer shared by several sites goes with the last one.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_fwlr.quant.formats import FORMATS
from onnx_fwlr.quant.formats.common import WEIGHT_SLOTS
from onnx_fwlr.quant.quantized_site import QuantizedSite
from onnx_fwlr.sites.find import FLOAT_TYPES, constant_tensors, node_attribute, walk_graphs

# Suffixes ONNX Runtime's quantizers add to node and tensor names; the float form takes the name without them.
_ORT_SUFFIX = re.compile(r"(_quant|_quantized|_DQ_Q[248]|_Q[248]|_DequantizeLinear_Output)$")


class _Names:
    """Every node and tensor name in the model, to make new ones unique."""

    def __init__(self, model: onnx.ModelProto):
        self.used: set[str] = set()
        for graph in walk_graphs(model):
            self.used.update(t.name for t in graph.initializer)
            self.used.update(v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info))
            for node in graph.node:
                self.used.add(node.name)
                self.used.update(node.output)

    def new(self, base: str) -> str:
        name, count = base, 0
        while name in self.used:
            count += 1
            name = f"{base}_{count}"
        self.used.add(name)
        return name


def _float_name(name: str) -> str:
    return _ORT_SUFFIX.sub("", name) or name


def rewrite_sites(model: onnx.ModelProto, sites: list[QuantizedSite],
                  weights: list[dict[str, np.ndarray]]) -> list[QuantizedSite]:
    """Rewrite `model` in place; returns the sites with float_nodes / float_weight set."""
    graphs = walk_graphs(model)
    constants = constant_tensors(graphs)
    names = _Names(model)
    inserted: dict[tuple[int, int], list[onnx.NodeProto]] = {}  # (graph, node replaced) -> its float nodes
    removable: set[str] = set()  # pattern outputs and integer tensors, removed once nothing reads them
    shared: dict[tuple, str] = {}  # one float initializer per stored weight, however many nodes read it
    done = []
    for site, arrays in zip(sites, weights):
        graph = graphs[site.graph_index]
        elem = _float_type(graph, constants, site)
        anchor, form = None, FORMATS[site.scheme.format].float_form
        if form in ("matmul", "lstm"):
            anchor = _producer_index(graph, site.tensors["output"])
            build = _lstm_nodes if form == "lstm" else _matmul_nodes
            nodes, float_weight = build(graph, site, arrays, elem, names, shared)
            inserted[(site.graph_index, anchor)] = nodes
            float_nodes = [nodes[0].name]
        else:
            float_weight, float_nodes = _fold_weight(graphs, site, arrays["B"], elem, names)
        removable.update(o for i in site.nodes if i != anchor for o in graph.node[i].output if o)
        removable.update(v for k, v in site.tensors.items() if k not in _NOT_PATTERN and v)
        done.append(dataclasses.replace(site, float_nodes=tuple(float_nodes), float_weight=float_weight))
    for g_index, graph in enumerate(graphs):
        _replace_nodes(graph, g_index, inserted)
    _remove_unread(graphs, removable)
    return done


_NOT_PATTERN = {"x", "output", "bias", "axis", "block_size"}  # site.tensors roles that are not integer tensors


def _producer_index(graph: onnx.GraphProto, tensor: str) -> int:
    return next(i for i, node in enumerate(graph.node) if tensor in node.output)


def _float_initializer(graph: onnx.GraphProto, name: str, values: np.ndarray, elem_type: int) -> None:
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))


def _float_type(graph: onnx.GraphProto, constants: dict, site: QuantizedSite) -> int:
    """The dequantized weight's element type: the Cast's for Cast+Mul, DequantizeLinear's output_dtype when set,
    else the scale's."""
    if site.op_type == "Cast+Mul":
        return int(node_attribute(graph.node[site.nodes[-1]], "to", onnx.TensorProto.FLOAT))
    if site.op_type == "DequantizeLinear" and node_attribute(graph.node[site.nodes[0]], "output_dtype", 0):
        return int(node_attribute(graph.node[site.nodes[0]], "output_dtype", 0))
    scale = site.tensors.get("scale") or site.tensors.get("W_scale")
    tensor = constants[scale][2] if scale in constants else None
    return tensor.data_type if tensor is not None and tensor.data_type in FLOAT_TYPES else onnx.TensorProto.FLOAT


def _stored_key(site: QuantizedSite) -> tuple:
    """What identifies the stored weight: the same integers, scales and zero points read by several nodes (a
    layer shared ALBERT-style, a tied matrix) are one weight, so its float form is one initializer."""
    t = site.tensors
    return site.graph_index, site.op_type, t.get("q", ""), t.get("scale", ""), t.get("zero_point", "")


def _matmul_nodes(graph, site: QuantizedSite, arrays, elem: int, names: _Names, shared: dict):
    """MatMul(x, W) producing the site's output, with Add(bias) after it when the op had a bias; W is one float
    initializer per stored weight (`shared` remembers those already written)."""
    base = _float_name(site.node)
    key = _stored_key(site)
    weight = shared.get(key)
    if weight is None:
        weight = shared[key] = names.new(_float_name(site.weight))
        _float_initializer(graph, weight, arrays["B"], elem)
    output, bias = site.tensors["output"], site.tensors.get("bias", "")
    matmul_out = names.new(f"{base}/matmul_out") if bias else output
    nodes = [helper.make_node("MatMul", [site.tensors["x"], weight], [matmul_out], name=names.new(base))]
    if bias:
        nodes.append(helper.make_node("Add", [matmul_out, bias], [output], name=names.new(f"{base}/bias")))
    return nodes, weight


def _lstm_nodes(graph, site: QuantizedSite, arrays, elem: int, names: _Names, shared: dict):
    """An LSTM with the DynamicQuantizeLSTM's inputs (X, B, sequence_lens, initial_h, initial_c, P), attributes
    and outputs, and float W and R."""
    node = graph.node[site.nodes[0]]
    w_name, r_name = names.new(_float_name(site.tensors["W"])), names.new(_float_name(site.tensors["R"]))
    _float_initializer(graph, w_name, arrays["W"], elem)
    _float_initializer(graph, r_name, arrays["R"], elem)
    inputs = [node.input[0], w_name, r_name] + [node.input[i] if len(node.input) > i else "" for i in range(3, 8)]
    while inputs and not inputs[-1]:
        inputs.pop()
    lstm = helper.make_node("LSTM", inputs, list(node.output), name=names.new(_float_name(site.node)))
    lstm.attribute.extend(a for a in node.attribute)
    return [lstm], w_name


def _fold_weight(graphs, site: QuantizedSite, values: np.ndarray, elem: int, names: _Names):
    """QDQ / Cast+Mul: a float initializer replaces the dequantized tensor in every MatMul/Gemm reading it."""
    graph = graphs[site.graph_index]
    weight = names.new(_float_name(site.weight))
    _float_initializer(graph, weight, values, elem)
    consumers = []
    for sub in graphs:
        for node in sub.node:
            slot = WEIGHT_SLOTS.get(node.op_type)
            if slot is not None and len(node.input) > slot and node.input[slot] == site.tensors["output"]:
                node.input[slot] = weight
                if not node.name:
                    node.name = names.new(f"{node.op_type}_{node.output[0]}")
                consumers.append(node.name)
    return weight, consumers


def _replace_nodes(graph: onnx.GraphProto, g_index: int, inserted: dict) -> None:
    """Float nodes in place of each replaced node, so the graph stays topologically sorted."""
    if not any(key[0] == g_index for key in inserted):
        return
    nodes = []
    for n_index, node in enumerate(graph.node):
        nodes.extend(inserted.get((g_index, n_index), [node]))
    graph.ClearField("node")
    graph.node.extend(nodes)


def _read_names(graphs: list[onnx.GraphProto]) -> set[str]:
    read = set()
    for graph in graphs:
        read.update(o.name for o in graph.output)
        for node in graph.node:
            read.update(node.input)
    return read


def _remove_unread(graphs: list[onnx.GraphProto], removable: set[str]) -> None:
    """Drop pattern nodes (all outputs removable and unread), then unread integer initializers."""
    while True:
        read = _read_names(graphs)
        changed = False
        for graph in graphs:
            keep = [n for n in graph.node if not _dead(n, removable, read)]
            if len(keep) != len(graph.node):
                changed = True
                graph.ClearField("node")
                graph.node.extend(keep)
        if not changed:
            break
    read = _read_names(graphs)
    for graph in graphs:
        gone = {t.name for t in graph.initializer if t.name in removable and t.name not in read}
        _remove_named(graph.initializer, gone)
        _remove_named(graph.input, gone)
        _remove_named(graph.value_info, removable - read)


def _dead(node: onnx.NodeProto, removable: set[str], read: set[str]) -> bool:
    outputs = [o for o in node.output if o]
    return bool(outputs) and all(o in removable and o not in read for o in outputs)


def _remove_named(field, names: set[str]) -> None:
    for item in [x for x in field if x.name in names]:
        field.remove(item)
