"""Finding the weights that can be factorised: every MatMul/Gemm whose weight operand is a 2-D float constant.

A *site* is one weight, seen in the ONNX convention `Y = X @ W`, `W [K, N]`, with every node that uses it.
Graphs are visited in one deterministic order (main graph, then subgraphs depth-first), and a site refers to
graphs and nodes by their index in that order, so the same indices find them again in a copy of the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_fwlr.io.onnx_utils import DEFAULT_DOMAINS, FLOAT_TYPES, walk_graphs


@dataclass(frozen=True)
class WeightUse:
    """One node that multiplies an activation by the weight."""

    graph_index: int
    node_index: int
    node_name: str
    op_type: str
    input: str  # the activation X (before any transA)
    output: str
    trans_a: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    bias: str | None = None


@dataclass
class Site:
    """A constant weight, normalised to [K, N], and every use of it."""

    weight: str
    graph_index: int  # graph that owns the initializer or Constant node
    constant_node: int | None  # index of the Constant node holding it, None for an initializer
    K: int
    N: int
    dtype: str
    transposed: bool  # stored as [N, K] (Gemm transB=1)
    uses: list[WeightUse] = field(default_factory=list)

    @property
    def params(self) -> int:
        return self.K * self.N

    @property
    def name(self) -> str:
        """The name users see: the first node using the weight (or the weight when unnamed)."""
        return self.uses[0].node_name or self.weight


@dataclass(frozen=True)
class Skipped:
    node: str
    op_type: str
    weight: str | None
    reason: str


def constant_tensors(graphs: list[onnx.GraphProto]) -> dict[str, tuple[int, int | None, onnx.TensorProto]]:
    """name -> (graph index, Constant node index or None, tensor) for every initializer and Constant node."""
    found: dict[str, tuple[int, int | None, onnx.TensorProto]] = {}
    for g_index, graph in enumerate(graphs):
        for tensor in graph.initializer:
            found[tensor.name] = (g_index, None, tensor)
        for n_index, node in enumerate(graph.node):
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        found[node.output[0]] = (g_index, n_index, attr.t)
    return found


def tensor_readers(graphs: list[onnx.GraphProto]) -> dict[str, list[tuple[int, int]]]:
    """name -> (graph index, node index) of every node reading it; graph outputs count as node index -1."""
    readers: dict[str, list[tuple[int, int]]] = {}
    for g_index, graph in enumerate(graphs):
        for n_index, node in enumerate(graph.node):
            for name in set(node.input):
                if name:
                    readers.setdefault(name, []).append((g_index, n_index))
        for out in graph.output:
            readers.setdefault(out.name, []).append((g_index, -1))
    return readers


def node_attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def find_sites(
    model: onnx.ModelProto, include: str | None = None, exclude: str | None = None
) -> tuple[list[Site], list[Skipped]]:
    """All factorisable sites and every MatMul/Gemm that is not one, with the reason."""
    graphs = walk_graphs(model)
    constants = constant_tensors(graphs)
    readers = tensor_readers(graphs)
    candidates: dict[str, list[tuple[WeightUse, bool]]] = {}
    skipped: list[Skipped] = []

    for g_index, graph in enumerate(graphs):
        for n_index, node in enumerate(graph.node):
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in DEFAULT_DOMAINS:
                continue
            label = node.name or node.output[0]
            x_name, w_name = node.input[0], node.input[1]
            if w_name not in constants:
                reason = (
                    "the left operand is the constant; only X @ W with W constant is factorised"
                    if x_name in constants
                    else _computed_weight_reason(w_name, graph, constants)
                )
                skipped.append(Skipped(label, node.op_type, None, reason))
                continue
            if x_name in constants:
                skipped.append(Skipped(label, node.op_type, w_name, "both operands are constants (fold them instead)"))
                continue
            is_gemm = node.op_type == "Gemm"
            use = WeightUse(
                graph_index=g_index,
                node_index=n_index,
                node_name=node.name,
                op_type=node.op_type,
                input=x_name,
                output=node.output[0],
                trans_a=bool(node_attribute(node, "transA", 0)) if is_gemm else False,
                alpha=float(node_attribute(node, "alpha", 1.0)) if is_gemm else 1.0,
                beta=float(node_attribute(node, "beta", 1.0)) if is_gemm else 1.0,
                bias=(node.input[2] if is_gemm and len(node.input) > 2 and node.input[2] else None),
            )
            transposed = bool(node_attribute(node, "transB", 0)) if is_gemm else False
            candidates.setdefault(w_name, []).append((use, transposed))

    sites: list[Site] = []
    for w_name, uses in candidates.items():
        site, reason = _make_site(w_name, uses, constants[w_name], readers.get(w_name, []))
        first = uses[0][0]
        if site is None:
            skipped.append(Skipped(first.node_name or first.output, first.op_type, w_name, reason))
        elif not is_selected(site, include, exclude):
            skipped.append(Skipped(site.name, first.op_type, w_name, "excluded by `include`/`exclude`"))
        else:
            sites.append(site)
    return sites, skipped


def _computed_weight_reason(w_name: str, graph: onnx.GraphProto, constants) -> str:
    """Why a run-time weight is not a site; a weight dequantized from integer constants says so."""
    producer = {out: node for node in graph.node for out in node.output}

    def integer_constant(name: str) -> bool:
        return name in constants and constants[name][2].data_type not in FLOAT_TYPES

    def cast_of_integers(name: str) -> bool:
        node = producer.get(name)
        if node is not None and node.op_type == "Sub":
            node = producer.get(node.input[0]) if node.input[1] in constants else None
        return node is not None and node.op_type == "Cast" and integer_constant(node.input[0])

    node = producer.get(w_name)
    if node is not None and node.op_type == "Transpose" and node.input[0] in constants and any(
            n.op_type == "Gather" and n.input and n.input[0] == node.input[0] for n in graph.node):
        return (f"the weight is Transpose('{node.input[0]}'), the embedding table read by a Gather: a tied head, "
                "stored once; kept as it is")
    if node is not None and node.op_type == "DequantizeLinear" and integer_constant(node.input[0]):
        kind = "DequantizeLinear"
    elif node is not None and node.op_type == "Mul" and any(
            cast_of_integers(a) and b in constants for a, b in (node.input, node.input[::-1])):
        kind = "Cast+Mul"
    else:
        return "both operands are computed at run time (no constant weight)"
    return (f"the weight is computed at run time from quantized constants ({kind}); the quantized weights "
            "listed by inspect say whether compress can dequantize it")


def _make_site(w_name, uses, constant, readers) -> tuple[Site | None, str]:
    g_index, const_node, tensor = constant
    dims = list(tensor.dims)
    if tensor.data_type not in FLOAT_TYPES:
        kind = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        return None, f"weight is {kind}, not floating point (quantised or integer weights are left alone)"
    if len(dims) != 2:
        return None, f"weight is {len(dims)}-D {dims}, not a 2-D matrix"
    if len({transposed for _, transposed in uses}) > 1:
        return None, "weight is used both transposed and not (Gemm transB differs between its uses)"
    use_nodes = {(use.graph_index, use.node_index) for use, _ in uses}
    others = [r for r in readers if r not in use_nodes]
    if others:
        return None, "weight is also read by other nodes or is a graph output, so its dense copy must stay"
    if any(use.op_type == "MatMul" and use.input == w_name for use, _ in uses):
        return None, "weight multiplies itself"
    transposed = uses[0][1]
    K, N = (dims[1], dims[0]) if transposed else (dims[0], dims[1])
    if K + N >= K * N:
        return None, f"[{K}x{N}] is too small: no rank r satisfies r(K+N) < KN, so factorising cannot pay"
    site = Site(
        weight=w_name,
        graph_index=g_index,
        constant_node=const_node,
        K=K,
        N=N,
        dtype=FLOAT_TYPES[tensor.data_type],
        transposed=transposed,
        uses=[use for use, _ in uses],
    )
    return site, ""


def is_selected(site: Site, include: str | None, exclude: str | None) -> bool:
    names = [site.weight] + [use.node_name for use in site.uses]
    if include and not any(re.search(include, n) for n in names):
        return False
    if exclude and any(re.search(exclude, n) for n in names):
        return False
    return True


def weight_matrix(model: onnx.ModelProto, site: Site) -> np.ndarray:
    """The weight as a float64 [K, N] array (transposed back when stored as [N, K])."""
    return weight_ref(model, site).load()


@dataclass(frozen=True)
class WeightRef:
    """Where a site's weight is: in memory (`values`) or at `offset` in an external data file (`path`).

    Small and picklable, so a worker process can read the weight itself (memory-mapped) instead of
    receiving a copy.
    """

    transposed: bool
    values: np.ndarray | None = None
    path: str | None = None
    offset: int = 0
    dtype: np.dtype = np.dtype(np.float32)
    shape: tuple = ()

    def load(self) -> np.ndarray:
        """float64 [K, N]."""
        if self.values is not None:
            raw = self.values
        elif 0 in self.shape:
            raw = np.zeros(self.shape)
        else:
            raw = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        values = np.array(raw, dtype=np.float64)
        del raw  # unmap before the caller works on the copy
        if values.ndim == 3:  # LSTM/GRU input weight [dirs, gates*hidden, input] -> [input, dirs*gates*hidden]
            return values.transpose(2, 0, 1).reshape(values.shape[2], -1)
        return values.T if self.transposed else values


def weight_ref(model: onnx.ModelProto, site: Site) -> WeightRef:
    """A WeightRef for the site: lazily loaded weights (modelio.load_model(lazy=True)) stay on disk."""
    from onnx import external_data_helper

    from onnx_fwlr.io.model import external_span, tensor_array

    graph = walk_graphs(model)[site.graph_index]
    if site.constant_node is None:
        tensor = next(t for t in graph.initializer if t.name == site.weight)
    else:
        node = graph.node[site.constant_node]
        tensor = next(a.t for a in node.attribute if a.name == "value")
    if external_data_helper.uses_external_data(tensor):
        path, offset, _ = external_span(model, tensor)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return WeightRef(site.transposed, path=str(path), offset=offset, dtype=dtype, shape=tuple(tensor.dims))
    return WeightRef(site.transposed, values=tensor_array(model, tensor))


# Element types counted as parameters: float weights, and the 8/4-bit integers quantised weights are stored in
# (so an original and a quantised model compare fairly). Index/shape tensors (int32/int64) are not parameters.
PARAMETER_TYPES = set(FLOAT_TYPES) | {
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
}


def model_parameters(model: onnx.ModelProto) -> int:
    """Number of weight elements: float and 8/4-bit integer constants (initializers, sparse initializers and
    Constant nodes, subgraphs included)."""
    total = 0
    for graph in walk_graphs(model):
        tensors = list(graph.initializer) + [sparse.values for sparse in graph.sparse_initializer]
        for node in graph.node:
            if node.op_type == "Constant":
                tensors += [a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR]
        total += sum(int(np.prod(t.dims, dtype=np.int64)) for t in tensors if t.data_type in PARAMETER_TYPES)
    return total


def validate_regex(pattern: str | None, option: str) -> None:
    """A bad regex is a user error, not a traceback."""
    from onnx_fwlr.errors import FwlrError

    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as exc:
        raise FwlrError(f"{option} '{pattern}' is not a valid regular expression ({exc}); fix the pattern.") from None


# Ops that carry a projection's output into attention scores unchanged in meaning (bias, scaling, head split).
_ATTENTION_PATH_OPS = {"Add", "Reshape", "Transpose", "Div", "Mul", "Cast", "Identity", "Squeeze", "Unsqueeze",
                       "Split", "Slice"}
_LAYOUT_OPS = {"Reshape", "Transpose", "Cast", "Identity", "Squeeze", "Unsqueeze"}


def attention_projections(model: onnx.ModelProto, sites: list[Site], depth: int = 6) -> set[str]:
    """Weights of Q/K/V and attention-output projections (main graph).

    Q/K/V: the site's output reaches a MatMul of two computed operands (the attention scores or context)
    through bias, scaling and head-reshaping ops. Output projection: the site's input comes from such a
    MatMul through reshapes and transposes only. These are the sites whose factorisation breaks ONNX
    Runtime's Attention fusion.
    """
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {
        n.output[0] for n in graph.node if n.op_type == "Constant"
    }
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def dynamic_matmul(node) -> bool:
        return node.op_type == "MatMul" and not any(i in constants for i in node.input)

    def feeds_attention(tensor: str) -> bool:
        frontier, seen = [tensor], set()
        for _ in range(depth):
            next_frontier = []
            for name in frontier:
                for node in readers.get(name, []):
                    if dynamic_matmul(node):
                        return True
                    if node.op_type in _ATTENTION_PATH_OPS and id(node) not in seen:
                        seen.add(id(node))
                        next_frontier.extend(node.output)
            frontier = next_frontier
        return False

    def fed_by_attention(tensor: str) -> bool:
        for _ in range(depth):
            node = producer.get(tensor)
            if node is None:
                return False
            if dynamic_matmul(node):
                return True
            if node.op_type not in _LAYOUT_OPS:
                return False
            tensor = node.input[0]
        return False

    found = set()
    for site in sites:
        for use in site.uses:
            if use.graph_index == 0 and (feeds_attention(use.output) or fed_by_attention(use.input)):
                found.add(site.weight)
    return found
