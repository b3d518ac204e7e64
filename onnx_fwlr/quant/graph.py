"""The rewrite: each chosen site becomes a quantized main branch plus a low-rank correction branch.

    Y = X W [+ bias]   →   Y = MatMulNBits(X) + MatMul(MatMul(X, A), B) [+ bias]        (int4/int8 blocks)
                       →   Y = MatMulInteger path (quantize_dynamic) + MatMul(MatMul(X, A), B) [+ bias]
                       →   Y = MatMul(MatMul(X, A), B) [+ bias]                         (low rank alone)

With `merge`, the corrections of sites that read the same activation (q/k/v, gate/up) share their first factor:
one MatMul(X, [A_1 | ... | A_n]) then a Split into each site's X A_i, and each site's own B_i (the same numbers
as separate pairs up to float rounding; tools/bench_quant_kernels.py --merged times both).

The bias stays where it was: a MatMul's following Add(bias) is untouched (a mean-shift correction is added
into that bias constant when it is read only there), a Gemm's alpha, C and beta become Mul/Add after the sum.
Embedding tables become GatherBlockQuantized (4 bits, after ONNX's version converter lifts the model to
opset 21) or quantize_dynamic's int8 Gather. Every quantized tensor is made by ONNX Runtime's quantizers
(ortquant); dynamic int8 is one `quantize_dynamic` pass over exactly the chosen nodes at the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_fwlr.io.graph_edit import Namer, remove_tensors
from onnx_fwlr.io.model import tensor_array
from onnx_fwlr.io.onnx_utils import walk_graphs
from onnx_fwlr.quant import ortquant
from onnx_fwlr.quant.embedding import find_tables, table_array
from onnx_fwlr.quant.ortquant import Scheme
from onnx_fwlr.rewrite.gemm_tail import initializer, tail_steps
from onnx_fwlr.sites.find import Site, WeightUse, find_sites, weight_matrix


@dataclass
class SitePlan:
    """What one site becomes: a main branch stored in `scheme` (None: no main branch, the factors alone),
    an optional correction A [K, r] B [r, N], and an optional mean output shift [N]. The main branch stores
    W itself, or `quantized` when quantization and correction were alternated (W − A B)."""

    scheme: Scheme | None
    A: np.ndarray | None = None
    B: np.ndarray | None = None
    shift: np.ndarray | None = None
    quantized: np.ndarray | None = None  # the [K, N] matrix the main branch stores; None: W itself
    factor_dtype: str | None = None  # this site's factor storage when not the rewrite's (float32 factors that a
    # quantized input's own scheme then quantizes)
    outliers: np.ndarray | None = None  # dynamic int8 with outliers: the input channels computed in float (None:
    # the first `scheme.outliers` channels, as the latency model's one-site models time it)

    def main_matrix(self, model, site: Site) -> np.ndarray:
        return self.quantized if self.quantized is not None else weight_matrix(model, site)


@dataclass
class Rewrite:
    """What `rewrite` was given for one model: applied to another export of the same weights (a decoder's
    with-past or merged model, cli `--also`) it writes the same quantized weights, corrections and tables there."""

    plans: Mapping[str, SitePlan]  # weight -> plan (pipeline.quantized_store.StoredPlans on large models)
    tables: dict[str, Scheme]
    factor_dtype: str = "float32"
    merge: bool = False
    tied: dict[str, str] = field(default_factory=dict)  # table -> the head whose quantized numbers it reads

    def apply(self, model: onnx.ModelProto, weights: list[str] | None = None,
              tables: list[str] | None = None) -> onnx.ModelProto:
        """`model` rewritten with the plans of `weights` and the tables named (default: all of them); a tied
        table reads its head's numbers only where both are rewritten."""
        plans = self.plans if weights is None else {w: self.plans[w] for w in weights}
        chosen = self.tables if tables is None else {t: self.tables[t] for t in tables}
        tied = {t: head for t, head in self.tied.items() if t in chosen and head in plans}
        return rewrite(model, plans, chosen, self.factor_dtype, merge=self.merge, tied=tied)


