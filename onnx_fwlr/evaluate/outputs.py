"""Which outputs a comparison treats how: class scores (where top-1 agreement means something) and outputs
whose length depends on the input (compared over their common prefix, when asked)."""

from __future__ import annotations

import os

import numpy as np
import onnx

# Ops a class score passes through unchanged in meaning after the last linear layer.
_SCORE_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Softmax", "LogSoftmax", "Sigmoid"}
_AFFINE_OPS = {"Add", "Sub", "Mul", "Div"}  # a bias or a temperature: followed only with a constant operand
_LINEAR_OPS = {"MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "MatMulNBits", "Conv"}
_NOT_SCORES = ("embed", "hidden", "pool", "feature", "last_hidden")


def score_outputs(model) -> set[str] | None:
    """Outputs that are class scores: produced by a linear layer, through at most a bias, a temperature, a
    reshape or a softmax. A pooled or normalised embedding (ReduceMean, Div by a computed norm, Tanh) is
    not, and neither is an output named like one. None when the graph cannot be read (shape rules decide)."""
    graph = _graph(model)
    if graph is None:
        return None
    producers = {o: n for n in graph.node for o in n.output}
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    scores = set()
    for output in graph.output:
        if any(word in output.name.lower() for word in _NOT_SCORES):
            continue
        if _from_linear(output.name, producers, constants):
            scores.add(output.name)
    return scores


def _from_linear(name: str, producers: dict, constants: set, depth: int = 0) -> bool:
    node = producers.get(name)
    if node is None or depth > 8:
        return False
    if node.op_type in _LINEAR_OPS:
        return True
    if node.op_type in _SCORE_OPS:
        return _from_linear(node.input[0], producers, constants, depth + 1)
    if node.op_type in _AFFINE_OPS and len(node.input) == 2:
        computed = [i for i in node.input if i not in constants]
        return len(computed) == 1 and _from_linear(computed[0], producers, constants, depth + 1)
    return False


def _graph(model) -> onnx.GraphProto | None:
    if isinstance(model, onnx.ModelProto):
        return model.graph
    try:
        return onnx.load(os.fspath(model), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - unreadable here: the session reports it
        return None


def batch_axes(model, given: dict[str, int] | None = None) -> dict[str, int]:
    """Output name -> its sample axis, where it is not 0: the axis whose symbolic dimension has the name of the
    first input's axis 0 (the axis the data is split along; e.g. LSTM states [layers, batch, H] -> 1), and the
    `given` ones (`--batch-axis NAME:AXIS`) over those."""
    axes: dict[str, int] = {}
    graph = _graph(model)
    if graph is not None:
        constants = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in constants and i.type.tensor_type.shape.dim]
        batch = inputs[0].type.tensor_type.shape.dim[0].dim_param if inputs else ""
        for output in graph.output if batch else []:
            names = [d.dim_param for d in output.type.tensor_type.shape.dim]
            if names.count(batch) == 1 and names.index(batch) != 0:
                axes[output.name] = names.index(batch)
    axes.update(given or {})
    return axes


def common_prefix(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Both arrays cut to the sizes they share on every axis, whichever axis varies; None when their ranks
    differ, which no prefix can reconcile. A 1-D output whose length varies (generated audio) has no sample
    axis: it comes back as one sample, [1, length]."""
    if reference.ndim != candidate.ndim or reference.ndim == 0:
        return None
    shared = tuple(slice(0, min(a, b)) for a, b in zip(reference.shape, candidate.shape))
    if reference.ndim == 1:
        return reference[shared][None], candidate[shared][None]
    return reference[shared], candidate[shared]
