"""Rewriting the graph: each factorised weight becomes two factor MatMuls, standard ops only.

Three kinds of replacement, chosen by what `apply_factors` is given for a site:
  - Factors(A, B) on a MatMul/Gemm: MatMul(X, A) → MatMul/Gemm(·, B) (the low-rank path);
  - Factors(A, B) on an LSTM/GRU input weight: MatMul(X, A) feeding the op with W := B (recurrent.py);
  - Structured (Kronecker sum or low rank, optionally doped) on a MatMul/Gemm: nodes from
    structured_graph computing X @ W', with the Gemm semantics around them (transA → Transpose,
    alpha → Mul, bias correction → Add, beta·C → Add).

The protobuf is edited in place (nodes replaced where they stand, so topological order holds), which keeps
every other field exactly as it was: inputs, outputs, opsets, metadata, value infos, doc strings.
(A graphsurgeon import/export round-trip drops metadata_props, doc_string and unused value_info.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.graph_edit import Namer, names_in, remove_tensors
from onnx_fwlr.io.model import tensor_array
from onnx_fwlr.io.onnx_utils import default_opset, walk_graphs
from onnx_fwlr.methods.structured import KronSum, LowRank, Structured
from onnx_fwlr.rewrite.gemm_tail import folded_bias, tail_steps
from onnx_fwlr.rewrite.structured import build_doped_kron, build_doped_low_rank, min_opset
from onnx_fwlr.sites.find import Site, WeightUse
from onnx_fwlr.sites.recurrent import directions, is_recurrent, recurrent_layout, recurrent_use_nodes


@dataclass
class Factors:
    """W ≈ A @ B for one site, plus an optional output shift (bias correction); float64, or already in the
    dtype the model stores them in."""

    A: np.ndarray  # [K, r]
    B: np.ndarray  # [r, N]
    shift: np.ndarray | None = None  # [N], added to X @ A @ B


def storage_dtype(site: Site):
    """The dtype the site's weight is stored in, which its factors keep."""
    if site.dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(site.dtype)


# Long: one pass over every graph and subgraph so each weight is rewritten once for all its uses.
def apply_factors(
    model: onnx.ModelProto, sites: list[Site], factors: dict[str, Factors | Structured], forms: dict | None = None
) -> onnx.ModelProto:
    """Replace every site in `factors` (keyed by weight name) in place; other sites are left dense.

    `forms` (weight name -> rewrite.structured.Form) picks how a Structured replacement is realised (default:
    Form(), by multiply-adds); every form computes the same product.

    A Structured replacement needs a newer default-domain opset than some models declare (16 with doping,
    10 without); the model is upgraded with ONNX's version converter only when that leaves every node
    reading and writing the same tensors, otherwise FwlrError says why.
    """
    chosen = [s for s in sites if s.weight in factors]
    _check_replacements(chosen, factors)
    needed = max((min_opset(factors[s.weight].nnz > 0) for s in chosen if isinstance(factors[s.weight], Structured)),
                 default=0)
    _ensure_opset(model, needed)
    graphs = walk_graphs(model)
    namer = Namer(names_in(graphs))
    opset = default_opset(model)
    replacements: dict[int, dict[int, list[onnx.NodeProto]]] = {}
    removals: dict[int, set[str]] = {}
    constant_nodes: dict[int, set[int]] = {}

    for site in sites:
        if site.weight not in factors:
            continue
        f = factors[site.weight]
        if isinstance(f, Structured) or is_recurrent(site):
            if isinstance(f, Structured):
                swaps = _structured_site(site, f, graphs, namer, (forms or {}).get(site.weight))
            else:
                swaps = _recurrent_site(site, f, graphs, namer)
            for (g_index, n_index), nodes in swaps.items():
                replacements.setdefault(g_index, {})[n_index] = nodes
            if site.constant_node is None:
                removals.setdefault(site.graph_index, set()).add(site.weight)
            else:
                constant_nodes.setdefault(site.graph_index, set()).add(site.constant_node)
            continue
        dtype = storage_dtype(site)
        owner = graphs[site.graph_index]
        a_name, b_name = namer(f"{site.weight}/factor_A"), namer(f"{site.weight}/factor_B")
        owner.initializer.append(numpy_helper.from_array(np.asarray(f.A, dtype=dtype), a_name))
        owner.initializer.append(numpy_helper.from_array(np.asarray(f.B, dtype=dtype), b_name))
        shift = None if f.shift is None or not np.any(f.shift) else np.asarray(f.shift, dtype=np.float64)
        for use in site.uses:
            nodes = _factor_nodes(model, use, a_name, b_name, shift, dtype, graphs[use.graph_index], namer, opset)
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
            _fold_bias_corrections(model, graph, {o.name for o in graph.output})
            _share_bias_corrections(graph)
        remove_tensors(graph, removals.get(g_index, set()))
    read = {name for g in graphs for n in g.node for name in n.input} | {o.name for g in graphs for o in g.output}
    for g_index, bias in {(u.graph_index, u.bias) for s in chosen for u in s.uses if u.bias}:
        if bias not in read:  # a Gemm bias replaced by its folded, corrected copy
            remove_tensors(graphs[g_index], {bias})
    return model


