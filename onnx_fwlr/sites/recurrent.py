"""LSTM and GRU input weights as sites: X_t Wᵀ factored into a pre-projection of X.

An ONNX LSTM/GRU stores W [dirs, gates·hidden, input] and computes X_t W_dᵀ for every step t and
direction d. Stacking the directions gives one site in the usual [K, N] view:

    M = [W_0ᵀ | W_1ᵀ] [input, dirs·gates·hidden] ≈ P Q,   P [input, r],  Q [r, dirs·gates·hidden],

so X_t W_dᵀ ≈ (X_t P) Q_d: the graph gets `X' = MatMul(X, P)` and the recurrent op reads X' with
W := Q reshaped to [dirs, gates·hidden, r] (its input size becomes r). Both layouts work unchanged,
since MatMul acts on the last axis of X ([seq, batch, input] or [batch, seq, input]).

Only the input weight is factorised: the recurrent weight R multiplies the hidden state inside the op,
where no standard op can be inserted, so R stays dense. Kronecker and doped structures cannot feed the
op's input either (it only takes a dense W), so these sites take low-rank factors only.
A bias correction (E[x]ᵀ(M − P Q), per direction) is folded into the op's input bias Wb.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_fwlr.autodiff.recurrent_vjp import unsupported_reason
from onnx_fwlr.io.onnx_utils import FLOAT_TYPES, walk_graphs
from onnx_fwlr.sites.find import (
    Site,
    Skipped,
    WeightUse,
    constant_tensors,
    find_sites,
    is_selected,
    node_attribute,
    tensor_readers,
)

GATES = {"LSTM": 4, "GRU": 3}
_W_INPUT = 1  # W is the second input of both ops
_B_INPUT = 3  # B [dirs, 2·gates·hidden] = [Wb, Rb]


def is_recurrent(site: Site) -> bool:
    return site.uses[0].op_type in GATES


def directions(node: onnx.NodeProto) -> int:
    direction = node_attribute(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    return 2 if direction == "bidirectional" else 1


def find_recurrent_sites(
    model: onnx.ModelProto, include: str | None = None, exclude: str | None = None
) -> tuple[list[Site], list[Skipped]]:
    """Every LSTM/GRU (default domain) input weight that can be factorised, and the others with the reason.

    A site's uses have op_type "LSTM"/"GRU", input = X and output = the op's first named output; K is the
    input size and N = dirs·gates·hidden (the stacked view, `stacked_view`).
    """
    graphs = walk_graphs(model)
    constants = constant_tensors(graphs)
    readers = tensor_readers(graphs)
    candidates: dict[str, list[WeightUse]] = {}
    shapes: dict[str, set] = {}
    skipped: list[Skipped] = []
    for g_index, graph in enumerate(graphs):
        for n_index, node in enumerate(graph.node):
            if node.op_type not in GATES or node.domain not in ("", "ai.onnx"):
                continue
            label = node.name or next((o for o in node.output if o), node.op_type)
            x_name, w_name = node.input[0], node.input[_W_INPUT]
            if w_name not in constants:
                skipped.append(Skipped(label, node.op_type, None, "the input weight W is computed at run time"))
                continue
            if x_name in constants:
                skipped.append(Skipped(label, node.op_type, w_name, "the sequence input X is a constant"))
                continue
            if w_name in list(node.input)[_W_INPUT + 1:]:
                skipped.append(Skipped(label, node.op_type, w_name, "W is also another input of the same node"))
                continue
            use = WeightUse(graph_index=g_index, node_index=n_index, node_name=node.name, op_type=node.op_type,
                            input=x_name, output=next((o for o in node.output if o), label))
            candidates.setdefault(w_name, []).append(use)
            hidden = node_attribute(node, "hidden_size", None)
            shapes.setdefault(w_name, set()).add((node.op_type, directions(node), hidden))

    sites: list[Site] = []
    for w_name, uses in candidates.items():
        site, reason = _make_site(w_name, uses, shapes[w_name], constants[w_name], readers.get(w_name, []))
        first = uses[0]
        if site is None:
            skipped.append(Skipped(first.node_name or first.output, first.op_type, w_name, reason))
        elif not is_selected(site, include, exclude):
            skipped.append(Skipped(site.name, first.op_type, w_name, "excluded by `include`/`exclude`"))
        else:
            sites.append(site)
    return sites, skipped


def find_all_sites(model, include, exclude, fisher: bool):
    """MatMul/Gemm sites, then LSTM/GRU input weights.

    Under Fisher methods a recurrent site whose op has an attribute the gradient rule does not implement
    (clip, non-default activations, input_forget) is skipped with that reason.
    """
    sites, skipped = find_sites(model, include, exclude)
    recurrent, recurrent_skipped = find_recurrent_sites(model, include, exclude)
    if fisher:
        graphs = walk_graphs(model)
        kept = []
        for site in recurrent:
            reasons = [_gradient_refusal(graphs[u.graph_index].node[u.node_index]) for u in site.uses]
            reason = next((r for r in reasons if r), None)
            if reason is None:
                kept.append(site)
            else:
                recurrent_skipped.append(Skipped(site.name, site.uses[0].op_type, site.weight,
                                                 f"{reason}, so no Fisher statistics reach this input weight; "
                                                 "compress it with whiten or asvd"))
        recurrent = kept
    return sites + recurrent, skipped + recurrent_skipped


def _gradient_refusal(node: onnx.NodeProto) -> str | None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return unsupported_reason(node.op_type, attrs)


def _make_site(w_name, uses, shapes, constant, readers) -> tuple[Site | None, str]:
    g_index, const_node, tensor = constant
    dims = list(tensor.dims)
    if tensor.data_type not in FLOAT_TYPES:
        kind = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        return None, f"weight is {kind}, not floating point (quantised or integer weights are left alone)"
    if len(dims) != 3:
        return None, f"weight is {len(dims)}-D {dims}, not the [dirs, gates*hidden, input] of an LSTM/GRU"
    if len(shapes) > 1:
        return None, "weight is shared by recurrent nodes of different kinds, directions or hidden sizes"
    op_type, dirs, _hidden = next(iter(shapes))
    if dims[0] != dirs or dims[1] % GATES[op_type]:
        return None, f"weight shape {dims} does not match the {op_type}'s {dirs} direction(s)"
    use_nodes = {(use.graph_index, use.node_index) for use in uses}
    if any(r not in use_nodes for r in readers):
        return None, "weight is also read by other nodes or is a graph output, so its dense copy must stay"
    K, N = dims[2], dims[0] * dims[1]
    if K + N >= K * N:
        return None, f"[{K}x{N}] is too small: no rank r satisfies r(K+N) < KN, so factorising cannot pay"
    site = Site(weight=w_name, graph_index=g_index, constant_node=const_node, K=K, N=N,
                dtype=FLOAT_TYPES[tensor.data_type], transposed=False, uses=list(uses))
    return site, ""


def stacked_view(W: np.ndarray) -> np.ndarray:
    """[dirs, gates·hidden, input] -> [input, dirs·gates·hidden]: the site's [K, N] matrix.

    sites.weight_matrix returns this view for recurrent sites (any 3-D site weight).
    """
    return W.transpose(2, 0, 1).reshape(W.shape[2], -1)


def recurrent_layout(B: np.ndarray, dirs: int) -> np.ndarray:
    """[r, dirs·gates·hidden] -> [dirs, gates·hidden, r]: the second factor as the op's new W."""
    return np.ascontiguousarray(B.T.reshape(dirs, -1, B.shape[0]))


