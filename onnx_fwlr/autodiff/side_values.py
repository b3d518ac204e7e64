"""Forward values a backward pass reads that its main ONNX Runtime session does not expose, from a small second one.

Exposing a tensor changes what ONNX Runtime fuses, and so the bits of every value computed after it. A
GradientRunner asked for more cotangents than its main session's (`side_wrt`: --quantize's embedding lookups,
whose path runs through the first layer norm, which ONNX Runtime fuses when nothing inside it is exposed)
keeps that session exactly as it is without them, and computes the values only the extra path reads in a
second session over just the nodes that produce them, fed from the main session's values. Lookups of a
constant table are done in numpy (a copy of rows, the same numbers), so the second session never holds a
vocabulary-wide table.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_fwlr.io import runtime
from onnx_fwlr.io.model import tensor_array


class SideValues:
    """The main graph's nodes between `available` tensors and the `targets`, run in a session of their own
    (made on the first run, when the inputs' types are known from their values)."""

    def __init__(self, model: onnx.ModelProto, targets: list[str], available: set[str], types: dict):
        graph = model.graph
        producer = {o: node for node in graph.node for o in node.output if o}
        initializers = {t.name: t for t in graph.initializer}
        self.targets = list(targets)
        self.lookups: list[tuple[str, str, str, int]] = []  # (output, table, indices, axis) done in numpy
        chosen, inputs, stack, seen = set(), set(), list(self.targets), set()
        while stack:
            name = stack.pop()
            if not name or name in seen:
                continue
            seen.add(name)
            if name in available or (name not in producer and name not in initializers):
                inputs.add(name)
                continue
            if name not in producer:  # a constant the nodes read: copied into the side model
                continue
            node = producer[name]
            if _constant_lookup(node, initializers, available):
                self.lookups.append((node.output[0], node.input[0], node.input[1], _axis(node)))
                inputs.add(node.output[0])
                continue
            chosen.add(id(node))
            stack.extend(node.input)
        self._nodes = [_copy(node) for node in graph.node if id(node) in chosen]
        read = {name for node in self._nodes for name in node.input if name}
        self.inputs = sorted(inputs)
        self._computed = [name for name in self.targets if name not in inputs]  # by the side session
        self._constants = [numpy_helper.from_array(np.asarray(tensor_array(model, initializers[name])), name)
                           for name in sorted(read & set(initializers))]
        self._outputs = [onnx.helper.make_tensor_value_info(name, types[name], None) if types.get(name)
                         else onnx.ValueInfoProto(name=name) for name in self._computed]
        self._opsets, self._ir_version = list(model.opset_import), model.ir_version
        self._functions = list(model.functions)
        self._session = None

    def run(self, read, session_options, providers) -> dict[str, np.ndarray]:
        """The targets' values; `read(name)` gives a main-session value, a fed input or a constant. The
        session is made on the first run with the main session's options."""
        feed = {}
        for output, table, indices, axis in self.lookups:
            feed[output] = np.take(read(table), np.asarray(read(indices)).astype(np.int64), axis=axis)
        feed.update((name, read(name)) for name in self.inputs if name not in feed)
        values = {name: feed[name] for name in self.targets if name in feed}
        if self._computed:
            if self._session is None:
                self._session = runtime.make_session(self._side_model(feed), session_options, providers)
            wanted = {name for node in self._nodes for name in node.input}
            values.update(zip(self._computed, self._session.run(
                self._computed, {k: v for k, v in feed.items() if k in wanted})))
        return values

    def _side_model(self, feed: dict) -> onnx.ModelProto:
        wanted = {name for node in self._nodes for name in node.input}
        inputs = [onnx.helper.make_tensor_value_info(name, helper_type(feed[name]), None)
                  for name in self.inputs if name in wanted]
        graph = onnx.helper.make_graph(self._nodes, "side_values", inputs, self._outputs, self._constants)
        model = onnx.helper.make_model(graph, opset_imports=self._opsets, ir_version=self._ir_version)
        model.functions.extend(self._functions)
        return model


def helper_type(value) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _constant_lookup(node: onnx.NodeProto, initializers: dict, available: set[str]) -> bool:
    """A Gather of rows of a constant table by indices the main session gives (or the data feeds)."""
    return (node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.input) == 2
            and node.input[0] in initializers and node.input[1] in available)