def _factor_nodes(model, use: WeightUse, a_name, b_name, shift, dtype, graph, namer, opset) -> list[onnx.NodeProto]:
    """X @ A then (·) @ B for one use; a Gemm keeps transA on the first op and C/alpha/beta on the second.

    A bias correction is folded into the Gemm's C when C is a constant (or absent), which keeps ONNX Runtime's
    Gemm+activation fusion; otherwise it becomes an Add after the second op (value alpha · shift, exact for
    Gemm too), which `_fold_bias_corrections` later merges into a following bias Add where it can.
    """
    base = use.node_name or use.output
    mid = namer(f"{base}/factor_A_out")
    if shift is not None and use.op_type == "Gemm":
        folded = _folded_gemm_bias(model, use, shift, dtype, graph, namer, base)
        if folded is not None:
            use = WeightUse(use.graph_index, use.node_index, use.node_name, use.op_type, use.input, use.output,
                            use.trans_a, use.alpha, 1.0, folded)
            shift = None
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


def _folded_gemm_bias(model, use: WeightUse, shift, dtype, graph, namer, base) -> str | None:
    """A new constant C' = beta·C + alpha·shift for the second Gemm (beta becomes 1); None when C is computed."""
    value = folded_bias(model, graph, use, shift)
    if value is None:
        return None
    name = namer(f"{base}/bias_corrected")
    graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    return name


BIAS_CORRECTION = re.compile(r"/bias_correction(_\d+)?$")  # the names this rewrite gives shifts and their Adds


def _fold_bias_corrections(model: onnx.ModelProto, graph: onnx.GraphProto, outputs: set[str]) -> None:
    """Merge `y = Add(z, shift)` into a following `Add(y, bias)` whose bias is a [N] constant read only there.

    PyTorch exports Linear as MatMul then Add(bias); folding keeps one Add, as in the original graph.
    """
    constants = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    drop, folded_shifts = set(), set()
    for node in graph.node:
        if node.op_type != "Add" or not BIAS_CORRECTION.search(node.name) or node.output[0] in outputs:
            continue
        following = readers.get(node.output[0], [])
        if len(following) != 1 or following[0].op_type != "Add":
            continue
        add = following[0]
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        shift, bias = constants.get(node.input[1]), constants.get(other)
        if bias is None or len(readers.get(other, [])) != 1 or len(readers.get(node.input[1], [])) != 1:
            continue
        shift_value, bias_value = tensor_array(model, shift), tensor_array(model, bias)  # bias may be on disk
        if bias_value.ndim != 1 or bias_value.shape != shift_value.shape:
            continue
        bias.CopyFrom(numpy_helper.from_array((bias_value + shift_value).astype(bias_value.dtype), bias.name))
        add.input[list(add.input).index(node.output[0])] = node.input[0]
        drop.add(node.name)
        folded_shifts.add(shift.name)
    for index in reversed([i for i, n in enumerate(graph.node) if n.name in drop]):
        del graph.node[index]
    remove_tensors(graph, folded_shifts)


