"""Training structured factors by distillation: the scatter VJP rules (finite differences), what refine trains in
a structured model, gradients through every ONNX form, co-matrix dropout, support re-selection and the doping
share; the CLI accepts structured models."""

import numpy as np
import onnx
import pytest
from builders import make_model, rel_error, run, vinfo
from onnx import helper, numpy_helper
from test_vjp import check, rand

from onnx_fwlr.autodiff.backward import GradientRunner
from onnx_fwlr.autodiff.vjp import RULES
from onnx_fwlr.errors import FwlrError
from onnx_fwlr.methods.structured import Coo, KronSum, LowRank, Structured
from onnx_fwlr.rewrite.lowrank import apply_factors
from onnx_fwlr.rewrite.structured import DOPING_FORMS, Form
from onnx_fwlr.sites.find import find_sites

# ---------------------------------------------------------------- VJP rules of the doping ops


@pytest.mark.parametrize("reduction", ["none", "add"])
def test_scatter_nd(reduction):
    indices = np.array([[0, 2], [1, 0], [2, 3]] if reduction == "none" else [[0, 2], [1, 0], [0, 2]], dtype=np.int64)
    check("ScatterND", [rand(3, 4, 2), indices, rand(3, 2)], {"reduction": reduction}, opset=16)


def test_scatter_nd_rows():
    check("ScatterND", [rand(5, 3), np.array([[4], [1], [4]], dtype=np.int64), rand(3, 3)], {"reduction": "add"},
          opset=16)


@pytest.mark.parametrize("axis,reduction", [(1, "add"), (0, "none"), (-1, "none")])
def test_scatter_elements(axis, reduction):
    indices = np.array([[1, 0, 3], [2, 2, 0]] if reduction == "add" else [[1, 0, 3], [2, 1, 0]], dtype=np.int64)
    if axis == 0:  # narrower than the data off the axis
        indices = np.array([[1, 0, 2], [2, 1, 0]], dtype=np.int64)
    check("ScatterElements", [rand(3, 4), indices, rand(*indices.shape)], {"axis": axis, "reduction": reduction},
          opset=16)


def test_scatter_with_other_reductions_has_no_rule():
    assert RULES["ScatterND"].unsupported({"reduction": "mul"})
    assert RULES["ScatterElements"].unsupported({"reduction": "add"}) is None


# ---------------------------------------------------------------- gradients through every structured form

K, N = 12, 10
SHAPE = (3, 4, 2, 5)  # m1, m2, n1, n2


def structured_site(kind="kron", nnz=7, seed=0) -> Structured:
    rng = np.random.default_rng(seed)
    if kind == "kron":
        m1, m2, n1, n2 = SHAPE
        structure = KronSum(rng.normal(size=(2, m1, n1)), rng.normal(size=(2, m2, n2)))
    else:
        structure = LowRank(rng.normal(size=(K, 3)), rng.normal(size=(3, N)))
    flat = rng.choice(K * N, nnz, replace=False)
    return Structured(structure, Coo(flat // N, flat % N, rng.normal(size=nnz), (K, N)))


def structured_model(rep: Structured, form: Form | None = None):
    W = np.random.default_rng(9).normal(size=(K, N)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"), helper.make_node("Tanh", ["h"], ["y"])]
    original = make_model(nodes, [vinfo("x", ["b", K])], [vinfo("y", ["b", N])], [numpy_helper.from_array(W, "W")])
    compressed = onnx.ModelProto()
    compressed.CopyFrom(original)
    sites, _ = find_sites(original)
    apply_factors(compressed, sites, {"W": rep}, forms={"W": form} if form else None)
    return original, compressed


@pytest.mark.parametrize("form", [Form(doping=d) for d in DOPING_FORMS]
                         + [Form(order="a_first", flat=True, stacked=False), Form(order="b_first", flat=True)],
                         ids=lambda f: f.label())
def test_gradients_of_stored_factors_match_finite_differences(form):
    from onnx_fwlr.refine.trainable import trainable_factors, training_model

    rep = structured_site()
    original, compressed = structured_model(rep, form)
    names = trainable_factors(original, compressed)
    assert {n.rsplit("/", 1)[1] for n in names} == {"A", "B", "dope_vals"}
    model = training_model(compressed, names)
    model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    runner = GradientRunner(model, "y", names)
    x = np.random.default_rng(1).normal(size=(4, K)).astype(np.float32)
    weights = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in compressed.graph.initializer
               if t.name in names}
    seed = np.random.default_rng(2).normal(size=(4, N)).astype(np.float32)
    values = runner.forward({"x": x, **weights})
    grads = runner.backward(values, seed)
    for name in names:
        w = weights[name].astype(np.float64)
        probe = np.random.default_rng(3).normal(size=w.shape)
        h = 1e-2

        def loss(v):
            return float(np.sum(seed * run(model, {"x": x, **weights, name: v.astype(np.float32)})[0]))

        fd = (loss(w + h * probe) - loss(w - h * probe)) / (2 * h)
        assert abs(float(np.sum(grads[name] * probe)) - fd) <= 2e-3 * max(abs(fd), 1.0), name
