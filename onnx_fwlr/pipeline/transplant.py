"""The same factors in every graph that uses the weights: a decoder's with-past model, or its merged form.

A decoder is exported as several graphs that share their weights by name (optimum writes a no-cache
model, a with-past model and a merged model whose `If` branches read the weights as outer-scope
initializers). Calibration runs on the graph whose site inputs ONNX Runtime can expose (the no-cache
model); `apply_same_factors` then reads the factors the compressed model holds for each weight and applies
exactly those (same values, same names, the same output shift for bias correction) to another model,
checking first that the other model's weight is the same matrix. An LM head that the compression pointed at its
embedding table (sites.tied: a copy of the table, stored once) is pointed at the table in the other model too.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import tensor_array
from onnx_fwlr.rewrite.lowrank import Factors, apply_factors
from onnx_fwlr.sites.find import Site, find_sites, walk_graphs, weight_matrix
from onnx_fwlr.sites.tied import find_ties, retie


def _tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for g in walk_graphs(model) for t in g.initializer}


def _nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for g in walk_graphs(model) for n in g.node]


def _shift(original, compressed, site: Site, b_name: str, tensors, originals) -> np.ndarray | None:
    """The output shift the compressed model adds after the factor pair of the site's first use (None: none).

    Three forms (rewrite.lowrank): an Add named .../bias_correction after the second factor, a Gemm whose bias
    became a corrected copy (C' = βC + α·shift), or a shift folded into the following Add's constant bias.
    """
    nodes = _nodes(compressed)
    second = next(n for n in nodes if b_name in n.input)
    use = site.uses[0]
    if second.op_type == "Gemm" and len(second.input) > 2 and second.input[2] in tensors:
        corrected = tensor_array(compressed, tensors[second.input[2]]).astype(np.float64)
        base = use.beta * tensor_array(original, originals[use.bias]).astype(np.float64) if use.bias else 0.0
        return (corrected - base) / use.alpha
    after = [n for n in nodes if second.output[0] in n.input and n.op_type == "Add"]
    if len(after) != 1:
        return None
    other = next((i for i in after[0].input if i != second.output[0]), None)
    if other not in tensors:
        return None
    value = tensor_array(compressed, tensors[other]).astype(np.float64)
    if after[0].name.endswith("bias_correction") or "/bias_correction" in after[0].name:
        return value
    if other in originals:  # folded into the bias that follows: the shift is what changed
        shift = value - tensor_array(original, originals[other]).astype(np.float64)
        return shift if np.any(shift) else None
    return None


def retied_heads(original: onnx.ModelProto, compressed: onnx.ModelProto) -> list[str]:
    """The LM heads (weight names) of ``original`` that ``compressed`` reads as its embedding table, transposed
    (sites.tied.retie): the head's copy is gone, the table kept."""
    tensors = _tensors(compressed)
    sites, _ = find_sites(original)
    if all(site.weight in tensors or f"{site.weight}/factor_A" in tensors for site in sites):
        return []  # nothing went missing: no table comparison needed
    return sorted(tie.head for tie in find_ties(original, sites) if tie.head not in tensors and tie.table in tensors)


def read_factors(original: onnx.ModelProto, compressed: onnx.ModelProto) -> dict[str, Factors]:
    """weight name -> the Factors the compressed model holds for it (weights kept dense, and heads re-tied to
    their embedding table, are left out)."""
    tensors, originals = _tensors(compressed), _tensors(original)
    sites, _ = find_sites(original)
    heads = None
    factors = {}
    for site in sites:
        a_name, b_name = f"{site.weight}/factor_A", f"{site.weight}/factor_B"
        if a_name not in tensors or b_name not in tensors:
            if site.weight not in tensors:
                heads = retied_heads(original, compressed) if heads is None else heads
                if site.weight in heads:
                    continue
                raise FwlrError(f"weight '{site.weight}' was replaced by a structure other than a factor pair; "
                                "only low-rank factors can be applied to another model (compress it with a low-rank "
                                "method).")
            continue
        A = tensor_array(compressed, tensors[a_name])
        B = tensor_array(compressed, tensors[b_name])
        factors[site.weight] = Factors(A, B, _shift(original, compressed, site, b_name, tensors, originals))
    return factors


def apply_same_factors(target, original, compressed) -> tuple[onnx.ModelProto, list[str]]:
    """``target`` with every weight that ``compressed`` (made from ``original``) factorised replaced by the same
    factors.

    Models are ModelProtos or paths. Weights are matched by name and must hold the same values in both models;
    a target weight the compressed model did not factorise stays dense. Returns the new model and the weights
    replaced. The target may use a weight in several places, subgraphs included (a merged decoder's If branches):
    every use reads the one factor pair.
    """
    from onnx_fwlr.io.model import load_model

    original, compressed, target = (m if isinstance(m, onnx.ModelProto) else load_model(m)
                                    for m in (original, compressed, target))
    factors = read_factors(original, compressed)
    heads = retied_heads(original, compressed)
    target_sites, _ = find_sites(target)
    chosen = {weight: factors[weight] for weight in _same_weights(target, original, factors, "factors")}
    if not chosen:
        raise FwlrError("the target model shares no factorised weight (by name) with the compressed model; give the "
                        "models exported from the same checkpoint.")
    ties = [tie for tie in find_ties(target, target_sites) if tie.head in heads] if heads else []
    result = onnx.ModelProto()
    result.CopyFrom(target)
    apply_factors(result, target_sites, chosen)
    retie(result, ties)
    return result, sorted(chosen)


def apply_same_quantization(target, original, rewritten) -> tuple[onnx.ModelProto, list[str]]:
    """``target`` with the same quantized weights, corrections and tables that ``rewritten`` (the
    quant.graph.Rewrite that `--quantize` made ``original`` with) holds: each planned weight and table is matched by
    name and must hold the same values in the target, and the target is rewritten by the same code, so its
    integers (ONNX Runtime's quantizers are deterministic), factors and bias shifts are those of the compressed
    model. Returns the new model and the names replaced."""
    from onnx_fwlr.io.model import load_model
    from onnx_fwlr.quant.embedding import find_tables, table_array

    original, target = (m if isinstance(m, onnx.ModelProto) else load_model(m) for m in (original, target))
    weights = _same_weights(target, original, rewritten.plans, "quantized weights")
    target_tables = {t.name: t for t in find_tables(target, exclude={s.weight for s in find_sites(target)[0]})}
    source_tables = {t.name: t for t in find_tables(original, exclude={s.weight for s in find_sites(original)[0]})}
    tables = []
    for name in sorted(rewritten.tables):
        if name not in target_tables:
            continue
        if not np.array_equal(table_array(target, target_tables[name]), table_array(original, source_tables[name])):
            raise FwlrError(f"embedding table '{name}' differs between the target model and the original; export "
                            "both models from one checkpoint.")
        tables.append(name)
    if not weights and not tables:
        raise FwlrError("the target model shares no quantized weight (by name) with the compressed model; give the "
                        "models exported from the same checkpoint.")
    return rewritten.apply(target, weights, tables), weights + tables


def _same_weights(target: onnx.ModelProto, original: onnx.ModelProto, names, what: str) -> list[str]:
    """The weights among `names` (sorted) that `target` has too, each checked to hold the values it has in
    `original`: `what` (factors, quantized weights) made for one checkpoint fit only its weights."""
    target_sites = {site.weight: site for site in find_sites(target)[0]}
    source_sites = {site.weight: site for site in find_sites(original)[0]}
    shared = []
    for weight in sorted(names):
        site = target_sites.get(weight)
        if site is None:
            continue
        if not np.array_equal(weight_matrix(target, site), weight_matrix(original, source_sites[weight])):
            raise FwlrError(f"weight '{weight}' differs between the target model and the original; the same {what} "
                            "only fit the same weights (export both models from one checkpoint).")
        shared.append(weight)
    return shared