def _share_bias_corrections(graph: onnx.GraphProto) -> None:
    """One constant for equal shifts: a weight used at many places (an unrolled recurrence's W_hh, once per
    step) got one shift per use, all equal (low-rank and structured rewrites alike); the Adds that are left
    read the first of them instead."""
    constants = {t.name: t for t in graph.initializer}
    first: dict[tuple, str] = {}
    dropped = set()
    for node in graph.node:
        if node.op_type != "Add" or not BIAS_CORRECTION.search(node.input[1]):
            continue
        shift = constants.get(node.input[1])
        if shift is None or not shift.raw_data:
            continue
        name = first.setdefault((shift.data_type, tuple(shift.dims), shift.raw_data), shift.name)
        if name != shift.name:
            node.input[1] = name
            dropped.add(shift.name)
    remove_tensors(graph, dropped)


def _check_replacements(sites: list[Site], factors: dict) -> None:
    for site in sites:
        f = factors[site.weight]
        if isinstance(f, Structured) and is_recurrent(site):
            raise FwlrError(
                f"{site.name}: an {site.uses[0].op_type} input weight can only take low-rank factors (the op reads a "
                "dense W); use a low-rank method for it, or `exclude` it."
            )
        if not isinstance(f, (Factors, Structured)):
            raise FwlrError(f"{site.name}: replacement of type {type(f).__name__} is not Factors or Structured.")


def _shift(f) -> np.ndarray | None:
    return None if f.shift is None or not np.any(f.shift) else np.asarray(f.shift, dtype=np.float64)


def _recurrent_site(site: Site, f: Factors, graphs, namer) -> dict[tuple[int, int], list[onnx.NodeProto]]:
    """P and Q stored once (Q in the op's [dirs, gates·hidden, r] layout); every use gets MatMul(X, P) → op."""
    dtype = storage_dtype(site)
    first = site.uses[0]
    dirs = directions(graphs[first.graph_index].node[first.node_index])
    p_name, q_name = namer(f"{site.weight}/factor_P"), namer(f"{site.weight}/factor_Q")
    owner = graphs[site.graph_index]
    owner.initializer.append(numpy_helper.from_array(np.asarray(f.A, dtype=dtype), p_name))
    owner.initializer.append(numpy_helper.from_array(np.asarray(recurrent_layout(f.B, dirs), dtype=dtype), q_name))
    shift = _shift(f)
    swaps = {}
    for use in site.uses:
        graph = graphs[use.graph_index]
        node = graph.node[use.node_index]
        swaps[(use.graph_index, use.node_index)] = recurrent_use_nodes(node, use, p_name, q_name, shift, dtype,
                                                                       graph, namer)
    return swaps


def _build_structure(rep: Structured, dtype, x: str, y: str, prefix: str, weight_prefix: str, form=None):
    coo = () if rep.nnz == 0 else (rep.doping.rows, rep.doping.cols, rep.doping.vals)
    if isinstance(rep.structure, KronSum):
        return build_doped_kron(x, y, prefix, rep.structure.A, rep.structure.B, *coo, float_dtype=dtype,
                                weight_prefix=weight_prefix, form=form)
    if isinstance(rep.structure, LowRank):
        return build_doped_low_rank(x, y, prefix, rep.structure.A, rep.structure.B, *coo, float_dtype=dtype,
                                    weight_prefix=weight_prefix, form=form)
    raise FwlrError(f"unknown structure {type(rep.structure).__name__}; expected KronSum or LowRank.")


def _structured_site(site: Site, rep: Structured, graphs, namer,
                     form=None) -> dict[tuple[int, int], list[onnx.NodeProto]]:
    """Structure initializers once in the owning graph; per use, uniquely named nodes computing the Gemm/MatMul."""
    dtype = storage_dtype(site)
    kind = "kron" if isinstance(rep.structure, KronSum) else "lowrank"

    def initializers(weight_prefix):
        return _build_structure(rep, dtype, "x", "y", "probe", weight_prefix, form)[1]

    weight_prefix = namer.free_prefix(f"{site.weight}/{kind}", lambda p: [t.name for t in initializers(p)])
    graphs[site.graph_index].initializer.extend(initializers(weight_prefix))
    shift = _shift(rep)
    swaps = {}
    for use in site.uses:

        def names_of(prefix, use=use):
            nodes, inits = _structured_use(use, prefix, weight_prefix, rep, dtype, shift, form)
            outputs = [o for n in nodes for o in n.output if o != use.output]
            return [n.name for n in nodes] + outputs + [t.name for t in inits]

        prefix = namer.free_prefix(f"{use.node_name or use.output}/{kind}", names_of)
        nodes, inits = _structured_use(use, prefix, weight_prefix, rep, dtype, shift, form)
        graphs[use.graph_index].initializer.extend(inits)
        swaps[(use.graph_index, use.node_index)] = nodes
    return swaps


