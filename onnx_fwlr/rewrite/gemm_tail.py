"""What follows a replaced weight's product so the node's output stays the same: Gemm's alpha, its beta·C and a
bias-correction shift, for every rewrite (low rank, structured, quantized + correction).

    Gemm:   Y = alpha · op(X) W + beta · C    →   y = op(X) W'   then   [· alpha] [+ alpha · shift] [+ beta · C]
    MatMul: Y = X W                           →   y = X W'       then   [+ shift]

`tail_steps` lists those steps; each rewrite turns them into nodes named its own way. Given the model, a constant C
and the shift become one constant (beta · C + alpha · shift), one Add fewer; `folded_bias` is that constant,
which the low-rank rewrite gives its second Gemm as C.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnx_fwlr.io.model import tensor_array
from onnx_fwlr.sites.find import WeightUse


@dataclass
class TailStep:
    """y = op(y, operand): `operand` a tensor's name or a float64 constant to store in the site's dtype; `role`
    one of "alpha", "shift", "C"; `scale` (C only): beta, by which a computed C is multiplied first."""

    op: str
    operand: str | np.ndarray
    role: str
    scale: float | None = None


def initializer(graph: onnx.GraphProto, name: str | None) -> onnx.TensorProto | None:
    return next((t for t in graph.initializer if t.name == name), None) if name else None


def folded_bias(model: onnx.ModelProto, graph: onnx.GraphProto, use: WeightUse, shift: np.ndarray | None
                ) -> np.ndarray | None:
    """beta · C + alpha · shift in float64 (C = 0 when the Gemm has none); None when C is computed at run time."""
    if use.bias is None:
        value = 0.0
    else:
        constant = initializer(graph, use.bias)
        if constant is None:
            return None
        value = use.beta * tensor_array(model, constant).astype(np.float64)  # lazily loaded: read from its file
    return value + use.alpha * shift if shift is not None else value


def tail_steps(use: WeightUse, shift: np.ndarray | None, model: onnx.ModelProto | None = None,
               graph: onnx.GraphProto | None = None) -> list[TailStep]:
    """The steps after y = op(X) W' that give the original output (module docstring); `shift` is float64 or
    None. Given the model and the use's graph, a constant C is folded with the shift (and beta) into one
    constant. A Gemm with beta 0 ignores C."""
    if use.op_type != "Gemm":
        return [] if shift is None else [TailStep("Add", np.asarray(shift, dtype=np.float64), "shift")]
    steps = []
    if use.alpha != 1.0:
        steps.append(TailStep("Mul", np.asarray(use.alpha, dtype=np.float64), "alpha"))
    has_c = use.bias is not None and use.beta != 0.0
    if model is not None and has_c and (shift is not None or use.beta != 1.0):
        value = folded_bias(model, graph, use, shift)
        if value is not None:
            return steps + [TailStep("Add", np.asarray(value, dtype=np.float64), "C")]
    if shift is not None:
        steps.append(TailStep("Add", use.alpha * shift, "shift"))
    if has_c:
        steps.append(TailStep("Add", use.bias, "C", None if use.beta == 1.0 else use.beta))
    return steps
