"""rewrite.gemm_tail: the steps after a replaced weight's product give the original Gemm/MatMul output, folded
or not, for constant, computed and absent C, beta 0 and 1, and a bias-correction shift."""

import numpy as np
import pytest
from onnx import helper, numpy_helper

from onnx_fwlr.rewrite.gemm_tail import folded_bias, tail_steps
from onnx_fwlr.sites.find import WeightUse

RNG = np.random.default_rng(0)
Y = RNG.normal(size=(3, 4))  # op(X) W'
C = RNG.normal(size=4)
SHIFT = RNG.normal(size=4)


def _model_with_constant_c():
    graph = helper.make_graph([], "g", [], [], [numpy_helper.from_array(C, "C")])
    return helper.make_model(graph)


def _apply(steps, computed_c):
    y = Y.copy()
    for step in steps:
        operand = step.operand
        if isinstance(operand, str):
            operand = computed_c if operand == "C_computed" else C
        if step.scale is not None:
            operand = operand * step.scale
        y = y * operand if step.op == "Mul" else y + operand
    return y


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("bias", [None, "C", "C_computed"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 1.0), (1.0, 2.0), (0.7, 0.0)])
@pytest.mark.parametrize("shift", [None, SHIFT])
def test_steps_give_the_gemm_output(fold, bias, alpha, beta, shift):
    model = _model_with_constant_c()
    use = WeightUse(0, 0, "gemm", "Gemm", "x", "y", alpha=alpha, beta=beta, bias=bias)
    steps = tail_steps(use, shift, model, model.graph) if fold else tail_steps(use, shift)
    expected = alpha * Y + (0.0 if bias is None else beta * C) + (0.0 if shift is None else alpha * shift)
    np.testing.assert_allclose(_apply(steps, computed_c=C), expected, rtol=1e-12)
    if bias is None or beta == 0.0:
        assert all(s.role != "C" for s in steps)  # beta 0 ignores C
    if fold and bias == "C" and beta != 0.0 and (shift is not None or beta != 1.0):
        assert [s.role for s in steps if s.op == "Add"] == ["C"]  # one constant, one Add


def test_matmul_gets_its_shift_only():
    use = WeightUse(0, 0, "mm", "MatMul", "x", "y")
    assert tail_steps(use, None) == []
    (step,) = tail_steps(use, SHIFT)
    assert (step.op, step.role) == ("Add", "shift")
    np.testing.assert_array_equal(step.operand, SHIFT)


def test_folded_bias_is_none_for_a_computed_c():
    model = _model_with_constant_c()
    use = WeightUse(0, 0, "gemm", "Gemm", "x", "y", alpha=2.0, beta=3.0, bias="computed")
    assert folded_bias(model, model.graph, use, SHIFT) is None
    use = WeightUse(0, 0, "gemm", "Gemm", "x", "y", alpha=2.0, beta=3.0, bias="C")
    np.testing.assert_allclose(folded_bias(model, model.graph, use, SHIFT), 3.0 * C + 2.0 * SHIFT)
