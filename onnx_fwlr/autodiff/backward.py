"""Reverse-mode differentiation of an ONNX graph: forward in ONNX Runtime, backward in numpy.

``GradientRunner`` finds the nodes between the tensors we differentiate with respect to (``wrt``:
graph inputs, intermediates or initializers) and one ``output``, exposes as extra ONNX Runtime
outputs only the tensors their VJP rules read (a ``Shape`` node stands in where a rule reads only a
shape), and walks those nodes backwards applying ``onnx_fwlr.vjp`` rules.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from onnx_fwlr.autodiff.vjp import NON_DIFFERENTIABLE, RULES, Needs, shape_only
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io import runtime
from onnx_fwlr.io.model import tensor_array
from onnx_fwlr.io.onnx_utils import DEFAULT_DOMAINS, FLOAT_TYPES, default_opset

_SHAPE_SUFFIX = "__fwlr_shape"
_PLACEHOLDER_BASE = np.zeros((), dtype=np.float32)


def _placeholder(value: np.ndarray) -> np.ndarray:
    """A zero-memory stand-in with the value's shape (a read-only broadcast of one shared zero)."""
    return np.broadcast_to(_PLACEHOLDER_BASE, value.shape)


@dataclass
class _Step:
    """One node on the differentiated path, with what its rule reads."""

    node: onnx.NodeProto
    attrs: dict
    wanted: frozenset          # input indices that need a cotangent
    active_outputs: tuple      # output indices that can receive a cotangent
    needs: Needs


def _attributes(node: onnx.NodeProto) -> dict:
    attrs = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            continue
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        attrs[a.name] = value
    return attrs


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a node's subgraphs (If/Loop/Scan bodies) read."""
    names: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            local = {i.name for i in g.input} | {i.name for i in g.initializer}
            for n in g.node:
                local |= set(n.output)
            for n in g.node:
                names |= {i for i in list(n.input) + sorted(_subgraph_inputs(n)) if i and i not in local}
            names |= {o.name for o in g.output if o.name not in local}
    return names


def _copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _casts_to_non_float(node: onnx.NodeProto) -> bool:
    """Cast to an integer or boolean type: the result carries no gradient (even when types are unknown)."""
    if node.op_type != "Cast":
        return False
    to = next((a.i for a in node.attribute if a.name == "to"), onnx.TensorProto.FLOAT)
    return to not in FLOAT_TYPES


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor that shape inference can type (best effort)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - typing is an optimisation, unknown types count as float
        inferred = model
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