def rewrite(model: onnx.ModelProto, plans: dict[str, SitePlan], tables: dict[str, Scheme],
            factor_dtype: str = "float32", merge: bool = False, tied: dict[str, str] | None = None) -> onnx.ModelProto:
    """A new model with every planned site (keyed by weight name) and table (keyed by initializer name)
    replaced; the input model is not modified. `factor_dtype` "float16" stores the correction factors in
    half precision behind a Cast to float32, which ONNX Runtime folds when it loads the model: half the
    bytes on disk, the same float32 kernels at run time. A float16 site (a half-precision export) keeps
    everything it adds in float16: MatMulNBits with float16 scales, factors stored and read as float16.
    `merge`: corrections of sites reading the same activation share one first-factor MatMul and a Split
    (module docstring). `tied` (table -> head weight, each a 4-bit table whose head, its transpose, is planned
    in the same scheme without alternation): the lookups read the head's MatMulNBits numbers themselves
    (_tied_table_swaps), so the pair stores one 4-bit copy."""
    tied = tied or {}
    if any(s.kind == "nbits" and name not in tied for name, s in tables.items()):
        model = ortquant.upgrade_for_int4(model)  # may add nodes: sites are found again below
    else:
        model = _copy(model)
    sites = {s.weight: s for s in find_sites(model)[0] if s.weight in plans}
    missing = sorted(set(plans) - set(sites))
    if missing:
        raise RuntimeError(f"planned sites {missing} are not MatMul/Gemm weights of the model")
    graphs = walk_graphs(model)
    namer = Namer.of_model(model)
    swaps: dict[tuple[int, int], list[onnx.NodeProto]] = {}
    casts: dict[int, list[onnx.NodeProto]] = {}  # per graph, Cast nodes of half-precision factors (placed first)
    dynamic: list[str] = []
    removed: dict[int, set[str]] = {}
    groups = merge_groups(sites, plans) if merge else []
    shared: dict[str, tuple[str, str]] = {}  # weight -> (its X A_i from the merged Split, its B_i)
    for group in groups:
        shared.update(_merged_first_factor(model, [sites[w] for w in group], [plans[w] for w in group], graphs,
                                           namer, factor_dtype, casts, swaps))
    mains: dict[str, tuple] = {}  # weight -> its MatMulNBits tensor names and attributes (for tied tables)
    for weight, plan in plans.items():
        site = sites[weight]
        factors = shared.get(weight) or _factor_tensors(site, plan, graphs, namer, plan.factor_dtype or factor_dtype,
                                                        casts)
        for key, nodes in _site_swaps(model, site, plan, factors, graphs, namer, dynamic, casts, mains).items():
            swaps[key] = swaps.get(key, []) + nodes  # after a merged first factor placed at this node
        _mark_removed(site, removed, swaps)
    for name, scheme in tables.items():
        made = _tied_table_swaps(model, name, mains[tied[name]], namer) if name in tied else \
            _table_swaps(model, name, scheme, namer, dynamic)
        for key, nodes in made.items():
            swaps[key] = nodes
        if scheme.kind == "nbits":  # quantize_dynamic replaces an int8 table itself
            removed.setdefault(0, set()).add(name)
    for g_index, graph in enumerate(graphs):
        if g_index in casts or any(g == g_index for g, _ in swaps):
            nodes = casts.get(g_index, []) + [new for n_index, node in enumerate(graph.node)
                                               for new in swaps.get((g_index, n_index), [node])]
            del graph.node[:]
            graph.node.extend(nodes)
        remove_tensors(graph, removed.get(g_index, set()))
    _remove_unread_biases(graphs, [u for w in plans for u in sites[w].uses if u.bias])
    if any(n.domain == ortquant.MS_DOMAIN for g in graphs for n in g.node):
        ortquant.ensure_ms_domain(model)
    if dynamic:
        model = ortquant.quantize_dynamic_nodes(model, dynamic)
    return model


def site_dtype(site: Site):
    """The numpy storage type of a site's weight: float16 for a half-precision export, else float32."""
    return np.float16 if site.dtype == "float16" else np.float32


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _mark_removed(site: Site, removed: dict[int, set[str]], swaps: dict) -> None:
    """The dense weight goes: an initializer is dropped, a Constant node swapped for nothing."""
    if site.constant_node is None:
        removed.setdefault(site.graph_index, set()).add(site.weight)
    else:
        swaps[(site.graph_index, site.constant_node)] = []


