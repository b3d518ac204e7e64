"""Tied embeddings: a language model's head that is its embedding table, transposed.

Exporters of tied models (SmolLM2, GPT-2, LLaMA-style small models) write the head either as Transpose(table)
or as a second initializer holding the transposed table's bytes. The second form stores the same numbers
twice. A head of that form is treated as one weight with its table: it is not factorised (its factors would be
stored beside the table, which stays for the Gather), and the output's head reads Transpose(table) instead of
its copy, so the table's values are stored once. ONNX Runtime folds the Transpose when it loads the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from onnx_fwlr.io.model import tensor_array
from onnx_fwlr.io.onnx_utils import FLOAT_TYPES
from onnx_fwlr.sites.find import Site

_CHUNK_ROWS = 4096  # rows compared at a time: a vocabulary-sized table is never copied whole


@dataclass(frozen=True)
class Tie:
    """A head weight (a site's) equal to the transpose of an embedding table read by a Gather."""

    head: str  # the head's weight (initializer) name
    node: str  # the head's node name, as the report shows sites
    table: str  # the embedding table's initializer name
    params: int  # numbers stored once instead of twice

    def describe(self) -> str:
        return (f"{self.node}: its weight '{self.head}' is the embedding table '{self.table}' transposed (same "
                f"values): treated as one weight. The table is kept as it is; the head is not factorised and now "
                f"reads Transpose('{self.table}'), so {self.params:,} numbers are stored once instead of twice")


def embedding_tables(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Main-graph 2-D float initializers read as the data of a Gather (embedding tables), by name."""
    initializers = {t.name: t for t in model.graph.initializer}
    tables = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input and node.input[0] in initializers:
            tensor = initializers[node.input[0]]
            if tensor.data_type in FLOAT_TYPES and len(tensor.dims) == 2:
                tables[tensor.name] = tensor
    return tables


def find_ties(model: onnx.ModelProto, sites: list[Site]) -> list[Tie]:
    """Sites whose weight repeats an embedding table, transposed (same dtype and values, compared exactly)."""
    tables = embedding_tables(model)
    if not tables:
        return []
    initializers = {t.name: t for t in model.graph.initializer}
    ties = []
    for site in sites:
        if site.graph_index != 0 or site.constant_node is not None or site.weight in tables:
            continue
        weight = initializers.get(site.weight)
        for table in tables.values():
            if (weight is not None and weight.data_type == table.data_type
                    and list(table.dims) == [site.N, site.K] and _same_transposed(model, weight, table, site)):
                ties.append(Tie(site.weight, site.name, table.name, site.K * site.N))
                break
    return ties


def _same_transposed(model: onnx.ModelProto, weight: onnx.TensorProto, table: onnx.TensorProto, site: Site) -> bool:
    """Whether the site's [K, N] weight equals the [N, K] table transposed (a Gemm transB weight is stored [N, K]:
    then equal as stored)."""
    W = tensor_array(model, weight, copy=False)
    E = tensor_array(model, table, copy=False)
    for start in range(0, E.shape[0], _CHUNK_ROWS):
        rows = np.asarray(E[start:start + _CHUNK_ROWS])
        stop = start + _CHUNK_ROWS
        mine = np.asarray(W[start:stop]) if site.transposed else np.asarray(W[:, start:stop]).T
        if not np.array_equal(rows, mine):
            return False
    return True


def retie(model: onnx.ModelProto, ties: list[Tie]) -> None:
    """Point each tied head at Transpose(table) (or the table itself for a Gemm with transB) and drop its copy,
    in place."""
    for tie in ties:
        graph = model.graph
        transposed_name = f"{tie.table}/tied_transpose"
        uses = [node for node in graph.node if tie.head in node.input]
        needs_transpose = any(not (n.op_type == "Gemm" and _trans_b(n)) for n in uses)
        for node in uses:
            direct = node.op_type == "Gemm" and _trans_b(node)
            for i, name in enumerate(node.input):
                if name == tie.head and i == 1:
                    node.input[i] = tie.table if direct else transposed_name
        if needs_transpose:
            first = min(i for i, n in enumerate(graph.node) if transposed_name in n.input)
            graph.node.insert(first, helper.make_node("Transpose", [tie.table], [transposed_name],
                                                      name=f"{tie.node}/tied_transpose", perm=[1, 0]))
        for listing in (graph.initializer, graph.input):  # old IRs list initializers as graph inputs too
            for index, value in enumerate(listing):
                if value.name == tie.head:
                    del listing[index]
                    break


def _trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i for a in node.attribute)
