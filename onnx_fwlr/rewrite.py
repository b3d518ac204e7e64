"""Rewriting the graph: each factorised weight becomes two factor MatMuls, standard ops only.

The protobuf is edited in place (nodes replaced where they stand, so topological order holds), which keeps
every other field exactly as it was: inputs, outputs, opsets, metadata, value infos, doc strings.
(A graphsurgeon import/export round-trip drops metadata_props, doc_string and unused value_info.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .sites import Site, WeightUse, walk_graphs


@dataclass
class Factors:
    """W ≈ A @ B for one site, plus an optional output shift (bias correction), all float64."""

    A: np.ndarray  # [K, r]
    B: np.ndarray  # [r, N]
    shift: np.ndarray | None = None  # [N], added to X @ A @ B


def _storage_dtype(site: Site):
    if site.dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(site.dtype)


def _all_names(graphs: list[onnx.GraphProto]) -> set[str]:
    names: set[str] = set()
    for graph in graphs:
        names.update(t.name for t in graph.initializer)
        names.update(v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info))
        for node in graph.node:
            names.update(node.input)
            names.update(node.output)
            names.add(node.name)
    return names


class _Namer:
    """Deterministic fresh names: the wanted name, or the wanted name with the first free numeric suffix."""

    def __init__(self, taken: set[str]):
        self.taken = taken

    def __call__(self, wanted: str) -> str:
        name, i = wanted, 1
        while name in self.taken:
            name, i = f"{wanted}_{i}", i + 1
        self.taken.add(name)
        return name


def apply_factors(model: onnx.ModelProto, sites: list[Site], factors: dict[str, Factors]) -> onnx.ModelProto:
    """Replace every site in `factors` (keyed by weight name) in place; other sites are left dense."""
    graphs = walk_graphs(model)
    namer = _Namer(_all_names(graphs))
    opset = _default_opset(model)
    replacements: dict[int, dict[int, list[onnx.NodeProto]]] = {}
    removals: dict[int, set[str]] = {}
    constant_nodes: dict[int, set[int]] = {}

    for site in sites:
        if site.weight not in factors:
            continue
        f = factors[site.weight]
        dtype = _storage_dtype(site)
        owner = graphs[site.graph_index]
        a_name, b_name = namer(f"{site.weight}/factor_A"), namer(f"{site.weight}/factor_B")
        owner.initializer.append(numpy_helper.from_array(np.asarray(f.A, dtype=dtype), a_name))
        owner.initializer.append(numpy_helper.from_array(np.asarray(f.B, dtype=dtype), b_name))
        shift = None if f.shift is None or not np.any(f.shift) else np.asarray(f.shift, dtype=np.float64)
        for use in site.uses:
            nodes = _factor_nodes(use, a_name, b_name, shift, dtype, graphs[use.graph_index], namer, opset)
            replacements.setdefault(use.graph_index, {})[use.node_index] = nodes
        if site.constant_node is None:
            removals.setdefault(site.graph_index, set()).add(site.weight)
        else:
            constant_nodes.setdefault(site.graph_index, set()).add(site.constant_node)

    for g_index, graph in enumerate(graphs):
        swaps = replacements.get(g_index, {})
        dropped = constant_nodes.get(g_index, set())
        if swaps or dropped:
            new_nodes = []
            for n_index, node in enumerate(graph.node):
                if n_index in dropped:
                    continue
                new_nodes.extend(swaps.get(n_index, [node]))
            del graph.node[:]
            graph.node.extend(new_nodes)
        _remove_tensors(graph, removals.get(g_index, set()))
    return model


def _factor_nodes(use: WeightUse, a_name, b_name, shift, dtype, graph, namer, opset) -> list[onnx.NodeProto]:
    """X @ A then (·) @ B for one use; a Gemm keeps transA on the first op and C/alpha/beta on the second.

    A bias correction becomes an Add after the second op (value alpha · shift, so it is exact for Gemm too).
    """
    base = use.node_name or use.output
    mid = namer(f"{base}/factor_A_out")
    out = use.output if shift is None else namer(f"{base}/factor_B_out")
    nodes = []
    if use.trans_a:
        inputs = [use.input, a_name] + _zero_c(graph, namer, base, opset, dtype)
        nodes.append(helper.make_node("Gemm", inputs, [mid], name=namer(f"{base}/factor_A"), transA=1))
    else:
        nodes.append(helper.make_node("MatMul", [use.input, a_name], [mid], name=namer(f"{base}/factor_A")))
    if use.op_type == "Gemm" and (use.bias is not None or use.alpha != 1.0):
        inputs = [mid, b_name] + ([use.bias] if use.bias is not None else _zero_c(graph, namer, base, opset, dtype))
        nodes.append(
            helper.make_node("Gemm", inputs, [out], name=namer(f"{base}/factor_B"), alpha=use.alpha, beta=use.beta)
        )
    else:
        nodes.append(helper.make_node("MatMul", [mid, b_name], [out], name=namer(f"{base}/factor_B")))
    if shift is not None:
        shift_name = namer(f"{base}/bias_correction")
        value = np.asarray(shift * use.alpha, dtype=dtype)
        graph.initializer.append(numpy_helper.from_array(value, shift_name))
        nodes.append(helper.make_node("Add", [out, shift_name], [use.output], name=namer(f"{base}/bias_correction")))
    return nodes


def _zero_c(graph, namer, base, opset, dtype) -> list[str]:
    """Gemm's C is optional from opset 11; older opsets get an explicit zero scalar."""
    if opset >= 11:
        return []
    name = namer(f"{base}/zero_bias")
    graph.initializer.append(numpy_helper.from_array(np.zeros([1], dtype=dtype), name))
    return [name]


def _remove_tensors(graph: onnx.GraphProto, names: set[str]) -> None:
    """Drop replaced weights, and their stale graph-input and value-info entries (old IR lists weights as inputs)."""
    if not names:
        return
    keep = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for field in (graph.input, graph.value_info):
        kept = [v for v in field if v.name not in names]
        del field[:]
        field.extend(kept)


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0