def _balanced(plan: SitePlan, factor_dtype: str, half: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A, B in float64; for float16 storage balanced first (A·c, B/c with equal largest entries) so neither
    leaves half precision's range."""
    A, B = np.asarray(plan.A, dtype=np.float64), np.asarray(plan.B, dtype=np.float64)
    if factor_dtype == "float32" and not half:
        return A, B
    largest_a, largest_b = np.abs(A).max(), np.abs(B).max()
    if largest_a > 0 and largest_b > 0:
        balance = np.sqrt(largest_b / largest_a)
        A, B = A * balance, B / balance
    return A, B


def _stored_factor(M: np.ndarray, name: str, graph_index: int, graphs, namer, factor_dtype: str, casts: dict,
                   half: bool = False) -> str:
    """Store one factor (float32, or float16 behind a Cast placed first in its graph; a float16 site reads it
    as stored, without a Cast); the name it is read by."""
    owner = graphs[graph_index]
    if half:
        owner.initializer.append(numpy_helper.from_array(M.astype(np.float16), name))
        return name
    if factor_dtype == "float32":
        owner.initializer.append(numpy_helper.from_array(M.astype(np.float32), name))
        return name
    stored = namer(f"{name}_fp16")
    owner.initializer.append(numpy_helper.from_array(M.astype(np.float16), stored))
    casts.setdefault(graph_index, []).append(
        helper.make_node("Cast", [stored], [name], name=namer(f"{name}/cast"), to=TensorProto.FLOAT))
    return name


def _factor_tensors(site: Site, plan: SitePlan, graphs, namer, factor_dtype: str, casts: dict):
    """The names the uses read A and B by (None without a correction)."""
    if plan.A is None:
        return None
    half = site_dtype(site) == np.float16
    A, B = _balanced(plan, factor_dtype, half)
    return tuple(_stored_factor(M, namer(f"{site.weight}/correction_{which}"), site.graph_index, graphs, namer,
                                factor_dtype, casts, half) for M, which in ((A, "A"), (B, "B")))


def merge_groups(sites: dict[str, Site], plans: dict[str, SitePlan]) -> list[list[str]]:
    """Weights whose corrections can share a first factor: sites with a correction and one use, in the graph
    that owns them, reading the same activation without a transpose; groups of two or more, in node order."""
    by_input: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for weight, plan in plans.items():
        site = sites[weight]
        if plan.A is None or plan.factor_dtype is not None or len(site.uses) != 1:
            continue  # a factor stored otherwise (quantized back with a quantized input's scheme) stays its own
        use = site.uses[0]
        if use.trans_a or use.graph_index != site.graph_index:
            continue
        by_input.setdefault((use.graph_index, use.input), []).append((use.node_index, weight))
    return [[w for _, w in sorted(members)] for _, members in sorted(by_input.items()) if len(members) > 1]


def _merged_first_factor(model, group: list[Site], plans: list[SitePlan], graphs, namer, factor_dtype: str,
                         casts: dict, swaps: dict) -> dict[str, tuple[str, str]]:
    """MatMul(X, [A_1 | ... | A_n]) and a Split into each site's X A_i, placed before the group's first use
    (every use reads X, so X exists there); per weight, (its X A_i, its B_i)."""
    first = group[0]
    use = first.uses[0]
    half = site_dtype(first) == np.float16
    balanced = [_balanced(p, factor_dtype, half) for p in plans]
    base = namer(f"{first.weight}/merged_correction")
    a_name = _stored_factor(np.concatenate([A for A, _ in balanced], axis=1), namer(f"{base}_A"),
                            first.graph_index, graphs, namer, factor_dtype, casts, half)
    joined = namer(f"{base}_xA")
    middles = [namer(f"{s.uses[0].node_name or s.uses[0].output}/correction_xA") for s in group]
    ranks = np.asarray([A.shape[1] for A, _ in balanced], dtype=np.int64)
    nodes = [helper.make_node("MatMul", [use.input, a_name], [joined], name=namer(f"{base}/A"))]
    if _default_opset(model) >= 13:
        sizes = _constant(graphs[first.graph_index], namer(f"{base}_sizes"), ranks)
        nodes.append(helper.make_node("Split", [joined, sizes], middles, name=namer(f"{base}/split"), axis=-1))
    else:
        nodes.append(helper.make_node("Split", [joined], middles, name=namer(f"{base}/split"), axis=-1,
                                      split=[int(r) for r in ranks]))
    swaps[(use.graph_index, use.node_index)] = nodes
    return {site.weight: (None, _stored_factor(B, namer(f"{site.weight}/correction_B"), site.graph_index, graphs,
                                               namer, factor_dtype, casts, half), middle)
            for site, (_, B), middle in zip(group, balanced, middles)}


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _site_swaps(model, site: Site, plan: SitePlan, factors, graphs, namer, dynamic: list[str], casts: dict,
                mains: dict | None = None) -> dict:
    """Main-branch initializers for the site (once, in the graph that owns the weight) and replacement nodes
    per use; `factors` names the correction's A and B (or None). A MatMulNBits main branch's tensor names and
    attributes go into `mains` under the weight."""
    owner = graphs[site.graph_index]
    main = None  # (op builder inputs, attributes) of the main branch
    if plan.scheme is not None and plan.scheme.kind == "nbits":
        matrix = np.ascontiguousarray(plan.main_matrix(model, site), dtype=site_dtype(site))  # the float64 read
        q = ortquant.quantize_matmul_weight(matrix, plan.scheme, site.weight, site_dtype(site))  # goes first
        del matrix
        renamed = [namer(t.name) for t in q.tensors]
        for tensor, name in zip(q.tensors, renamed):
            tensor.name = name
        owner.initializer.extend(q.tensors)
        main = ("MatMulNBits", renamed, {a.name: helper.get_attribute_value(a) for a in q.node.attribute})
        if mains is not None:
            mains[site.weight] = main[1:]
    elif plan.scheme is not None:
        name = namer(f"{site.weight}/int8")
        owner.initializer.append(numpy_helper.from_array(plan.main_matrix(model, site).astype(np.float32), name))
        main = ("MatMul", [name], {})
    if main is None and factors is None:
        raise RuntimeError(f"{site.name}: a plan needs a main branch, a correction, or both")
    outlier = _outlier_tensors(model, site, plan, graphs, namer, casts) if plan.scheme is not None \
        and plan.scheme.outliers else None
    swaps = {}
    for use in site.uses:
        graph = graphs[use.graph_index]
        swaps[(use.graph_index, use.node_index)] = _use_nodes(model, graph, use, main, factors, plan.shift, namer,
                                                              dynamic, site_dtype(site), outlier)
    return swaps


def _outlier_tensors(model, site: Site, plan: SitePlan, graphs, namer, casts) -> tuple[str, str, str]:
    """(keep mask [K], channel indices [k], their rows of W [k, N] in float16 behind a Cast): what a dynamic int8
    site with outlier channels reads (_use_nodes)."""
    channels = plan.outliers if plan.outliers is not None else np.arange(plan.scheme.outliers)
    channels = np.asarray(channels, dtype=np.int64)
    keep = np.ones(site.K, dtype=np.float32)
    keep[channels] = 0.0
    owner = graphs[site.graph_index]
    keep_name, index_name = namer(f"{site.weight}/outlier_keep"), namer(f"{site.weight}/outlier_channels")
    owner.initializer.extend([numpy_helper.from_array(keep, keep_name), numpy_helper.from_array(channels, index_name)])
    rows = np.asarray(weight_matrix(model, site), dtype=np.float64)[channels]
    rows_name = _stored_factor(rows, namer(f"{site.weight}/outlier_rows"), site.graph_index, graphs, namer,
                               "float16", casts)
    return keep_name, index_name, rows_name


def _use_nodes(model, graph, use: WeightUse, main, factors, shift, namer, dynamic: list[str], dtype,
               outlier=None) -> list:
    """Nodes computing the original node's output: [Transpose X] → main + correction → [·alpha] [+ C, shift].
    `outlier` (keep, channels, rows): the int8 main branch reads X with those channels zeroed, and
    Gather(X, channels) @ rows adds them back in float."""
    base = use.node_name or use.output
    nodes, parts = [], []
    x = use.input
    if use.trans_a:
        x = namer(f"{base}/x_T")
        nodes.append(helper.make_node("Transpose", [use.input], [x], name=namer(f"{base}/transpose_x"), perm=[1, 0]))
    if main is not None:
        op, tensors, attrs = main
        out = namer(f"{base}/main")
        node_name = namer(f"{base}/{'int8' if op == 'MatMul' else 'nbits'}")
        domain = ortquant.MS_DOMAIN if op == "MatMulNBits" else ""
        x_main = x
        if outlier is not None:
            x_main = namer(f"{base}/x_kept")
            nodes.append(helper.make_node("Mul", [x, outlier[0]], [x_main], name=namer(f"{base}/outlier_keep")))
        nodes.append(helper.make_node(op, [x_main] + tensors, [out], name=node_name, domain=domain, **attrs))
        if op == "MatMul":
            dynamic.append(node_name)
        parts.append(out)
    if outlier is not None:
        picked, out = namer(f"{base}/x_outliers"), namer(f"{base}/outliers")
        nodes.append(helper.make_node("Gather", [x, outlier[1]], [picked], name=namer(f"{base}/outlier_gather"),
                                      axis=-1))
        nodes.append(helper.make_node("MatMul", [picked, outlier[2]], [out], name=namer(f"{base}/outlier_rows")))
        parts.append(out)
    if factors is not None:
        out = namer(f"{base}/correction")
        if len(factors) == 3:  # (None, B, X A from a merged first factor)
            middle = factors[2]
        else:
            middle = namer(f"{base}/correction_xA")
            nodes.append(helper.make_node("MatMul", [x, factors[0]], [middle], name=namer(f"{base}/correction_A")))
        nodes.append(helper.make_node("MatMul", [middle, factors[1]], [out], name=namer(f"{base}/correction_B")))
        parts.append(out)
    terms = _tail_terms(model, graph, use, shift, namer, nodes, dtype)
    y = parts[0]
    steps = [("Add", part, "sum") for part in parts[1:]] + terms
    for i, (op, operand, role) in enumerate(steps):
        out = use.output if i == len(steps) - 1 else namer(f"{base}/{role}_out")
        nodes.append(helper.make_node(op, [y, operand], [out], name=namer(f"{base}/{role}")))
        y = out
    if not steps:
        nodes[-1].output[0] = use.output
    return nodes


TAIL_ROLES = {"alpha": "alpha", "shift": "shift", "C": "bias"}  # rewrite.gemm_tail's roles as named here


def _tail_terms(model, graph, use: WeightUse, shift, namer, prefix: list, dtype=np.float32
                ) -> list[tuple[str, str, str]]:
    """(op, operand, role) after X W' (rewrite.gemm_tail: a Gemm's alpha and beta·C, the shift folded into a
    constant C), or a MatMul's shift (added into the bias constant of the Add that alone reads the output, when
    there is one). Nodes the terms need first (beta · a computed C) are appended to `prefix`. Constants are of
    the site's `dtype`."""
    base = use.node_name or use.output
    shift = None if shift is None or not np.any(shift) else np.asarray(shift, dtype=np.float64)
    if use.op_type != "Gemm" and shift is not None and _fold_into_following_bias(model, graph, use.output, shift):
        return []
    terms = []
    for step in tail_steps(use, shift, model, graph):
        role, operand = TAIL_ROLES[step.role], step.operand
        if not isinstance(operand, str):
            operand = _constant(graph, namer(f"{base}/{role}"), np.asarray(operand, dtype))
        elif step.scale is not None:  # a computed C, scaled by beta at run time
            operand = namer(f"{base}/beta_C")
            beta = _constant(graph, namer(f"{base}/beta"), np.asarray(step.scale, dtype))
            prefix.append(helper.make_node("Mul", [step.operand, beta], [operand], name=namer(f"{base}/scale_C")))
        terms.append((step.op, operand, role))
    return terms


def _fold_into_following_bias(model, graph, output: str, shift: np.ndarray) -> bool:
    """Add the shift into the [N] bias constant of the one Add reading `output`, if that constant is read
    nowhere else (PyTorch's MatMul + Add(bias)); False when there is no such Add."""
    readers = [n for n in graph.node if output in n.input]
    if len(readers) != 1 or readers[0].op_type != "Add":
        return False
    other = next((i for i in readers[0].input if i != output), None)
    bias = initializer(graph, other)
    if bias is None or sum(other in n.input for n in graph.node) != 1:
        return False
    value = tensor_array(model, bias)
    if value.shape != shift.shape:
        return False
    bias.CopyFrom(numpy_helper.from_array((value.astype(np.float64) + shift).astype(value.dtype), bias.name))
    return True


def _constant(graph, name: str, value) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _table_swaps(model, name: str, scheme: Scheme, namer, dynamic: list[str]) -> dict:
    """GatherBlockQuantized for every lookup of a 4-bit table; named Gathers for quantize_dynamic's int8."""
    table = next(t for t in find_tables(model) if t.name == name)
    graph = model.graph
    swaps = {}
    if scheme.kind == "dynamic":
        for index in table.nodes:
            node = graph.node[index]
            node.name = node.name or namer(f"{name}/gather")
            dynamic.append(node.name)
        return {}
    q = ortquant.quantize_table(table_array(model, table).astype(np.float32), scheme, name)
    renamed = [namer(t.name) for t in q.tensors]
    for tensor, new_name in zip(q.tensors, renamed):
        tensor.name = new_name
    graph.initializer.extend(q.tensors)
    attrs = {a.name: helper.get_attribute_value(a) for a in q.node.attribute}
    for index, ids in zip(table.nodes, table.ids):
        node = graph.node[index]
        inputs = [renamed[0], ids] + renamed[1:]
        swaps[(0, index)] = [helper.make_node("GatherBlockQuantized", inputs, list(node.output),
                                              name=namer(f"{node.name or name}/int4"), domain=ortquant.MS_DOMAIN,
                                              **attrs)]
    return swaps


def _tied_table_swaps(model, name: str, head, namer) -> dict:
    """Every lookup of table `name` [V, D] as GatherBlockQuantized over its head's MatMulNBits tensors (`head`:
    their names and attributes): B [V, D/b, b·bits/8] is the table's rows blocked along D (4 bits packed two per
    byte, or 8), so a Reshape to [V, D·bits/8] makes it GatherBlockQuantized's uint8 data, and the scales
    [V, D/b] and (packed) zero points are read as they are (ONNX Runtime folds the Reshape when it loads)."""
    table = next(t for t in find_tables(model) if t.name == name)
    names, attrs = head
    bits = attrs["bits"]
    if bits not in (4, 8) or attrs["N"] != table.V or attrs["K"] != table.D or table.D % attrs["block_size"]:
        raise RuntimeError(f"table {name} cannot read its head's numbers ({attrs})")
    graph = model.graph
    shape = _constant(graph, namer(f"{name}/tied_shape"), np.asarray([table.V, table.D * bits // 8], dtype=np.int64))
    data = namer(f"{name}/tied_data")
    swaps = {}
    for position, (index, ids) in enumerate(zip(table.nodes, table.ids)):
        node = graph.node[index]
        nodes = [helper.make_node("Reshape", [names[0], shape], [data], name=namer(f"{name}/tied_reshape"))] \
            if position == 0 else []
        nodes.append(helper.make_node("GatherBlockQuantized", [data, ids] + list(names[1:]), list(node.output),
                                      name=namer(f"{node.name or name}/int{bits}"), domain=ortquant.MS_DOMAIN,
                                      bits=bits, block_size=attrs["block_size"], gather_axis=0, quantize_axis=1))
        swaps[(0, index)] = nodes
    return swaps


def _remove_unread_biases(graphs, uses: list[WeightUse]) -> None:
    """A Gemm's constant C replaced by its scaled or shifted copy is read by nothing now: drop it."""
    read = {name for g in graphs for n in g.node for name in n.input} | {o.name for g in graphs for o in g.output}
    for use in uses:
        if use.bias not in read:
            remove_tensors(graphs[use.graph_index], {use.bias})
