"""Every VJP rule against central finite differences of the ONNX op itself, in float64.

The forward function is the op as ONNX defines it (onnx.reference, or ONNX Runtime where the
reference evaluator gets the semantics wrong: opset < 13 Softmax coercion), never our own code.
The rule only receives what its ``needs`` declares, so missing declarations fail here too.
"""

import numpy as np
import pytest
from gradcheck import INT64_MAX, RNG, away_from_zero, build, check, ints, make_forward, rand
from onnx import TensorProto
from onnx.reference.ops import op_erf
from scipy.special import erf

from onnx_fwlr.autodiff.vjp import NON_DIFFERENTIABLE, RULES, unbroadcast


@pytest.fixture(autouse=True)
def exact_erf(monkeypatch):
    """onnx.reference evaluates Erf in float32 (math.erf with otypes='f'), also inside the Gelu function
    body; finite differences at 1e-6 need float64."""
    monkeypatch.setattr(op_erf.Erf, "_run", lambda self, x: (erf(x).astype(x.dtype),))


# ---------------------------------------------------------------- linear algebra

@pytest.mark.parametrize("a_shape,b_shape", [
    ((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((4,), (2, 4, 5)), ((2, 3, 4), (4,)), ((4,), (4,)),
    ((2, 1, 3, 4), (5, 4, 2)), ((3, 4), (2, 4, 2)),
])
def test_matmul(a_shape, b_shape):
    check("MatMul", [rand(*a_shape), rand(*b_shape)])


@pytest.mark.parametrize("wanted", [[0], [1]])
def test_matmul_one_side(wanted):
    check("MatMul", [rand(2, 3, 4), rand(4, 5)], wanted=wanted)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (3, 5), (1, 1), (3, 1), ()])
def test_gemm(trans_a, trans_b, c_shape):
    a = rand(4, 3) if trans_a else rand(3, 4)
    b = rand(5, 4) if trans_b else rand(4, 5)
    args = [a, b] + ([] if c_shape is None else [rand(*c_shape)])
    check("Gemm", args, {"transA": trans_a, "transB": trans_b, "alpha": 0.7, "beta": -1.3}, opset=13)


# ---------------------------------------------------------------- broadcasting arithmetic

BROADCAST = [((2, 3, 4), (3, 1)), ((1, 4), (3, 1)), ((2, 3), ()), ((4,), (2, 3, 4))]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul"])
@pytest.mark.parametrize("a_shape,b_shape", BROADCAST)
def test_arithmetic(op, a_shape, b_shape):
    check(op, [rand(*a_shape), rand(*b_shape)])


@pytest.mark.parametrize("a_shape,b_shape", BROADCAST)
def test_div(a_shape, b_shape):
    check("Div", [rand(*a_shape), away_from_zero(*b_shape)])


@pytest.mark.parametrize("a_shape,b_shape", [((2, 3), (2, 3)), ((2, 3), (3,)), ((3,), ())])
def test_pow(a_shape, b_shape):
    check("Pow", [rand(*a_shape, low=0.3, high=2.0), rand(*b_shape, low=-2.0, high=2.5)])


@pytest.mark.parametrize("op", ["Sum", "Mean"])
def test_variadic_sum_mean(op):
    check(op, [rand(2, 3), rand(3), rand(1, 1)])


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_broadcast(op):
    check(op, [rand(2, 3), rand(3), rand(2, 1)])


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_ties_split_equally(op):
    a, b = rand(2, 3), rand(2, 3)
    b[0] = a[0]  # central differences at a tie give 1/2 to each input
    check(op, [a, b])


# ---------------------------------------------------------------- elementwise

@pytest.mark.parametrize("op,x", [
    ("Neg", rand(2, 3)), ("Exp", rand(2, 3)), ("Erf", rand(2, 3)), ("Tanh", rand(2, 3)),
    ("Sigmoid", rand(2, 3)), ("Sqrt", rand(2, 3, low=0.2, high=2.0)), ("Log", rand(2, 3, low=0.2, high=2.0)),
    ("Reciprocal", away_from_zero(2, 3)), ("Relu", away_from_zero(2, 3)), ("Abs", away_from_zero(2, 3)),
])
def test_unary(op, x):
    check(op, [x])