STRUCTURED_ROLES = {"alpha": "alpha", "shift": "bias_correction", "C": "C"}  # gemm_tail's roles as named here


def _structured_use(use: WeightUse, prefix: str, weight_prefix: str, rep: Structured, dtype, shift, form=None):
    """Nodes (and per-use constants) computing the original node's output from its input.

    Gemm: Y = alpha·op(X)·W + beta·C becomes [Transpose(X)] → X W' → ·alpha → +alpha·shift → +beta·C.
    """
    nodes, inits = [], []
    x = use.input
    if use.trans_a:
        x = f"{prefix}/x_T"
        nodes.append(helper.make_node("Transpose", [use.input], [x], name=f"{prefix}/transpose_x", perm=[1, 0]))
    steps, scale_c = [], []  # (op, constant value or tensor name, role); beta · a computed C
    for step in tail_steps(use, shift):
        operand = step.operand if isinstance(step.operand, str) else np.asarray(step.operand, dtype=dtype)
        if step.scale is not None:
            inits.append(numpy_helper.from_array(np.asarray(step.scale, dtype=dtype), f"{prefix}/beta"))
            operand = f"{prefix}/beta_C"
            scale_c.append(helper.make_node("Mul", [use.bias, f"{prefix}/beta"], [operand], name=f"{prefix}/scale_C"))
        steps.append((step.op, operand, STRUCTURED_ROLES[step.role]))
    y = use.output if not steps else f"{prefix}/xW"
    nodes += _build_structure(rep, dtype, x, y, prefix, weight_prefix, form)[0] + scale_c
    for i, (op, operand, role) in enumerate(steps):
        if not isinstance(operand, str):
            inits.append(numpy_helper.from_array(operand, f"{prefix}/{role}"))
            operand = f"{prefix}/{role}"
        out = use.output if i == len(steps) - 1 else f"{prefix}/{role}_out"
        nodes.append(helper.make_node(op, [y, operand], [out], name=f"{prefix}/apply_{role}"))
        y = out
    return nodes, inits


def _node_layout(model: onnx.ModelProto) -> list:
    return [[(n.op_type, tuple(n.input), tuple(n.output)) for n in g.node] for g in walk_graphs(model)]


def _ensure_opset(model: onnx.ModelProto, needed: int) -> None:
    """Raise the default-domain opset to `needed` in place, when the version converter can do it safely."""
    current = default_opset(model)
    if current >= needed:
        return
    from onnx import version_converter

    why = f"the structured/doped rewrite needs opset {needed} (the model has {current})"
    try:
        converted = version_converter.convert_version(model, needed)
    except Exception as exc:  # noqa: BLE001 - the converter raises many types; the user needs one sentence
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FwlrError(
            f"{why} and ONNX's version converter failed on it ({first}); re-export the model at "
            f"opset {needed} or newer, or use a plain low-rank method."
        ) from None
    if _node_layout(converted) != _node_layout(model):
        raise FwlrError(
            f"{why}, and converting it would change its nodes; re-export the model at opset {needed} "
            "or newer, or use a plain low-rank method."
        )
    converted.ir_version = max(converted.ir_version, helper.find_min_ir_version_for(list(converted.opset_import)))
    model.CopyFrom(converted)


def _zero_c(graph, namer, base, opset, dtype) -> list[str]:
    """Gemm's C is optional from opset 11; older opsets get an explicit zero scalar."""
    if opset >= 11:
        return []
    name = namer(f"{base}/zero_bias")
    graph.initializer.append(numpy_helper.from_array(np.zeros([1], dtype=dtype), name))
    return [name]