class _Parked:
    """A forward value waiting in a temporary file (GradientRunner.park): its shape without its bytes."""

    def __init__(self, file, array: np.ndarray):
        self.file, self.offset, self.dtype, self.shape = file, file.tell(), array.dtype, array.shape
        file.write(memoryview(np.ascontiguousarray(array)).cast("B"))

    def load(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        self.file.seek(self.offset)
        if self.file.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise OSError("a parked forward value could not be read back from its temporary file")
        return out


class GradientRunner:
    """Forward pass in ONNX Runtime and reverse-mode gradients of ``output`` w.r.t. ``wrt`` tensors.

    ``forward(feed)`` returns the exposed tensors; ``backward(values, seed)`` returns the cotangent of
    every ``wrt`` tensor given the cotangent ``seed`` of ``output``. Gradients through ops without a rule
    raise ``FwlrError`` at construction; they never silently become zero. The ONNX Runtime session is
    created on the first ``forward`` (``session_options``: an ``onnxruntime.SessionOptions``, optional),
    so a runner also serves to differentiate values computed elsewhere (``exposed_model``, ``fetch_names``).

    ``side_wrt``: more tensors to differentiate, whose path's forward values the session does not expose: it
    stays the session of ``wrt`` alone (same fusions, same numbers), and what only their path reads comes
    from a small second session (autodiff.side_values).
    """

    def __init__(self, model: onnx.ModelProto, output: str, wrt: Sequence[str],
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 extra_outputs: Sequence[str] = (), session_options=None, side_wrt: Sequence[str] = ()):
        self.output = output
        self.session_options = session_options
        self.wrt = list(dict.fromkeys(wrt))
        self.providers = list(providers)
        self.opset = default_opset(model)
        graph = model.graph
        self._model_ref = model  # lazily loaded initializers are read through it (modelio.tensor_array)
        self._initializers = {t.name: t for t in graph.initializer}
        self._initializer_shapes = {t.name: tuple(t.dims) for t in graph.initializer}
        self._graph_inputs = [i.name for i in graph.input if i.name not in self._initializers]
        self._constant_cache: dict[str, np.ndarray] = {}
        self._types = _elem_types(model)
        known = set(self._initializers) | {i.name for i in graph.input}
        for n in graph.node:
            known |= set(n.output)
        missing = [name for name in [output, *self.wrt, *side_wrt, *extra_outputs] if name not in known]
        if missing:
            raise FwlrError(f"Tensors {missing} are not in the model graph; pass names of graph inputs, "
                            "initializers or node outputs.")
        not_float = [w for w in [output, *self.wrt, *side_wrt]
                     if self._types.get(w, onnx.TensorProto.FLOAT) not in FLOAT_TYPES]
        if not_float:
            raise FwlrError(f"Tensors {not_float} are not floating point, so they have no gradient; "
                            "differentiate with respect to float tensors (e.g. embeddings instead of token ids).")

        self._steps = self._plan(graph)
        self._values, self._shapes = self._exposure(list(extra_outputs))
        self._products = self._exact_products(graph)
        self._side = self._side_values(model, side_wrt, list(extra_outputs)) if side_wrt else None
        self._values = [name for name in self._values if name not in self._products]
        self._fetch = self._values + [name + _SHAPE_SUFFIX for name in self._shapes]
        self._extra_constants = [n for n in extra_outputs if n in self._initializers]
        self._session = None

    # ------------------------------------------------------------ planning

    def _active_tensors(self, graph, sources) -> tuple[set[str], list]:
        """Tensors that depend differentiably on ``sources``, and nodes that read them."""
        active = set(sources)
        touched = []
        for node in graph.node:
            reads = [i for i, name in enumerate(node.input) if name in active]
            implicit = bool(_subgraph_inputs(node) & active) if _has_subgraph(node) else False
            if not reads and not implicit:
                continue
            if node.domain in DEFAULT_DOMAINS and (node.op_type in NON_DIFFERENTIABLE or _casts_to_non_float(node)):
                continue
            rule = RULES.get(node.op_type) if node.domain in DEFAULT_DOMAINS else None
            if rule is not None and not implicit:
                diff = range(len(node.input)) if rule.diff_inputs is None else rule.diff_inputs
                reads = [i for i in reads if i in diff]
                if not reads:
                    continue
            for o in node.output:
                if o and self._types.get(o, onnx.TensorProto.FLOAT) in FLOAT_TYPES:
                    active.add(o)
            touched.append((node, frozenset(reads)))
        return active, touched

    def _plan(self, graph) -> list[_Step]:
        ancestors = {self.output}
        for node in reversed(graph.node):
            if any(o in ancestors for o in node.output):
                ancestors |= {i for i in node.input if i} | _subgraph_inputs(node)
        active, touched = self._active_tensors(graph, self.wrt)
        steps, unsupported = [], []
        for node, reads in touched:
            on_path = tuple(k for k, o in enumerate(node.output) if o in active and o in ancestors)
            if not on_path:
                continue
            rule = RULES.get(node.op_type) if node.domain in DEFAULT_DOMAINS else None
            handled = rule is not None and not _has_subgraph(node) and (
                rule.grad_outputs is None or set(on_path) <= set(rule.grad_outputs))
            if not handled:
                unsupported.append(node)
                continue
            attrs = _attributes(node)
            reason = rule.unsupported(attrs) if rule.unsupported is not None else None
            if reason is not None:
                raise FwlrError(f"Cannot differentiate {self.output!r} through {node.op_type} node "
                                f"{node.name or node.output[0]!r}: {reason}; use an activation-based method "
                                "(asvd or whiten) for this model.")
            needs = rule.needs(reads, len(node.input))
            steps.append(_Step(node, attrs, reads, on_path, needs))
        if unsupported:
            self._raise_unsupported(graph, unsupported)
        return steps

    def _raise_unsupported(self, graph, nodes):
        ops = sorted({(f"{n.domain}:" if n.domain not in DEFAULT_DOMAINS else "") + n.op_type for n in nodes})
        bad = {id(n) for n in nodes}
        affected = [w for w in self.wrt if any(id(n) in bad for n, _ in self._active_tensors(graph, [w])[1])]
        raise FwlrError(
            f"Cannot differentiate {self.output!r} with respect to {affected}: the path goes through "
            f"op types with no gradient rule ({', '.join(ops)}); use an activation-based method "
            "(asvd or whiten) for this model, or choose tensors whose path avoids these ops.")

    def _side_values(self, model, side_wrt: Sequence[str], extra: list[str]):
        """Plan the walk for ``wrt`` and ``side_wrt`` together while the session keeps ``wrt``'s exposure: the
        values and shapes only the side path reads come from autodiff.side_values (None when there are none)."""
        from onnx_fwlr.autodiff.side_values import SideValues

        self.wrt = list(dict.fromkeys([*self.wrt, *side_wrt]))
        self._steps = self._plan(model.graph)
        values, shapes = self._exposure(extra)
        side_values = [n for n in values if n not in self._values and n not in self._products]
        self._side_shapes = [n for n in shapes if n not in self._values and n not in self._shapes
                             and n not in side_values and n not in self._products]
        self._side_names = side_values
        targets = side_values + self._side_shapes
        if not targets:
            return None
        available = set(self._values) | set(self._products) | set(self._graph_inputs)
        return SideValues(model, targets, available, self._types)

    def _exposure(self, extra: list[str]) -> tuple[list[str], list[str]]:
        """Tensors the backward pass reads: those fetched whole, and those whose shape alone is fetched."""
        value_names = [self.output, *extra]
        shape_names = list(self.wrt)
        for step in self._steps:
            n_in = len(step.node.input)
            value_names += [step.node.input[i] for i in step.needs.inputs if i < n_in]
            shape_names += [step.node.input[i] for i in step.needs.input_shapes if i < n_in]
            value_names += [step.node.output[i] for i in step.needs.outputs]
        cheap = set(self._initializers) | set(self._graph_inputs)
        values = [n for n in dict.fromkeys(value_names) if n and n not in cheap]
        shapes = [n for n in dict.fromkeys(shape_names) if n and n not in cheap and n not in values]
        return values, shapes

    def _exact_products(self, graph) -> dict[str, tuple[str, str]]:
        """Exposed float32 Mul outputs whose factors are exposed too (or constants, or graph inputs), in graph
        order: name -> its two factors. They are not fetched from ONNX Runtime but multiplied in numpy when
        read, which gives the same bits (one IEEE float32 multiplication, as ORT's Mul) and keeps them out of
        ORT's run: a SwiGLU's silu(gate) and its product with up are 2 of a decoder layer's 5 FFN-wide values."""
        available = set(self._values) | set(self._initializers) | set(self._graph_inputs)
        products: dict[str, tuple[str, str]] = {}
        for node in graph.node:
            if node.op_type != "Mul" or node.domain not in DEFAULT_DOMAINS or len(node.input) != 2:
                continue
            name = node.output[0]
            if name in self._values and name != self.output and all(
                    n in available and self._types.get(n) == onnx.TensorProto.FLOAT for n in (*node.input, name)):
                products[name] = (node.input[0], node.input[1])
        return products

    def _with_factors(self, name: str) -> list[str]:
        """The name and, for an exact product, the values it is computed from (recursively)."""
        if name not in self._products:
            return [name]
        return [name] + [n for factor in self._products[name] for n in self._with_factors(factor)]

    @property
    def exposed_model(self) -> onnx.ModelProto:
        """A copy of the model whose outputs include every tensor the backward pass reads (made on each access
        and not kept: it is as large as the model, and the session needs it only while it is created)."""
        if self._model_ref is None:
            raise RuntimeError("the runner released its model (release_model); make a new runner to re-export it")
        exposed = onnx.ModelProto()
        exposed.CopyFrom(self._model_ref)
        graph = exposed.graph
        outputs = {o.name for o in graph.output}
        for name in self._values:
            if name not in outputs:
                graph.output.append(self._value_info(name))
        for name in self._shapes:
            shape_name = name + _SHAPE_SUFFIX
            graph.node.append(onnx.helper.make_node("Shape", [name], [shape_name], name=shape_name))
            graph.output.append(onnx.helper.make_tensor_value_info(shape_name, onnx.TensorProto.INT64, None))
        return exposed

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        elem = self._types.get(name)
        return onnx.helper.make_tensor_value_info(name, elem, None) if elem else onnx.ValueInfoProto(name=name)

    @property
    def fetch_names(self) -> list[str]:
        """Outputs of ``exposed_model`` that ``forward`` fetches (run it elsewhere, e.g. in float64)."""
        return list(self._fetch)

    def release_model(self) -> None:
        """Open the session now and keep only what backward reads: the constants its rules need, the
        initializers' shapes and copies of the differentiated nodes. A caller that made the model for this runner
        can then free it (a protobuf sub-message, a node or initializer, keeps its whole model alive)."""
        if self._session is None:
            self._session = self._make_session()
        needed = set(self._extra_constants)
        for step in self._steps:
            node = step.node
            needed.update(node.input[i] for i in step.needs.inputs if i < len(node.input))
            needed.update(node.output[i] for i in step.needs.outputs)
        for name in sorted(needed & set(self._initializers)):
            self._value({}, name, keep=True)  # cached as an independent array
        for step in self._steps:
            step.node = _copy_node(step.node)
            step.attrs = _attributes(step.node)
        self._initializers, self._model_ref = {}, None

    # ------------------------------------------------------------ running

    def _make_session(self):
        options = self.session_options
        if options is None:  # numpy runs between ORT calls: spinning ORT threads would steal its cores; the
            # Shape nodes appended by exposed_model run early, so the tensors they read are not kept to the end
            options = runtime.session_options(spinning=False, quiet=False, shapes_first=True)
        self._options = options  # the side session's too (side_wrt)
        return runtime.make_session(self.exposed_model, options, self.providers)

    def forward(self, feed: Mapping[str, np.ndarray], lazy: bool = False) -> dict[str, np.ndarray]:
        """Run the model; returns the exposed tensors (``output``, what backward reads, extras). ``lazy``:
        leave out the exact products (_exact_products), which backward and ``value`` compute when read."""
        if self._session is None:
            self._session = self._make_session()
        ort_feed = {k: v for k, v in feed.items() if k in self._graph_inputs}
        results = self._session.run(self._fetch, ort_feed)
        values = dict(ort_feed)
        values.update(zip(self._fetch, results))
        values.update((name, self._value({}, name)) for name in self._extra_constants)
        if self._side is not None:
            side = self._side.run(lambda name: feed[name] if name in feed else self.value(values, name),
                                  self._options, self.providers)
            values.update((name, side[name]) for name in self._side_names)
            values.update((name + _SHAPE_SUFFIX, np.asarray(side[name].shape, dtype=np.int64))
                          for name in self._side_shapes)
        if not lazy:
            for name in self._products:  # graph order: a product's factors come first
                values[name] = self._product(values, name)
        return values

    def value(self, values: dict, name: str) -> np.ndarray:
        """The forward value `name` from what ``forward`` returned (an exact product is computed now, and not
        kept in `values`)."""
        if name in self._products and name not in values:
            return self._product(values, name)
        return self._value(values, name)

    def value_bytes(self, values: dict) -> int:
        """Bytes of the forward values ``forward`` returns without ``lazy``, from what a lazy ``forward``
        returned (the exact products counted, float32, not computed)."""
        products = sum(4 * int(np.prod(self._shape(values, name))) for name in self._products if name not in values)
        return sum(np.asarray(v).nbytes for v in values.values()) + products

    def shape(self, values: dict, name: str) -> tuple:
        """The shape of the forward value `name` from what ``forward`` returned, without computing it."""
        return tuple(self._shape(values, name))

    def _product(self, values, name: str) -> np.ndarray:
        """An exact product from its factors; a factor that is a product itself is computed, not kept."""
        factors = [self._product(values, f) if f in self._products and f not in values else self._value(values, f)
                   for f in self._products[name]]
        return np.multiply(*factors)

    def _value(self, values, name: str, keep: bool = False) -> np.ndarray:
        if name in values:
            if isinstance(values[name], _Parked):  # read back for its first reader; consume frees it after its last
                values[name] = values[name].load()
            return values[name]
        if name in self._products:  # kept until consume frees it after its last reader
            values[name] = self._product(values, name)
            return values[name]
        if name in self._constant_cache:
            return self._constant_cache[name]
        if name in self._initializers:
            tensor = self._initializers[name]
            if uses_external_data(tensor) and not keep:
                # a lazily loaded weight is mapped for the step that reads it and unmapped after: ONNX Runtime holds
                # the model's weights already, and a mapping kept for every weight would count them all again
                return tensor_array(self._model_ref, tensor, copy=False)
            self._constant_cache[name] = tensor_array(self._model_ref, tensor, copy=False)
            return self._constant_cache[name]
        raise FwlrError(f"Tensor {name!r} is missing from the forward values; pass the dict that "
                        "GradientRunner.forward returned.")

    def _shape(self, values, name: str) -> tuple:
        if name in values:
            return values[name].shape
        if name + _SHAPE_SUFFIX in values:
            return tuple(int(d) for d in values[name + _SHAPE_SUFFIX])
        if name in self._initializer_shapes:
            return self._initializer_shapes[name]
        if name in self._products:
            return tuple(np.broadcast_shapes(*(self._shape(values, f) for f in self._products[name])))
        raise FwlrError(f"Shape of tensor {name!r} is missing from the forward values; pass the dict "
                        "that GradientRunner.forward returned.")

    def _rule_arrays(self, step: _Step, values):
        node = step.node
        ins = []
        for i, name in enumerate(node.input):
            if not name:
                ins.append(None)
            elif i in step.needs.inputs:
                ins.append(self._value(values, name))
            elif i in step.needs.input_shapes:
                ins.append(shape_only(self._shape(values, name)))
            else:
                ins.append(None)
        outs = [self._value(values, name) if k in step.needs.outputs else None
                for k, name in enumerate(node.output)]
        return ins, outs

    def backward(self, values: dict[str, np.ndarray], seed: np.ndarray, consume: bool = False,
                 emit=None) -> dict[str, np.ndarray]:
        """Cotangent of each ``wrt`` tensor, given ``seed`` = cotangent of ``output``.

        Cotangents of tensors read by several nodes are summed; each is freed once its producer is done.
        Computation happens in the seed's dtype where the rules allow (float64 seeds stay float64).

        Memory, for a caller that needs neither afterwards: ``consume`` removes each forward value from
        ``values`` once the last step that reads it is done (the walk starts at the output, so the values of
        the layers behind it go first); ``emit(name, cotangent)`` receives each ``wrt`` cotangent as soon as
        it is complete, and it is then neither kept nor returned. Values set aside by ``park`` are read back
        for their first reader. The numbers are the same either way.
        """
        seed = np.asarray(seed)
        expected = self._shape(values, self.output)
        if seed.shape != tuple(expected):
            raise FwlrError(f"The seed has shape {seed.shape} but {self.output!r} has shape {tuple(expected)}; "
                            "pass a cotangent shaped like the output.")
        keep = set(self.wrt) if emit is None else set()  # emitted ones go once their producer is done
        frees, emits, unread = self._release_plan()
        cot: dict[str, np.ndarray] = {self.output: seed}
        if emit is not None:
            for name in unread:  # complete from the start: the seed's, or nothing
                emit(name, self._final_cotangent(cot, values, name, seed.dtype, take=False))
        for position, step in enumerate(reversed(self._steps)):
            node = step.node
            grads = [cot.get(node.output[k]) if k in step.active_outputs else None
                     for k in range(len(node.output))]
            if any(g is not None for g in grads):
                ins, outs = self._rule_arrays(step, values)
                input_grads = RULES[node.op_type].vjp(ins, outs, step.attrs, grads, self.opset, step.wanted)
                del ins, outs
                for name in node.output:
                    if name not in keep:
                        cot.pop(name, None)
                for i in step.wanted:
                    g = input_grads[i]
                    if g is None:
                        continue
                    name = node.input[i]
                    cot[name] = cot[name] + g if name in cot else g
                del input_grads, grads
            if consume:
                for name in frees.get(position, ()):
                    if name not in keep:  # a wrt tensor's value gives the shape of its zero cotangent at the end
                        values.pop(name, None)
            if emit is not None:  # complete; its producer (next in the walk, if any) still reads it from `cot`
                for name in emits.get(position, ()):
                    emit(name, self._final_cotangent(cot, values, name, seed.dtype, take=False))
        if emit is not None:
            return {}
        return {w: self._final_cotangent(cot, values, w, seed.dtype) for w in self.wrt}

    def park(self, values: dict, resident: int):
        """Set aside in one temporary file the forward values in `values` that the backward walk reads after
        its first `resident` bytes of them (in the order it first reads them); `backward` reads each back for
        its first reader. For a caller that runs one walk with `consume`: the walk then holds the values of the
        steps near it instead of the whole forward pass's. Returns the file, to close after the walk (None when
        everything fits)."""
        first = self._first_reads()
        order = sorted((name for name, value in values.items() if name in first and isinstance(value, np.ndarray)
                        and value.base is not _PLACEHOLDER_BASE), key=lambda name: (first[name], name))
        held, file = 0, None
        for name in order:
            held += values[name].nbytes
            if held > resident:
                file = file or tempfile.TemporaryFile(prefix="onnx-fwlr-park-")
                values[name] = _Parked(file, values[name])
        return file

    def _first_reads(self) -> dict[str, int]:
        """Forward value -> the position (in the walk from the output back) of the first step that reads it."""
        if getattr(self, "_first", None) is None:
            first: dict[str, int] = {}
            for position, step in enumerate(reversed(self._steps)):
                node = step.node
                names = [node.input[i] for i in step.needs.inputs if i < len(node.input)]
                names += [node.output[k] for k in step.needs.outputs]
                for name in names:
                    for read in self._with_factors(name) if name else ():
                        first.setdefault(read, position)
            self._first = first
        return self._first

    def drop_unread(self, values: dict, keep: Sequence[str] = ()) -> None:
        """Replace the values in `values` that no backward step reads (extra outputs the caller has used, the
        seeded output once its seeds exist), but those named in `keep`, by zero-memory stand-ins of the same
        shape: backward reads only their shapes."""
        first = self._first_reads()
        for name, value in values.items():
            if name not in first and name not in keep and name not in self._graph_inputs \
                    and isinstance(value, np.ndarray) and not name.endswith(_SHAPE_SUFFIX):
                values[name] = _placeholder(value)

    def _final_cotangent(self, cot: dict, values, name: str, dtype, take: bool = True) -> np.ndarray:
        if name in cot:
            return np.ascontiguousarray(cot.pop(name) if take else cot[name])
        return np.zeros(self._shape(values, name), dtype=dtype)

    def _release_plan(self) -> tuple[dict, dict, list]:
        """For the walk from the output back (positions in reversed step order): the forward values read for
        the last time at each position, the ``wrt`` cotangents complete after each position (their last
        consumer is done), and the ``wrt`` tensors no step gives a cotangent to (complete, as zeros, at once)."""
        if getattr(self, "_release", None) is None:
            last_read, last_consumer = {}, {}
            for position, step in enumerate(reversed(self._steps)):
                node = step.node
                n_in = len(node.input)
                for i in (*step.needs.inputs, *step.needs.input_shapes):
                    if i < n_in and node.input[i]:
                        last_read.update((read, position) for read in self._with_factors(node.input[i]))
                for k in step.needs.outputs:
                    last_read.update((read, position) for read in self._with_factors(node.output[k]))
                for i in step.wanted:
                    last_consumer[node.input[i]] = position
            frees, emits = {}, {}
            for name, position in last_read.items():
                if name != self.output:  # the caller's (the loss was computed from it)
                    frees.setdefault(position, []).append(name)
            for name in self.wrt:
                if name in last_consumer:
                    emits.setdefault(last_consumer[name], []).append(name)
            self._release = (frees, emits, [w for w in self.wrt if w not in last_consumer])
        return self._release