def test_leaky_relu():
    check("LeakyRelu", [away_from_zero(3, 4)], {"alpha": 0.2})


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    check("Gelu", [rand(3, 4, low=-3, high=3)], {"approximate": approximate}, opset=20)


def test_identity_cast_dropout():
    check("Identity", [rand(2, 3)])
    check("Cast", [rand(2, 3)], {"to": TensorProto.DOUBLE}, opset=13)
    check("Dropout", [rand(2, 3)], opset=13)
    check("CastLike", [rand(2, 3), rand(1)], opset=15, wanted=[0])  # the second input gives the type only


def test_clip_inputs():
    x = rand(3, 4)
    x[np.abs(x - 0.5) < 0.05] += 0.2  # keep away from the clip edges
    x[np.abs(x + 0.5) < 0.05] -= 0.2
    check("Clip", [x, np.array(-0.5), np.array(0.5)], opset=13)
    check("Clip", [x, None, np.array(0.5)], opset=13)


def test_clip_attributes():
    x = rand(3, 4)
    x[np.abs(np.abs(x) - 0.5) < 0.05] *= 1.3
    check("Clip", [x], {"min": -0.5, "max": 0.5}, opset=6)


# ---------------------------------------------------------------- softmax family, normalisation

@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset,attrs", [(13, {}), (13, {"axis": 1}), (13, {"axis": 0}),
                                         (11, {}), (11, {"axis": 1}), (11, {"axis": 2}), (11, {"axis": 0})])
def test_softmax_family(op, opset, attrs):
    # ONNX Runtime implements the opset < 13 2-D coercion; onnx.reference does not.
    check(op, [rand(2, 3, 4, low=-2, high=2)], attrs, opset=opset, engine="ort" if opset < 13 else "ref")


def test_legacy_softmax_differs_from_modern():
    """The two conventions are really different functions, so testing both means something."""
    x = rand(2, 3, 4)
    old = make_forward(build("Softmax", [x], {"axis": 1}, 11, 1), "ort")({"in0": x})[0]
    new = make_forward(build("Softmax", [x], {"axis": 1}, 13, 1), "ort")({"in0": x})[0]
    assert not np.allclose(old, new)


@pytest.mark.parametrize("axis,scale_shape", [(-1, (4,)), (1, (3, 4)), (2, (4,))])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm(axis, scale_shape, with_bias):
    x = rand(2, 3, 4)
    args = [x, rand(*scale_shape)] + ([rand(*scale_shape)] if with_bias else [])
    check("LayerNormalization", args, {"axis": axis, "epsilon": 1e-3})


# ---------------------------------------------------------------- reductions

@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceL2", "ReduceSumSquare"])
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes", [[1], [0, -1], None])
def test_reduce_axes_attribute(op, keepdims, axes):
    attrs = {"keepdims": keepdims} | ({} if axes is None else {"axes": axes})
    check(op, [rand(2, 3, 4)], attrs, opset=11)


@pytest.mark.parametrize("op,opset", [("ReduceMean", 18), ("ReduceSum", 13), ("ReduceL2", 18),
                                       ("ReduceSumSquare", 18)])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_axes_input(op, opset, keepdims):
    check(op, [rand(2, 3, 4), ints(-1, 0)], {"keepdims": keepdims}, opset=opset)
    check(op, [rand(2, 3, 4)], {"keepdims": keepdims}, opset=opset)  # no axes: reduce all


@pytest.mark.parametrize("op,opset", [("ReduceMean", 18), ("ReduceSum", 13)])
def test_reduce_noop_with_empty_axes(op, opset):
    check(op, [rand(2, 3), ints()], {"noop_with_empty_axes": 1}, opset=opset)
    check(op, [rand(2, 3), ints()], {"noop_with_empty_axes": 0}, opset=opset)


