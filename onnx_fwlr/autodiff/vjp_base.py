"""The frame every VJP rule shares: what a rule is, what it needs from the forward pass, and the helpers for
broadcasting and optional inputs. Pure numpy (see vjp.py for the rule contract)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

# Ops whose outputs carry no gradient (constant, integer, boolean or piecewise-constant results).
NON_DIFFERENTIABLE = frozenset({
    "Constant", "ConstantOfShape", "Shape", "Size", "Range", "EyeLike", "NonZero",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
    "ArgMax", "ArgMin", "Floor", "Ceil", "Round", "Sign", "IsNaN", "IsInf",
    "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
})


class Needs(NamedTuple):
    """What a rule reads from the forward pass, by input/output index."""

    inputs: tuple[int, ...] = ()        # input values
    input_shapes: tuple[int, ...] = ()  # inputs whose shape alone is read
    outputs: tuple[int, ...] = ()       # output values


@dataclass(frozen=True)
class Rule:
    """One op's VJP and what it needs.

    ``needs(wanted, n_inputs)`` lets a caller expose only the tensors the rule will read.
    ``diff_inputs``: inputs that can carry a gradient (None = all). ``grad_outputs``: outputs whose
    cotangent the rule handles (None = all); a gradient through any other output is unsupported.
    ``unsupported(attrs)``: why the rule cannot handle a node with these attributes (None = it can), so a
    caller can refuse before running anything.
    """

    vjp: Callable
    needs: Callable[[frozenset, int], Needs]
    diff_inputs: tuple[int, ...] | None = (0,)
    grad_outputs: tuple[int, ...] | None = (0,)
    unsupported: Callable[[dict], str | None] | None = None


def shape_only(shape, dtype=np.float32) -> np.ndarray:
    """A zero-memory array with the given shape, for rules that read only a tensor's shape."""
    return np.broadcast_to(np.zeros((), dtype=dtype), tuple(int(d) for d in shape))


def unbroadcast(g: np.ndarray, shape) -> np.ndarray:
    """Sum a cotangent down to ``shape``: the adjoint of multidirectional broadcasting."""
    shape = tuple(shape)
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, (gd, d) in enumerate(zip(g.shape, shape)) if d == 1 and gd != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def static_needs(inputs=(), shapes=(), outputs=()):
    return lambda wanted, n: Needs(tuple(inputs), tuple(shapes), tuple(outputs))


def all_inputs(values=False, outputs=()):
    def needs(wanted, n):
        return Needs(tuple(range(n)) if values else (), tuple(range(n)), tuple(outputs))
    return needs


def each_wanted(ins, wanted, fn):
    """Apply fn(index) to each wanted input index; None elsewhere."""
    return [fn(i) if i in wanted else None for i in range(len(ins))]


def optional_input(ins, i):
    return ins[i] if len(ins) > i and ins[i] is not None else None