def recurrent_use_nodes(node: onnx.NodeProto, use: WeightUse, p_name: str, q_name: str, shift, dtype,
                        graph: onnx.GraphProto, namer) -> list[onnx.NodeProto]:
    """MatMul(X, P) feeding a copy of the recurrent node that reads W := Q; shift folds into Wb.

    shift [dirs·gates·hidden] is added to the Wb half of B (an Add node when B exists, so a computed or
    shared B keeps working; a new initializer when the node has none).
    """
    base = use.node_name or use.output
    projected = namer(f"{base}/input_projection_out")
    nodes = [helper.make_node("MatMul", [use.input, p_name], [projected], name=namer(f"{base}/input_projection"))]
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.input[0] = projected
    new.input[_W_INPUT] = q_name
    if shift is not None:
        dirs = directions(node)
        pad = np.zeros((dirs, 2 * shift.size // dirs))
        pad[:, : shift.size // dirs] = shift.reshape(dirs, -1)
        pad_name = namer(f"{base}/bias_correction")
        graph.initializer.append(numpy_helper.from_array(np.asarray(pad, dtype=dtype), pad_name))
        bias = node.input[_B_INPUT] if len(node.input) > _B_INPUT else ""
        if bias:
            corrected = namer(f"{base}/bias_corrected")
            add_name = namer(f"{base}/bias_correction_add")
            nodes.append(helper.make_node("Add", [bias, pad_name], [corrected], name=add_name))
            new.input[_B_INPUT] = corrected
        else:
            while len(new.input) <= _B_INPUT:
                new.input.append("")
            new.input[_B_INPUT] = pad_name
    nodes.append(new)
    return nodes