# ---------------------------------------------------------------- shape manipulation

def test_reshape_family():
    check("Reshape", [rand(2, 3, 4), ints(4, -1)], opset=14)
    check("Flatten", [rand(2, 3, 4)], {"axis": 2}, opset=13)
    check("Squeeze", [rand(2, 1, 3), ints(1)], opset=13)
    check("Unsqueeze", [rand(2, 3), ints(0, 3)], opset=13)
    check("Expand", [rand(3, 1), ints(2, 3, 4)], opset=13)


@pytest.mark.parametrize("perm", [None, [1, 2, 0], [0, 2, 1]])
def test_transpose(perm):
    check("Transpose", [rand(2, 3, 4)], {} if perm is None else {"perm": perm})


def test_concat():
    check("Concat", [rand(2, 1, 3), rand(2, 2, 3), rand(2, 4, 3)], {"axis": -2}, opset=13)


def test_split_input_and_attribute():
    check("Split", [rand(2, 6), ints(1, 2, 3)], {"axis": 1}, opset=13, n_out=3)
    check("Split", [rand(6, 2), None], {}, opset=13, n_out=2)
    check("Split", [rand(2, 6)], {"axis": 1, "split": [4, 2]}, opset=11, n_out=2)


def test_split_num_outputs_uneven_with_unused_output():
    check("Split", [rand(7, 2)], {"num_outputs": 3}, opset=18, n_out=3, drop_grads=(1,))


@pytest.mark.parametrize("starts,ends,axes,steps", [
    (ints(1, 0), ints(3, -1), ints(0, 2), None),
    (ints(-1), ints(-INT64_MAX), ints(1), ints(-2)),
    (ints(3, 10), ints(0, -100), ints(0, -1), ints(-1, 2)),
    (ints(0, 1, 0), ints(INT64_MAX, 3, 2), None, ints(2, 1, 1)),
])
def test_slice(starts, ends, axes, steps):
    args = [rand(4, 5, 3), starts, ends, axes, steps]
    while args[-1] is None:
        args.pop()
    check("Slice", args, opset=13)


def test_slice_attributes_opset9():
    check("Slice", [rand(4, 5)], {"starts": [1, -3], "ends": [3, 100], "axes": [0, 1]}, opset=9)


@pytest.mark.parametrize("axis,indices", [
    (0, np.array([[0, -1, 2], [2, 2, 0]], dtype=np.int64)),  # embedding lookup, repeats, negatives
    (1, np.array([1, 1, -4], dtype=np.int64)),
    (2, np.array(1, dtype=np.int64)),
    (-1, np.array([[2], [0]], dtype=np.int32)),
])
def test_gather(axis, indices):
    check("Gather", [rand(5, 4, 3), indices], {"axis": axis}, opset=13)


def test_where_broadcast():
    cond = RNG.random((2, 3, 4)) > 0.5
    check("Where", [cond, rand(3, 4), rand(2, 1, 4)], opset=16)


# ---------------------------------------------------------------- registry and helpers

def test_unbroadcast_sums_over_broadcast_axes():
    g = np.arange(24.0).reshape(2, 3, 4)
    assert np.allclose(unbroadcast(g, (3, 1)), g.sum(axis=(0, 2))[:, None])
    assert unbroadcast(g, ()).shape == ()


def test_registry_covers_the_brief():
    required = {"MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Sqrt", "Reciprocal", "Exp",
                "Log", "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Gelu", "Softmax", "LogSoftmax",
                "LayerNormalization", "ReduceMean", "ReduceSum", "Reshape", "Flatten", "Transpose",
                "Squeeze", "Unsqueeze", "Expand", "Concat", "Split", "Slice", "Gather", "Where", "Cast",
                "Identity", "Dropout", "Clip", "Max", "Min"}
    assert required <= set(RULES)
    assert {"Shape", "Equal", "Constant", "ArgMax"} <= NON_DIFFERENTIABLE
    assert not NON_DIFFERENTIABLE & set(RULES)
