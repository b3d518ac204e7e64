"""Vector-Jacobian products of ONNX operators, in numpy.

Reverse-mode differentiation of an ONNX graph needs, for every op on the path from the tensors of
interest to the loss, the map from output cotangents to input cotangents. Each op has one rule::

    rule(inputs, outputs, attrs, grads, opset, wanted) -> list of input cotangents

``inputs``/``outputs`` hold the forward arrays the rule reads (see ``Rule.needs``); an input whose
shape alone is needed may be a zero-stride stand-in (``shape_only``), and anything not needed may be
None. ``grads`` holds one cotangent per output (None = zero). ``wanted`` is the set of input indices
whose cotangents the caller needs; the rule returns None for every other input. ``attrs`` holds plain
Python values (ints, floats, lists, str).

Pure numpy/scipy: no onnx import, so it can be tested and reused alone.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from onnx_fwlr.autodiff.recurrent_vjp import recurrent_vjp, unsupported_reason
from onnx_fwlr.autodiff.vjp_base import (  # noqa: F401 (re-exported: the rule frame)
    NON_DIFFERENTIABLE,
    Needs,
    Rule,
    all_inputs,
    each_wanted,
    optional_input,
    shape_only,
    static_needs,
    unbroadcast,
)
from onnx_fwlr.autodiff.vjp_shape import (
    _concat,
    _expand,
    _gather,
    _reshape_back,
    _scatter_elements,
    _scatter_nd,
    _scatter_reduction,
    _slice,
    _split,
    _transpose,
    _where,
)

# ---------------------------------------------------------------- linear algebra

def _matmul_needs(wanted, n):
    values = ((1,) if 0 in wanted else ()) + ((0,) if 1 in wanted else ())
    return Needs(tuple(sorted(values)), (0, 1))


def _matmul(ins, outs, attrs, grads, opset, wanted):
    a, b = ins
    g = grads[0]
    a_vec, b_vec = a.ndim == 1, b.ndim == 1
    a_shape2 = (1,) + a.shape if a_vec else a.shape
    b_shape2 = b.shape + (1,) if b_vec else b.shape
    if b_vec:  # restore the dimensions numpy/ONNX drop for 1-D operands
        g = g[..., None]
    if a_vec:
        g = g[..., None, :]
    ga = gb = None
    if 0 in wanted:
        b2 = b.reshape(b_shape2)
        if b2.ndim == 2:  # one large GEMM instead of a batched loop
            ga = (g.reshape(-1, g.shape[-1]) @ b2.T).reshape(g.shape[:-1] + (b2.shape[0],))
        else:
            ga = g @ np.swapaxes(b2, -1, -2)
        ga = unbroadcast(ga, a_shape2).reshape(a.shape)
    if 1 in wanted:
        a2 = a.reshape(a_shape2)
        if len(b_shape2) == 2 and a2.ndim >= 2:  # sum over batch inside the GEMM
            gb = a2.reshape(-1, a2.shape[-1]).T @ g.reshape(-1, g.shape[-1])
        else:
            gb = unbroadcast(np.swapaxes(a2, -1, -2) @ g, b_shape2)
        gb = gb.reshape(b.shape)
    return [ga, gb]


def _gemm_needs(wanted, n):
    values = ((1,) if 0 in wanted else ()) + ((0,) if 1 in wanted else ())
    return Needs(tuple(sorted(values)), tuple(range(n)))


def _gemm(ins, outs, attrs, grads, opset, wanted):
    a, b, c = ins[0], ins[1], optional_input(ins, 2)
    g = grads[0]
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    trans_a, trans_b = attrs.get("transA", 0), attrs.get("transB", 0)
    out = [None] * len(ins)
    if 0 in wanted:
        b_eff = b.T if trans_b else b
        ga = alpha * (g @ b_eff.T)
        out[0] = ga.T if trans_a else ga
    if 1 in wanted:
        a_eff = a.T if trans_a else a
        gb = alpha * (a_eff.T @ g)
        out[1] = gb.T if trans_b else gb
    if 2 in wanted and c is not None:
        out[2] = unbroadcast(beta * g, c.shape)
    return out


# ---------------------------------------------------------------- broadcasting arithmetic

def _add(ins, outs, attrs, grads, opset, wanted):
    return each_wanted(ins, wanted, lambda i: unbroadcast(grads[0], ins[i].shape))


def _sub(ins, outs, attrs, grads, opset, wanted):
    g = grads[0]
    return each_wanted(ins, wanted, lambda i: unbroadcast(g if i == 0 else -g, ins[i].shape))


def _mul_needs(wanted, n):
    values = ((1,) if 0 in wanted else ()) + ((0,) if 1 in wanted else ())
    return Needs(tuple(sorted(values)), (0, 1))


def _mul(ins, outs, attrs, grads, opset, wanted):
    a, b = ins
    g = grads[0]
    return [unbroadcast(g * b, a.shape) if 0 in wanted else None,
            unbroadcast(g * a, b.shape) if 1 in wanted else None]


def _div_needs(wanted, n):
    return Needs((0, 1) if 1 in wanted else (1,), (0, 1))


def _div(ins, outs, attrs, grads, opset, wanted):
    a, b = ins
    g = grads[0]
    return [unbroadcast(g / b, a.shape) if 0 in wanted else None,
            unbroadcast(-g * a / (b * b), b.shape) if 1 in wanted else None]


def _pow_needs(wanted, n):
    return Needs((0, 1), (0, 1), (0,) if 1 in wanted else ())


def _pow(ins, outs, attrs, grads, opset, wanted):
    a, b = ins
    g = grads[0]
    ga = gb = None
    if 0 in wanted:
        ga = unbroadcast(g * b * np.power(a, b - 1), a.shape)
    if 1 in wanted:
        log_a = np.log(np.where(a > 0, a, 1))  # d/db a^b = a^b log a, taken as 0 where a <= 0
        gb = unbroadcast(g * outs[0] * log_a, b.shape)
    return [ga, gb]


def _sum(ins, outs, attrs, grads, opset, wanted):
    return each_wanted(ins, wanted, lambda i: unbroadcast(grads[0], ins[i].shape))


def _mean(ins, outs, attrs, grads, opset, wanted):
    n = len(ins)
    return each_wanted(ins, wanted, lambda i: unbroadcast(grads[0] / n, ins[i].shape))


def _extremum(ins, outs, attrs, grads, opset, wanted):
    """Max/Min: the cotangent goes to the winning inputs, split equally between ties."""
    y, g = outs[0], grads[0]
    masks = [np.broadcast_to(x == y, y.shape) for x in ins]
    count = np.sum(masks, axis=0)
    return each_wanted(ins, wanted, lambda i: unbroadcast(np.where(masks[i], g / count, 0), ins[i].shape))


# ---------------------------------------------------------------- elementwise

def _unary(derivative):
    """Rule for y = f(x) given derivative(x, y) -> dy/dx."""
    def rule(ins, outs, attrs, grads, opset, wanted):
        if 0 not in wanted:
            return [None] * len(ins)
        x = ins[0]
        y = outs[0] if outs else None
        return [grads[0] * derivative(x, y, attrs)] + [None] * (len(ins) - 1)
    return rule


def _gelu_derivative(x, y, attrs):
    if attrs.get("approximate", "none") == "tanh":
        c = math.sqrt(2.0 / math.pi)
        t = np.tanh(c * (x + 0.044715 * x ** 3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    return 0.5 * (1 + erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _leaky_relu_derivative(x, y, attrs):
    return np.where(x > 0, 1.0, attrs.get("alpha", 0.01)).astype(x.dtype)


def _pass_through(ins, outs, attrs, grads, opset, wanted):
    return [grads[0] if 0 in wanted else None] + [None] * (len(ins) - 1)


def _neg(ins, outs, attrs, grads, opset, wanted):
    return [-grads[0] if 0 in wanted else None]


def _clip(ins, outs, attrs, grads, opset, wanted):
    x, g = ins[0], grads[0]
    lo, hi = optional_input(ins, 1), optional_input(ins, 2)
    if opset < 11:
        lo, hi = attrs.get("min"), attrs.get("max")
    inside = np.ones(x.shape, dtype=bool)
    if lo is not None:
        inside &= x >= lo
    if hi is not None:
        inside &= x <= hi
    out = [None] * len(ins)
    if 0 in wanted:
        out[0] = np.where(inside, g, 0)
    if 1 in wanted and lo is not None:
        out[1] = np.asarray(np.where(x < lo, g, 0).sum(), dtype=g.dtype).reshape(np.shape(lo))
    if 2 in wanted and hi is not None:
        out[2] = np.asarray(np.where(x > hi, g, 0).sum(), dtype=g.dtype).reshape(np.shape(hi))
    return out


# ---------------------------------------------------------------- softmax family and normalisation

def _class_view(a: np.ndarray, attrs, opset):
    """The array and axis a (Log)Softmax normalises over; opset < 13 coerces the input to 2-D."""
    if opset >= 13:
        return a, attrs.get("axis", -1)
    axis = attrs.get("axis", 1) % a.ndim
    rows = int(np.prod(a.shape[:axis], dtype=np.int64))
    return a.reshape(rows, -1), 1


def _softmax(ins, outs, attrs, grads, opset, wanted):
    y, axis = _class_view(outs[0], attrs, opset)
    g, _ = _class_view(grads[0], attrs, opset)
    gx = y * (g - np.sum(g * y, axis=axis, keepdims=True))
    return [gx.reshape(outs[0].shape)]


def _log_softmax(ins, outs, attrs, grads, opset, wanted):
    y, axis = _class_view(outs[0], attrs, opset)
    g, _ = _class_view(grads[0], attrs, opset)
    gx = g - np.exp(y) * np.sum(g, axis=axis, keepdims=True)
    return [gx.reshape(outs[0].shape)]


def _layer_norm(ins, outs, attrs, grads, opset, wanted):
    """Single-output LayerNormalization; mean and 1/std are recomputed from X."""
    x, scale, bias = ins[0], ins[1], optional_input(ins, 2)
    g = grads[0]
    dtype = np.result_type(x.dtype, g.dtype, np.float32)
    axes = tuple(range(attrs.get("axis", -1) % x.ndim, x.ndim))
    x = x.astype(dtype, copy=False)
    xc = x - x.mean(axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt((xc * xc).mean(axis=axes, keepdims=True) + attrs.get("epsilon", 1e-5))
    xhat = xc * inv_std
    out = [None] * len(ins)
    if 2 in wanted and bias is not None:
        out[2] = unbroadcast(g, bias.shape)
    if 1 in wanted:
        out[1] = unbroadcast(g * xhat, scale.shape)
    if 0 in wanted:
        gh = g * scale
        out[0] = inv_std * (gh - gh.mean(axis=axes, keepdims=True)
                            - xhat * (gh * xhat).mean(axis=axes, keepdims=True))
    return out


def _rms_norm(ins, outs, attrs, grads, opset, wanted):
    """RMSNormalization (opset 23): y = x / √(mean(x²) + ε) · scale over the axes from ``axis`` on."""
    x, scale, g = ins[0], ins[1], grads[0]
    dtype = np.result_type(x.dtype, g.dtype, np.float32)
    axes = tuple(range(attrs.get("axis", -1) % x.ndim, x.ndim))
    x = x.astype(dtype, copy=False)
    inv_rms = 1.0 / np.sqrt((x * x).mean(axis=axes, keepdims=True) + attrs.get("epsilon", 1e-5))
    xhat = x * inv_rms
    out = [None] * len(ins)
    if 1 in wanted:
        out[1] = unbroadcast(g * xhat, scale.shape)
    if 0 in wanted:
        gh = g * scale
        out[0] = inv_rms * (gh - xhat * (gh * xhat).mean(axis=axes, keepdims=True))
    return out


def _trilu(ins, outs, attrs, grads, opset, wanted):
    """Trilu keeps a triangle of the last two axes: the cotangent keeps the same triangle."""
    k = int(np.ravel(ins[1])[0]) if optional_input(ins, 1) is not None else 0
    g = grads[0]
    return [np.triu(g, k) if attrs.get("upper", 1) else np.tril(g, k)] + [None] * (len(ins) - 1)


# ---------------------------------------------------------------- reductions

def _reduce_axes(ins, attrs, rank):
    """Normalised reduced axes, or None when the op is a no-op (empty axes + noop_with_empty_axes)."""
    axes_in = optional_input(ins, 1)
    axes = [int(a) for a in np.ravel(axes_in)] if axes_in is not None else list(attrs.get("axes") or [])
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return None
        return list(range(rank))
    return sorted(a % rank for a in axes)


def _reduce(mean: bool):
    def rule(ins, outs, attrs, grads, opset, wanted):
        x, g = ins[0], grads[0]
        axes = _reduce_axes(ins, attrs, x.ndim)
        if axes is None:
            return [g] + [None] * (len(ins) - 1)
        if not attrs.get("keepdims", 1):
            g = np.expand_dims(g, tuple(axes))
        if mean:
            g = g / int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
        return [np.broadcast_to(g, x.shape)] + [None] * (len(ins) - 1)
    return rule


def _reduce_squares(root: bool):
    """ReduceL2 (y = √Σx², dx = g·x/y, zero where y = 0) and ReduceSumSquare (y = Σx², dx = 2g·x)."""
    def rule(ins, outs, attrs, grads, opset, wanted):
        x, g = ins[0], grads[0]
        axes = _reduce_axes(ins, attrs, x.ndim)
        if axes is None:  # no-op: y = |x| for ReduceL2, x² for ReduceSumSquare
            return [g * (np.sign(x) if root else 2 * x)] + [None] * (len(ins) - 1)
        y = outs[0] if root else None
        if not attrs.get("keepdims", 1):
            g = np.expand_dims(g, tuple(axes))
            y = np.expand_dims(y, tuple(axes)) if root else None
        if root:
            safe = np.where(y > 0, y, 1)
            g = np.where(y > 0, g / safe, 0)
            return [g * x] + [None] * (len(ins) - 1)
        return [2 * g * x] + [None] * (len(ins) - 1)
    return rule


# ---------------------------------------------------------------- registry

def _d_sqrt(x, y, a): return 0.5 / y
def _d_reciprocal(x, y, a): return -(y * y)
def _d_exp(x, y, a): return y
def _d_log(x, y, a): return 1.0 / x
def _d_erf(x, y, a): return (2.0 / math.sqrt(math.pi)) * np.exp(-x * x)
def _d_tanh(x, y, a): return 1.0 - y * y
def _d_sigmoid(x, y, a): return y * (1.0 - y)
def _d_relu(x, y, a): return (y > 0).astype(y.dtype)
def _d_abs(x, y, a): return np.sign(x)
def _d_sin(x, y, a): return np.cos(x)
def _d_cos(x, y, a): return -np.sin(x)


_NEEDS_X = static_needs(inputs=(0,))
_NEEDS_Y = static_needs(outputs=(0,))
_NEEDS_SHAPE = static_needs(shapes=(0,))
_NOTHING = static_needs()

RULES: dict[str, Rule] = {
    "MatMul": Rule(_matmul, _matmul_needs, (0, 1)),
    "Gemm": Rule(_gemm, _gemm_needs, (0, 1, 2)),
    "Add": Rule(_add, static_needs(shapes=(0, 1)), (0, 1)),
    "Sub": Rule(_sub, static_needs(shapes=(0, 1)), (0, 1)),
    "Mul": Rule(_mul, _mul_needs, (0, 1)),
    "Div": Rule(_div, _div_needs, (0, 1)),
    "Pow": Rule(_pow, _pow_needs, (0, 1)),
    "Sum": Rule(_sum, all_inputs(), None),
    "Mean": Rule(_mean, all_inputs(), None),
    "Max": Rule(_extremum, all_inputs(values=True, outputs=(0,)), None),
    "Min": Rule(_extremum, all_inputs(values=True, outputs=(0,)), None),
    "Neg": Rule(_neg, _NOTHING),
    "Abs": Rule(_unary(_d_abs), _NEEDS_X),
    "Sqrt": Rule(_unary(_d_sqrt), _NEEDS_Y),
    "Reciprocal": Rule(_unary(_d_reciprocal), _NEEDS_Y),
    "Exp": Rule(_unary(_d_exp), _NEEDS_Y),
    "Log": Rule(_unary(_d_log), _NEEDS_X),
    "Erf": Rule(_unary(_d_erf), _NEEDS_X),
    "Tanh": Rule(_unary(_d_tanh), _NEEDS_Y),
    "Sigmoid": Rule(_unary(_d_sigmoid), _NEEDS_Y),
    "Relu": Rule(_unary(_d_relu), _NEEDS_Y),
    "LeakyRelu": Rule(_unary(_leaky_relu_derivative), _NEEDS_X),
    "Gelu": Rule(_unary(_gelu_derivative), _NEEDS_X),
    "Clip": Rule(_clip, all_inputs(values=True), (0, 1, 2)),
    "Softmax": Rule(_softmax, _NEEDS_Y),
    "LogSoftmax": Rule(_log_softmax, _NEEDS_Y),
    "LayerNormalization": Rule(_layer_norm, static_needs(inputs=(0, 1), shapes=(2,)), (0, 1, 2)),
    "RMSNormalization": Rule(_rms_norm, static_needs(inputs=(0, 1)), (0, 1)),
    "Sin": Rule(_unary(_d_sin), _NEEDS_X),
    "Cos": Rule(_unary(_d_cos), _NEEDS_X),
    "Trilu": Rule(_trilu, static_needs(inputs=(1,))),
    "ReduceSum": Rule(_reduce(mean=False), static_needs(inputs=(1,), shapes=(0,))),
    "ReduceMean": Rule(_reduce(mean=True), static_needs(inputs=(1,), shapes=(0,))),
    "ReduceL2": Rule(_reduce_squares(root=True), static_needs(inputs=(0, 1), outputs=(0,))),
    "ReduceSumSquare": Rule(_reduce_squares(root=False), static_needs(inputs=(0, 1))),
    "Reshape": Rule(_reshape_back, _NEEDS_SHAPE),
    "Flatten": Rule(_reshape_back, _NEEDS_SHAPE),
    "Squeeze": Rule(_reshape_back, _NEEDS_SHAPE),
    "Unsqueeze": Rule(_reshape_back, _NEEDS_SHAPE),
    "Transpose": Rule(_transpose, _NOTHING),
    "Expand": Rule(_expand, _NEEDS_SHAPE),
    "Concat": Rule(_concat, all_inputs(), None),
    "Split": Rule(_split, static_needs(inputs=(1,), shapes=(0,)), (0,), None),
    "Slice": Rule(_slice, static_needs(inputs=(1, 2, 3, 4), shapes=(0,))),
    "Gather": Rule(_gather, static_needs(inputs=(1,), shapes=(0,))),
    "ScatterND": Rule(_scatter_nd, static_needs(inputs=(1,), shapes=(0, 2)), (0, 2), (0,),
                      lambda attrs: _scatter_reduction("ScatterND", attrs)),
    "ScatterElements": Rule(_scatter_elements, static_needs(inputs=(1,), shapes=(0, 2)), (0, 2), (0,),
                            lambda attrs: _scatter_reduction("ScatterElements", attrs)),
    "Where": Rule(_where, static_needs(inputs=(0,), shapes=(1, 2)), (1, 2)),
    "Cast": Rule(_pass_through, _NOTHING),
    "CastLike": Rule(_pass_through, _NOTHING),
    "Identity": Rule(_pass_through, _NOTHING),
    "Dropout": Rule(_pass_through, _NOTHING),  # inference mode: identity; the mask output is boolean
    "LSTM": Rule(recurrent_vjp("LSTM"), all_inputs(values=True), (0, 1, 2, 3, 5, 6, 7), None,
                 lambda attrs: unsupported_reason("LSTM", attrs)),
    "GRU": Rule(recurrent_vjp("GRU"), all_inputs(values=True), (0, 1, 2, 3, 5), None,
                lambda attrs: unsupported_reason("GRU", attrs)),
}


def vjp(op_type: str, inputs, outputs, attrs: dict, grads, opset: int, wanted=None) -> list:
    """Input cotangents of one op (None for inputs not in ``wanted``; default: all differentiable)."""
    rule = RULES[op_type]
    if wanted is None:
        diff = range(len(inputs)) if rule.diff_inputs is None else rule.diff_inputs
        wanted = {i for i in diff if i < len(inputs) and inputs[i] is not None}
    return rule.vjp(list(inputs), list(outputs), attrs, list(grads), opset, frozenset(wanted))
